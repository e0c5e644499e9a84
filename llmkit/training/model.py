"""The model a run trains and its tokenizer: pretrained weights (with LoRA adapters), or a fresh model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.config import TrainConfig
from llmkit.errors import ModelError, UsageError

if TYPE_CHECKING:
    from llmkit.models import ModelSource

# What --dropout sets, under each config's own names: GPT-2's residual, embedding and attention dropout,
# Phi-3's residual and embedding dropout, attention_dropout (Llama, Qwen2, Mistral, Gemma-2, Phi-3), and
# the residual hidden_dropout of GPT-NeoX and Falcon.
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout")


def build_model(cfg: TrainConfig) -> tuple[Any, Any, float | None, str | None]:
    """(model, tokenizer, the base config's dropout, with --lora the layers adapted and why): pretrained
    weights (with LoRA adapters to train), or a fresh model."""
    from llmkit.models import load_weights, resolve

    # gpt2's architecture is transformers' GPT2Config default: training it from scratch with a tokenizer
    # of one's own needs nothing from the hub.
    known_config = (
        cfg.from_scratch and cfg.tokenizer is not None and cfg.model in ("gpt2", "openai-community/gpt2")
    )
    source = None
    if not known_config:
        # From scratch with --tokenizer, a directory holding only config.json (a model shape) will do.
        source = resolve(
            cfg.model,
            offline=cfg.offline,
            allow_pickle=cfg.allow_pickle,
            weights=not cfg.from_scratch,
            tokenizer=cfg.tokenizer is None,
        )
    tokenizer = _tokenizer(cfg, source)
    template = None
    if cfg.chat_template is not None:
        from llmkit.templates import apply_template, resolve_template

        template = resolve_template(cfg.chat_template)
        # The tokens go on before a fresh model is shaped, so its vocabulary counts them.
        added = apply_template(tokenizer, None, template)
        if added and cfg.lora and not cfg.from_scratch:
            raise UsageError(
                f"--chat-template {cfg.chat_template} adds {', '.join(added)} to the vocabulary, and a "
                "LoRA adapter can't carry new embedding rows",
                "fine-tune without --lora, or use --chat-template zephyr (it adds no tokens)",
            )
    config = _config_dict(source)
    dropout = _dropout_fields(cfg.dropout, config)
    base_dropout = _config_dropout(config)
    if cfg.from_scratch:
        model = _fresh_model(cfg, source, tokenizer, dropout)
        if template is not None:
            apply_template(tokenizer, model, template)
        return model, tokenizer, base_dropout, None
    assert source is not None
    # An adapter given as the base arrives merged into its own base: a model like any other.
    model = load_weights(source, cfg.model, dtype="float32", allow_pickle=cfg.allow_pickle, **dropout)
    if template is not None:
        apply_template(tokenizer, model, template)  # resizes the embeddings, makes the end of turn a stop
    if not cfg.lora:
        return model, tokenizer, base_dropout, None
    from llmkit import lora

    model, targets = lora.wrap(model, cfg, base=source.reference)
    # The saved config (llmkit.json, checkpoints) says what ran, and a resume compares it as such.
    cfg.lora_targets = targets.spec
    return model, tokenizer, base_dropout, targets.describe()


def _config_dict(source: ModelSource | None) -> dict[str, Any] | None:
    """The base model's config with transformers' defaults filled in (a saved config.json leaves out
    values equal to them); None when it can't be read. (source None: transformers' GPT2Config.)"""
    from transformers import AutoConfig, GPT2Config

    if source is None:
        return GPT2Config().to_dict()
    try:
        return AutoConfig.from_pretrained(source.model_dir, local_files_only=True).to_dict()
    except (OSError, ValueError, KeyError):
        return None


def _dropout_fields(dropout: float | None, config: dict[str, Any] | None) -> dict[str, float]:
    """--dropout as the config's own dropout fields; a config with none of them is refused, since a
    field it doesn't have would be set and silently ignored."""
    if dropout is None:
        return {}
    keys = [key for key in DROPOUT_KEYS if config is not None and key in config]
    if not keys:
        kind = (config or {}).get("model_type", "this model")
        raise UsageError(
            f"--dropout: a {kind} config has none of the dropout fields llmkit sets "
            f"({', '.join(DROPOUT_KEYS)})",
            "drop --dropout, or set the model's own dropout fields in its config.json",
        )
    return dict.fromkeys(keys, dropout)


def _config_dropout(config: dict[str, Any] | None) -> float | None:
    """The dropout the base model's config sets, which a run without --dropout trains with; None when
    its dropout fields differ or it has none."""
    values = {config.get(key) for key in DROPOUT_KEYS if key in config} if config is not None else set()
    return values.pop() if len(values) == 1 and None not in values else None


def _tokenizer(cfg: TrainConfig, source: ModelSource | None) -> Any:
    from llmkit.models import has_tokenizer, load_tokenizer

    if cfg.tokenizer is not None:
        tok_dir = Path(cfg.tokenizer)
        if not (tok_dir.is_dir() and has_tokenizer(tok_dir)):
            raise ModelError(
                f"{cfg.tokenizer} is not a tokenizer directory",
                "make one with: llmkit train-tokenizer DATA -o DIR",
            )
        tokenizer = load_tokenizer(tok_dir, cfg.tokenizer)
    else:
        assert source is not None
        tokenizer = load_tokenizer(source.tokenizer_dir, cfg.model)
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"the tokenizer of {cfg.tokenizer or cfg.model} has no end-of-text token",
            "documents are joined with it; train one with llmkit train-tokenizer",
        )
    return tokenizer


def _fresh_model(
    cfg: TrainConfig, source: ModelSource | None, tokenizer: Any, dropout: dict[str, float]
) -> Any:
    """Random weights in the base model's shape, with the from-scratch overrides, in float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if source is None:
        from transformers import GPT2Config

        config = GPT2Config()
    else:
        config = AutoConfig.from_pretrained(source.model_dir, local_files_only=True)
    for key, value in dropout.items():
        setattr(config, key, value)
    _reshape(config, cfg)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    config.eos_token_id = tokenizer.eos_token_id
    # float32 master weights whatever the base's config says (the built-in model's says bfloat16, and
    # transformers would build in it): bf16 speed comes from autocast, not from the parameters.
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# --n-layer/--n-head/--n-embd/--context as transformers' standard config names, which every config that
# has the field answers to (GPT-2's own names, n_layer and the rest, through its attribute_map).
SHAPE_FIELDS = {
    "--n-layer": "num_hidden_layers",
    "--n-head": "num_attention_heads",
    "--n-embd": "hidden_size",
    "--context": "max_position_embeddings",
}


def _reshape(config: Any, cfg: TrainConfig) -> None:
    """The from-scratch shape options set on `config` under its own field names, with the fields that
    follow them kept consistent: grouped-query heads still dividing the heads, a derived head_dim, the
    MLP's width in the same ratio to the model's, per-layer attention types for the new depth."""
    import math

    given = {
        "--n-layer": cfg.n_layer,
        "--n-head": cfg.n_head,
        "--n-embd": cfg.n_embd,
        "--context": cfg.context,
    }
    given = {option: value for option, value in given.items() if value is not None}
    kind = getattr(config, "model_type", "this model")
    for option in given:
        if getattr(config, SHAPE_FIELDS[option], None) is None:
            raise UsageError(
                f"{option}: a {kind} config has no {SHAPE_FIELDS[option]} to set",
                f"drop {option}, or set the shape in the directory's config.json",
            )
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    derived_head_dim = heads and width and getattr(config, "head_dim", None) == width // heads
    if "--n-layer" in given:
        layers = given["--n-layer"]
        pattern = getattr(config, "layer_types", None)
        if isinstance(pattern, list) and pattern:
            config.layer_types = [pattern[i % len(pattern)] for i in range(layers)]  # the pattern, repeated
        config.num_hidden_layers = layers
    if "--n-head" in given:
        config.num_attention_heads = given["--n-head"]
        if getattr(config, "num_key_value_heads", None):
            config.num_key_value_heads = math.gcd(config.num_key_value_heads, given["--n-head"])
    if "--n-embd" in given:
        if width and getattr(config, "intermediate_size", None):
            config.intermediate_size = round(config.intermediate_size * given["--n-embd"] / width)
        config.hidden_size = given["--n-embd"]
    if "--context" in given:
        config.max_position_embeddings = given["--context"]
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if heads and width and (derived_head_dim or getattr(config, "head_dim", None) is None) and width % heads:
        names = ("n_embd", "n_head") if kind == "gpt2" else ("hidden_size", "num_attention_heads")
        raise UsageError(
            f"{names[0]} {width} is not divisible by {names[1]} {heads}",
            "pick --n-embd and --n-head so that heads split the width evenly",
        )
    if derived_head_dim:
        config.head_dim = width // heads


def checkpointing(model: Any, enable: bool) -> None:
    """Activation checkpointing on or off, non-reentrant.

    The reentrant variant passes gradients only through inputs that require them, and with --lora the
    frozen embeddings' output doesn't: the adapters would get none. (transformers 5.24 also marks that
    output as requiring grad; this holds without it.) 5.24 has new names; the old ones warn there.
    """
    kwargs = {"use_reentrant": False}
    if not hasattr(model, "activation_checkpointing_enable"):  # older transformers
        if enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()
    elif enable:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.activation_checkpointing_disable()
