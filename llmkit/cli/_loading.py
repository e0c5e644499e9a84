"""Loading a model for a command, with transformers kept quiet and the choice reported on -v."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmkit.cli import _output as out

if TYPE_CHECKING:
    from llmkit.config import LoadConfig
    from llmkit.models import LoadedModel
    from llmkit.templates import ChatTemplate


def load_model(cfg: LoadConfig) -> LoadedModel:
    from llmkit.models import load, quiet_transformers

    quiet_transformers(out.settings.verbose)
    lm = load(cfg)
    base, adapter = lm.source.base, ""
    if base is not None:
        where = base.name if base.name == str(base.model_dir) else f"{base.name} ({base.model_dir})"
        adapter = f", a LoRA adapter merged into {where}"
    precision = f"{str(lm.dtype).removeprefix('torch.')} ({lm.dtype_reason})"
    if cfg.quantize == "int8":
        # Loaded in float32, then every linear layer became int8: say what runs, not what loaded.
        precision = "int8 weights in every linear layer (--quantize int8), float32 embeddings and norms"
    elif cfg.quantize == "f16":
        precision = "float16 weights in every linear layer (--quantize f16), float32 everywhere else"
    elif cfg.quantize == "int4":
        precision = (
            "4-bit weights in groups of 32 in every linear layer (--quantize int4; bf16 inputs to the "
            "products), float32 embeddings, norms and attention"
        )
    out.detail(
        f"model {lm.source.name} ({lm.source.origin}: {lm.source.path}{adapter}) on {lm.device}, {precision}"
    )
    return lm


def load_tokenizer_only(cfg: LoadConfig):
    """For commands that need no weights: resolve and check the model, load just its tokenizer."""
    from pathlib import Path

    from llmkit.lora import is_adapter_dir
    from llmkit.models import CONFIG_FILE, has_tokenizer, load_tokenizer, quiet_transformers, resolve

    quiet_transformers(out.settings.verbose)
    bare = Path(cfg.model)
    if (
        bare.is_dir()
        and has_tokenizer(bare)
        and not (bare / CONFIG_FILE).is_file()
        and not is_adapter_dir(bare)
    ):
        return load_tokenizer(bare, cfg.model)  # a tokenizer directory, e.g. from train-tokenizer
    source = resolve(cfg.model, offline=cfg.offline, allow_pickle=cfg.allow_pickle)
    return load_tokenizer(source.tokenizer_dir, cfg.model)


def resolve_chat_template(spec: str | None) -> ChatTemplate | None:
    """--chat-template resolved (a file read and checked) before the model loads: a bad one fails fast."""
    if spec is None:
        return None
    from llmkit.templates import resolve_template

    return resolve_template(spec)


def use_chat_template(lm: LoadedModel, template: ChatTemplate | None, quantize: str | None = None) -> None:
    """--chat-template on a loaded model (in memory): its tokens added where missing, said on stderr."""
    if template is None:
        return
    from llmkit.errors import UsageError
    from llmkit.templates import apply_template

    spec = template.name
    missing = [t for t in template.special_tokens if t not in lm.tokenizer.get_vocab()]
    if missing and quantize:
        # A quantized LM head has no rows to grow.
        raise UsageError(
            f"--chat-template {spec} adds {', '.join(missing)} to the vocabulary, which --quantize can't",
            "drop --quantize, or fine-tune with the template first (llmkit finetune … --chat-template)",
        )
    added = apply_template(lm.tokenizer, lm.model, template)
    if added:
        out.warn(
            f"--chat-template {spec}: added {', '.join(added)} to the vocabulary; this model has never "
            "seen them, so expect poor replies until it is fine-tuned with the template "
            f"(llmkit finetune … --chat-template {spec})"
        )
