"""Everything decided before the first step: the Accelerator and its precision, what FSDP and trackers
allow, the optimizers and warmup, and what a resumed run takes over from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import rundir
from llmkit.config import TrainConfig
from llmkit.errors import UsageError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


def _mixed_precision(cfg: TrainConfig, device_type: str, saved: str | None) -> tuple[str, str | None]:
    """(accelerate's mode, a notice or None). `auto` asks what the device computes natively; a resumed
    run keeps its checkpoint's precision, so exact resume stays exact on a machine that would differ."""
    from llmkit.hardware import auto_mixed_precision

    if cfg.mixed_precision == "fp16" and device_type not in ("cuda", "mps"):
        raise UsageError("--mixed-precision fp16 needs a GPU", "use bf16 or no on the CPU")
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision, None
    picked, why = auto_mixed_precision(device_type)
    if saved is not None and saved != picked:
        return saved, (
            f"mixed precision {saved}, as the checkpoint was trained "
            f"(auto would pick {picked} here: {why}); pass --mixed-precision to change it"
        )
    return picked, None


def accelerator(cfg: TrainConfig, out: Path, saved_precision: str | None) -> tuple[Accelerator, str | None]:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from llmkit.models import pick_device

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # accelerate keeps process-wide singletons; a second run in one process must start clean.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    device = pick_device(cfg.device)
    precision, notice = _mixed_precision(cfg, device.type, saved_precision)
    _check_tracker(cfg.report_to)
    try:
        acc = Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=cfg.report_to,
            project_dir=str(out),
        )
    except (ImportError, ValueError) as exc:
        raise UsageError(
            f"cannot set up training: {exc}",
            "check --report-to (its package must be installed) and --mixed-precision",
        ) from None
    return acc, notice


def check_fsdp(acc: Accelerator, cfg: TrainConfig) -> str | None:
    """Refuse what FSDP can't do; a notice when the accelerate config asks for FSDP and it isn't on."""
    import os

    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        if cfg.lora and cfg.merge:
            raise UsageError(
                "--merge is not supported under FSDP: the adapters would be merged into sharded weights",
                "train without --merge (OUT is then the adapter), and merge it when loading it",
            )
        if cfg.sample_every:
            raise UsageError(
                "--sample-every is not supported under FSDP: every process would have to generate",
                "drop --sample-every, and generate from OUT after training",
            )
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc.num_processes > 1:
        # accelerate applies FSDP to GPUs (and other accelerators) only; on the CPU it runs plain data
        # parallel training, in which OUT and checkpoints are saved as without FSDP.
        return f"FSDP is not used on {acc.device.type}: each process holds the whole model"
    return None


def _check_tracker(name: str | None) -> None:
    """accelerate drops a tracker whose package is missing without a word: refuse before training."""
    if name is None:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import imports

    packages = {"tensorboard": "tensorboard", "comet_ml": "comet-ml", "dvclive": "dvclive"}
    for one in name.split(","):
        one = one.strip()
        if one == "all":
            continue
        if one not in LOGGER_TYPE_TO_CLASS:
            raise UsageError(
                f"unknown --report-to {one!r}", f"use one of: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}"
            )
        available = getattr(imports, f"is_{one}_available", None)
        if available is not None and not available():
            package = packages.get(one, one)
            extra = " (or: make install EXTRAS=tensorboard)" if one == "tensorboard" else ""
            raise UsageError(
                f"--report-to {one} needs the {package} package, which is not installed",
                f"pip install {package}{extra}",
            )


def saved_choices(saved: dict[str, Any]) -> dict[str, str | None]:
    """What a checkpoint's run resolved `auto`/default settings to (older checkpoints didn't record it)."""
    precision = saved.get("mixed_precision")
    if precision is None and saved.get("threads"):
        precision = "no"  # a CPU run from before `auto` could pick bf16 on the CPU
    return {"mixed_precision": precision, "optimizer": saved.get("optimizer", "adamw")}


def optimizers(model: Any, cfg: TrainConfig, device_type: str, name: str) -> list[torch.optim.Optimizer]:
    """AdamW over everything; or Muon over the transformer blocks' matrices and AdamW over the rest.

    Muon orthogonalises 2-D updates, which suits hidden weight matrices only: embeddings (and the head
    tied to them), biases and LayerNorm weights stay on AdamW, as in the modded-nanogpt recipe.
    """
    import torch

    muon, decay, no_decay = [], [], []
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name == "muon" and param.dim() == 2 and _in_block(pname):
            muon.append(param)
        else:
            # Matrices decay; biases and LayerNorm weights (vectors) don't.
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on CUDA only. On the CPU it made optimizer steps ~5x faster for GPT-2 small (0.10 s vs
    # 0.48 s, ~5% of a step), but in the one CI run with it an uninterrupted run differed from resumed
    # ones (never here; an earlier, rarer case without it points at threading, not at fused).
    # foreach is the configuration exact resume has always held with on that machine.
    fused = device_type == "cuda"
    found = [
        torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.peak_lr,
            betas=(0.9, 0.95 if cfg.from_scratch else 0.999),
            fused=fused,
        )
    ]
    if muon:
        found.append(torch.optim.Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
    return found


def _in_block(name: str) -> bool:
    """A parameter of a transformer block (GPT-2: transformer.h.N.…; most others: layers.N.…)."""
    parts = name.split(".")
    return any(
        p in ("h", "layers") and i + 1 < len(parts) and parts[i + 1].isdigit() for i, p in enumerate(parts)
    )


def cpu_threads(device_type: str) -> int | None:
    """torch's intra-op threads on the CPU: results depend on them, so checkpoints record them."""
    import torch

    return torch.get_num_threads() if device_type == "cpu" else None


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(cfg.warmup_ratio * total_steps)


def truncate_metrics(out: Path, step: int) -> dict[str, Any] | None:
    """Drop metrics logged after the checkpoint, so the resumed run neither repeats nor skips a step.

    Returns the last record kept.
    """
    path = out / rundir.METRICS
    if not path.is_file():
        return None
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by the crash, and anything after it
    path.write_text("".join(keep), encoding="utf-8")
    return json.loads(keep[-1]) if keep else None
