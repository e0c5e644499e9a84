"""The README.md model card written next to a fine-tuned model."""

from __future__ import annotations

from typing import Any


def render(meta: dict[str, Any]) -> str:
    cfg, data, metrics = meta["config"], meta["data"], meta["metrics"]
    adapter = bool(cfg.get("lora")) and not cfg["merge"]
    ppl = metrics.get("val_perplexity")
    rows = [
        ("base model", f"`{cfg['model']}`"),
        ("parameters", f"{meta['parameters']:,}"),
        *_lora_rows(meta),
        ("data", _data(data)),
        (
            "steps",
            f"{metrics['step']:,} ({metrics['epoch']:.2f} epochs, "
            f"{_plural(metrics['tokens'], 'token')} seen)",
        ),
        (
            "batch",
            f"{_plural(meta['effective_batch'], 'block')} per step ({cfg['batch_size']} per batch × "
            f"{cfg['grad_accum']} accumulation × {_plural(meta['processes'], 'process', 'es')})",
        ),
        ("optimizer", _optimizer(meta)),
        ("precision", meta["mixed_precision"]),
        ("final train loss", f"{metrics['loss']:.4f}" if metrics.get("loss") is not None else "n/a"),
        ("validation perplexity", f"{ppl:.3f}" if ppl is not None else "n/a (no validation data)"),
        ("seed", str(cfg["seed"])),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    front = (
        "library_name: peft\ntags: [llmkit, gpt2, lora, text-generation]"
        if adapter
        else "library_name: transformers\ntags: [llmkit, gpt2, text-generation]"
    )
    return f"""---
{front}
---

# {meta["name"]}

{_what(cfg)} `{cfg["model"]}` with
[llmkit](https://pypi.org/project/llmkit/) {meta["versions"]["llmkit"]}.

| | |
|---|---|
{table}

Data fingerprint: `{data["fingerprint"]}`. The full resolved configuration is in `llmkit.json`,
and the training curve in `metrics.jsonl` (`llmkit plot .` draws it).

```console
$ llmkit generate -m {meta["name"]} "Your prompt"
```

```python
{_python_usage(meta["name"], adapter)}
```
"""


def _plural(count: int, word: str, suffix: str = "s") -> str:
    return f"{count:,} {word}{'' if count == 1 else suffix}"


def _data(data: dict[str, Any]) -> str:
    """The training data and its blocks; a --val-file apart (older runs counted it in `documents`)."""
    unit, count = "document", data["documents"]
    if data.get("records") is not None:
        unit, count = "prompt/completion record", data["records"]
    text = f"{_plural(count, unit)}, {_plural(data['tokens'], 'token')} "
    if data.get("val_documents") is None:
        return text + (
            f"({data['train_blocks']:,} train / {data['val_blocks']:,} validation blocks of "
            f"{data['block_size']})"
        )
    val_count = data.get("val_records", data["val_documents"])
    return text + (
        f"({_plural(data['train_blocks'], 'train block')} of {data['block_size']}); validation file: "
        f"{_plural(val_count, unit)}, {_plural(data['val_tokens'], 'token')} "
        f"({_plural(data['val_blocks'], 'block')})"
    )


def _optimizer(meta: dict[str, Any]) -> str:
    """Both optimizers and both rates for a Muon run; runs from before `muon_lr` was recorded in
    llmkit.json count as Muon when their optimizer was."""
    cfg = meta["config"]
    muon_lr = meta.get("muon_lr", cfg.get("muon_lr") if meta.get("optimizer") == "muon" else None)
    schedule = f"{cfg['lr_schedule']}, {_plural(meta['warmup_steps'], 'warm-up step')}"
    rest = f"weight decay {cfg['weight_decay']:g}, grad clip {cfg['max_grad_norm']:g}"
    if muon_lr is None:
        return f"AdamW, lr {meta['lr']:g} ({schedule}), {rest}"
    return (
        f"Muon, lr {muon_lr:g}, on the blocks' matrices and AdamW, lr {meta['lr']:g}, on the rest "
        f"(both {schedule}), {rest}"
    )


def _what(cfg: dict[str, Any]) -> str:
    if cfg.get("lora"):
        if not cfg["merge"]:
            return "A LoRA adapter for"
        return "A causal language model fine-tuned with LoRA (adapters merged in) from"
    if cfg["from_scratch"]:
        return "A causal language model trained from scratch using the configuration of"
    return "A causal language model fine-tuned from"


def _lora_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    cfg = meta["config"]
    if not cfg.get("lora"):
        return []
    targets = ", ".join(cfg["lora_targets"].split(","))
    return [
        (
            "LoRA",
            f"r {cfg['lora_r']}, alpha {cfg['lora_alpha']:g}, dropout {cfg['lora_dropout']:g} on {targets}",
        ),
        ("adapter parameters", f"{meta['adapter_parameters']:,}" + (" (merged)" if cfg["merge"] else "")),
    ]


def _python_usage(name: str, adapter: bool) -> str:
    if adapter:
        # PEFT finds the base model from base_model_name_or_path in adapter_config.json.
        return f"""from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("{name}")"""
    return f"""from transformers import pipeline

generator = pipeline("text-generation", model="{name}")"""
