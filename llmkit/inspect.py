"""Facts about a model read from its files (config, safetensors headers), without loading weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from llmkit import lora
from llmkit.config import LoadConfig
from llmkit.models import (
    ModelSource,
    check_model_dir,
    context_length,
    pick_device,
    pick_dtype,
    resolve,
)

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def weight_stats(directory: Path) -> tuple[int | None, str | None]:
    """(parameter count, stored dtype) summed over safetensors files; tied weights are stored once."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None, None
    count, dtypes = 0, set()
    for file in files:
        for name, entry in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in entry["shape"]:
                n *= dim
            count += n
            dtypes.add(SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower()))
    return count, ", ".join(sorted(dtypes))


def count_parameters(config: Any) -> int:
    """Parameters of the model a config describes (tied ones once), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def describe(cfg: LoadConfig) -> dict[str, Any]:
    from transformers import AutoConfig

    # No weights are read here, so pickle-only weights need no --allow-pickle; no weights at all still fail.
    source = resolve(cfg.model, offline=cfg.offline, allow_pickle=cfg.allow_pickle, weights=False)
    part: ModelSource | None = source
    while part is not None:
        check_model_dir(part.path, allow_pickle=True, name=part.name, tokenizer=False)
        part = part.base
    config = AutoConfig.from_pretrained(source.model_dir, local_files_only=True, trust_remote_code=False)
    device = pick_device(cfg.device)
    dtype, why = pick_dtype(cfg.dtype, device)
    parameters, stored = weight_stats(source.model_dir)  # an adapter's merged model has its base's
    if parameters is None:  # pickle weights only: count the config's model, built without memory
        parameters, stored = count_parameters(config), "unknown (pickle weights, not read)"
    size = sum(p.stat().st_size for p in source.path.iterdir() if p.is_file())
    # Grouped-query attention (Llama, Qwen2, Mistral, …) keeps fewer key/value heads: the KV cache's size.
    kv_heads = getattr(config, "num_key_value_heads", None)
    return {
        "model": cfg.model,
        **adapter_details(source),
        "architecture": (config.architectures or [config.model_type])[0],
        "model_type": config.model_type,
        "parameters": parameters,
        "layers": getattr(config, "n_layer", getattr(config, "num_hidden_layers", None)),
        "heads": getattr(config, "n_head", getattr(config, "num_attention_heads", None)),
        **({"kv_heads": kv_heads} if kv_heads else {}),
        "embedding_width": getattr(config, "n_embd", getattr(config, "hidden_size", None)),
        "context": context_length(config),
        "vocab_size": config.vocab_size,
        "stored_dtype": stored,
        "dtype": str(dtype).removeprefix("torch."),
        "dtype_reason": why,
        "size_on_disk": size,
        "source": source.origin,
        "path": str(source.path),
        **({"base_path": str(source.model_dir)} if source.base is not None else {}),
        "device": str(device),
    }


def adapter_details(source: ModelSource) -> dict[str, Any]:
    """For a LoRA adapter: what it is and what it adapts; nothing for a plain model."""
    if source.base is None:
        return {}
    config = lora.read_config(source.path, source.name)
    targets, alpha = config.get("target_modules"), config.get("lora_alpha")
    return {
        "adapter": "LoRA",
        "base_model": config["base_model_name_or_path"],
        "lora_r": config.get("r"),
        "lora_alpha": int(alpha) if isinstance(alpha, float) and alpha.is_integer() else alpha,
        "lora_targets": ", ".join(sorted(targets)) if isinstance(targets, list) else targets,
        "adapter_parameters": weight_stats(source.path)[0],
    }
