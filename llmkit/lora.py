"""LoRA adapters with PEFT: the adapter directory's files, adapting a model to train, merging one in.

An adapter directory holds adapter_config.json and adapter_model.safetensors instead of config.json
and the model's weights; its base_model_name_or_path names the base model as --model would. PEFT is
imported inside functions only, so `llmkit --help` stays light.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import ModelError, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from llmkit.config import TrainConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


# -- the adapter directory -------------------------------------------------------------------------
def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file()


def read_config(path: Path, label: str) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{label}: cannot read {CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{label}: {CONFIG_FILE} is not a JSON object")
    return config


def check_dir(path: Path, *, allow_pickle: bool, label: str, weights: bool = True) -> None:
    """Refuse an adapter we can't or shouldn't load, before PEFT fails obscurely."""
    config = read_config(path, label)
    if config.get("peft_type") != "LORA":
        raise ModelError(
            f"{label} is a {config.get('peft_type') or 'unknown'} adapter; llmkit loads LoRA adapters only",
            "merge it into its base model with PEFT and pass the merged model",
        )
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ModelError(
            f"{label}: {CONFIG_FILE} names no base model (base_model_name_or_path)",
            "set it to the base model's directory, built-in name or hub id",
        )
    if not weights or (path / WEIGHTS).is_file():
        return
    if not (path / PICKLE_WEIGHTS).is_file():
        raise ModelError(
            f"{label} has no adapter weights ({WEIGHTS})",
            "save the adapter with save_pretrained, or pass another directory",
        )
    if not allow_pickle:
        raise ModelError(
            f"{label} has only pickle adapter weights ({PICKLE_WEIGHTS}), which can run code when loaded",
            "convert them to safetensors, or pass --allow-pickle if you trust their source",
        )


# -- loading ---------------------------------------------------------------------------------------
def merge_into(model: PreTrainedModel, adapter: Path, label: str) -> PreTrainedModel:
    """`model` with the adapter in `adapter` applied and merged into its weights."""
    from peft import PeftModel

    try:
        # Merged once, at load: each adapted layer then runs one matrix product instead of three, and
        # what comes back is the plain transformers model that generation (KV cache, --compile),
        # scoring, --quantize and fine-tuning from it expect.
        with _quiet():
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(
            f"{label}: cannot apply the adapter in {adapter}: {exc}",
            "the adapter may belong to another base model; check base_model_name_or_path",
        ) from None
    # PEFT froze every base weight to load the adapter; merged, it is a plain model again, which
    # `finetune -m ADAPTER` trains like one read from disk.
    return merged.requires_grad_(True)


# -- training --------------------------------------------------------------------------------------
def wrap(model: PreTrainedModel, cfg: TrainConfig, base: str) -> Any:
    """A PeftModel: trainable LoRA adapters on `cfg.lora_targets`, every other weight frozen."""
    from peft import LoraConfig, get_peft_model

    assert cfg.lora_targets is not None and cfg.lora_r is not None and cfg.lora_alpha is not None
    targets = cfg.lora_targets.split(",")
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout or 0.0,
        target_modules=targets,
        fan_in_fan_out=_fan_in_fan_out(model, targets, cfg.model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _quiet():
        adapted = get_peft_model(model, config)
    # PEFT records the folder the weights were read from (a hub snapshot, the package's built-in
    # directory); the adapter names its base the way the user did, which llmkit resolves anywhere.
    adapted.peft_config["default"].base_model_name_or_path = base
    return adapted


def _fan_in_fan_out(model: PreTrainedModel, targets: list[str], label: str) -> bool:
    """True for GPT-2's Conv1D layers, which store their weight (in, out), transposed from Linear's.

    Transposed, B·A would still fit a square layer (attn.c_proj) and train and merge without an error.
    PEFT corrects a wrong setting itself, with a warning per layer; saying it right keeps the adapter's
    config true and stderr quiet.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    layers = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)}
    embeddings = model.get_input_embeddings().weight
    kinds = set()
    for target in targets:
        # PEFT's rule for a list of names: the full module name, or its dotted suffix.
        found = [m for name, m in layers.items() if name == target or name.endswith("." + target)]
        if not found:
            names = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise UsageError(
                f"--lora-targets: {label} has no linear layer named {target!r}",
                f"its linear layers: {', '.join(names)}",
            )
        if any(m.weight is embeddings for m in found):
            raise UsageError(
                f"--lora-targets: {target} shares its weight with the input embeddings",
                "merging would change both; adapt the blocks' projections (c_attn, c_proj, c_fc)",
            )
        kinds |= {isinstance(m, Conv1D) for m in found}
    if len(kinds) > 1:
        raise UsageError(
            "--lora-targets mixes Conv1D and Linear layers", "adapt layers of one kind in one run"
        )
    return kinds == {True}


@contextmanager
def _quiet() -> Iterator[None]:
    """PEFT reads attributes that transformers 5 deprecates (is_gradient_checkpointing); the warning
    would reach the stderr of every command given an adapter, and no user can act on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        yield
