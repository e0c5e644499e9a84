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
from dataclasses import dataclass
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
ALL_LINEAR = "all-linear"
"""Every linear layer of the blocks (PEFT's shorthand; never the LM head)."""


@dataclass
class Targets:
    """The layers a run adapts, and why those (what the plan line says)."""

    names: list[str]
    why: str | None = None
    """None: named by --lora-targets; else the default that chose them."""

    @property
    def spec(self) -> str:
        """The names as --lora-targets takes them (what the run's saved config records)."""
        return ",".join(self.names)

    def describe(self) -> str:
        return ", ".join(self.names) + (f" ({self.why})" if self.why else "")


def targets(model: PreTrainedModel, given: str | None) -> Targets:
    """`given` (--lora-targets) as layer names, or the default for the model's architecture: GPT-2's
    attention and MLP projections, else what PEFT adapts for that model type, else all-linear."""
    from llmkit.config import LORA_TARGETS

    model_type = getattr(model.config, "model_type", None) or "this model"
    if given is not None:
        if ALL_LINEAR not in given.split(","):
            return Targets(given.split(","))
        if given != ALL_LINEAR:
            raise UsageError(
                f"--lora-targets {ALL_LINEAR} stands alone", f"pass {ALL_LINEAR}, or name the layers"
            )
        return Targets(_all_linear(model), ALL_LINEAR)
    if model_type == "gpt2":  # llmkit's GPT-2 default: attention and MLP, not PEFT's c_attn alone
        return Targets(LORA_TARGETS.split(","), "GPT-2's attention and MLP")
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    listed = PEFT_DEFAULTS.get(model_type)
    if listed:
        return Targets(list(listed), f"PEFT's default for {model_type}")
    return Targets(_all_linear(model), f"{ALL_LINEAR}: PEFT has no default for {model_type}")


def _all_linear(model: PreTrainedModel) -> list[str]:
    """The layer names of every Linear and Conv1D but the LM head, as PEFT's all-linear picks them."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    layers = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D) and m is not head
    ]
    short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))  # q_proj, … in the order met
    head_name = next((n for n, m in model.named_modules() if m is head), "")
    # PEFT matches a name or a dotted suffix: a block layer named like the head would adapt it too.
    return layers if head_name.rsplit(".", 1)[-1] in short else short


def wrap(model: PreTrainedModel, cfg: TrainConfig, base: str) -> tuple[Any, Targets]:
    """A PeftModel: trainable LoRA adapters on `cfg.lora_targets` (None: the architecture's default),
    every other weight frozen; and the layers chosen."""
    from peft import LoraConfig, get_peft_model

    assert cfg.lora_r is not None and cfg.lora_alpha is not None
    chosen = targets(model, cfg.lora_targets)
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout or 0.0,
        target_modules=chosen.names,
        fan_in_fan_out=_fan_in_fan_out(model, chosen.names, cfg.model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _quiet():
        adapted = get_peft_model(model, config)
    # PEFT records the folder the weights were read from (a hub snapshot, the package's built-in
    # directory); the adapter names its base the way the user did, which llmkit resolves anywhere.
    adapted.peft_config["default"].base_model_name_or_path = base
    return adapted, chosen


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
