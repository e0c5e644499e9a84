"""The end of a run: the whole weights gathered, and OUT written (model or adapter, llmkit.json, card)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import rundir
from llmkit.config import TrainConfig
from llmkit.training.events import Metrics, Plan
from llmkit.training.model import checkpointing

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from llmkit.data import PreparedData


def gather_weights(acc: Accelerator, model: Any) -> dict[str, Any] | None:
    """Under FSDP each process holds a shard of every weight: the whole state dict, gathered the
    accelerate way (the main process gets it). None otherwise: the main process's model is whole."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return None
    return acc.get_state_dict(model)


def save(
    model: Any,
    tokenizer: Any,
    cfg: TrainConfig,
    plan: Plan,
    data: PreparedData,
    final: Metrics,
    seconds: float,
    whole: dict[str, Any] | None = None,
) -> None:
    """The main process writes OUT from the unwrapped model; `whole` is the gathered state dict under FSDP."""
    import accelerate
    import torch
    import transformers

    from llmkit import __version__, modelcard

    out = Path(cfg.output)
    if cfg.gradient_checkpointing:
        checkpointing(model, enable=False)
        model.config.use_cache = True
    model, save_options, adapter = _adapter_output(model, cfg, plan)
    if whole is not None:
        # The model's own parameters are shards: save_pretrained writes the gathered ones instead.
        save_options["state_dict"] = _retied(model, whole, getattr(torch, cfg.save_dtype))
    if cfg.save_dtype != "float32":
        model = model.to(getattr(torch, cfg.save_dtype))  # training is over: halve the file
    meta = {
        "name": out.name,
        "config": asdict(cfg),
        "lr": plan.lr,
        "warmup_steps": plan.warmup_steps,
        "mixed_precision": plan.mixed_precision,
        "optimizer": plan.optimizer,
        "muon_lr": plan.muon_lr,
        "effective_batch": plan.effective_batch,
        "processes": plan.processes,
        "total_steps": plan.total_steps,
        "parameters": plan.parameters - (plan.trainable if cfg.lora else 0),  # the base's, with LoRA
        **adapter,
        "data": data_stats(data),
        "metrics": {**final.record(), "seconds": round(seconds, 2)},
        "versions": {
            "llmkit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            **_peft_version(cfg),
        },
    }
    rundir.save_final(out, model, tokenizer, meta, modelcard.render(meta), **save_options)


def _adapter_output(model: Any, cfg: TrainConfig, plan: Plan) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """With --lora: (what to save, save_pretrained options, what llmkit.json adds about it)."""
    if not cfg.lora:
        return model, {}, {}
    meta = {
        "base_model": model.peft_config["default"].base_model_name_or_path,
        "adapter_parameters": plan.trainable,
    }
    if cfg.merge:
        return model.merge_and_unload(), {}, meta
    # The adapters alone: no embedding copies, as the vocabulary is the base's ("auto" asks the hub).
    return model, {"save_embedding_layers": False}, meta


def _retied(model: Any, whole: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The gathered state dict in `dtype`, with tied weights (GPT-2's lm_head and wte) one tensor again.

    Gathering copies each name's tensor on its own, and transformers finds ties by shared storage: without
    this, OUT would hold the tied weight twice.
    """
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in whole.items()}
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in converted:
            converted[name] = converted[first.setdefault(id(tensor), name)]
    return converted


def _peft_version(cfg: TrainConfig) -> dict[str, str]:
    if not cfg.lora:
        return {}
    import peft

    return {"peft": peft.__version__}


def data_stats(data: PreparedData) -> dict[str, Any]:
    """`data.stats()` with a --val-file's counts apart: documents, tokens and bytes are the training
    data's, val_documents, val_tokens and val_bytes (val_records for prompt/completion) the file's."""
    stats = data.stats()
    if not stats["val_file"]:
        return stats
    train, val = data.corpora
    stats.update(documents=train.documents, tokens=train.tokens, bytes=train.bytes)
    stats.update(val_documents=val.documents, val_tokens=val.tokens, val_bytes=val.bytes)
    if data.pairs is not None:
        assert data.val is not None
        stats.update(records=len(data.train.packing.members), val_records=len(data.val.packing.members))
    return stats
