"""The README.md model card written next to a fine-tuned model."""

from __future__ import annotations

from typing import Any


def render(meta: dict[str, Any]) -> str:
    cfg, data, metrics = meta["config"], meta["data"], meta["metrics"]
    how = "trained from scratch using the configuration of" if cfg["from_scratch"] else "fine-tuned from"
    ppl = metrics.get("val_perplexity")
    rows = [
        ("base model", f"`{cfg['model']}`"),
        ("parameters", f"{meta['parameters']:,}"),
        (
            "data",
            f"{data['documents']:,} documents, {data['tokens']:,} tokens "
            f"({data['train_blocks']:,} train / {data['val_blocks']:,} validation blocks of "
            f"{data['block_size']})",
        ),
        ("steps", f"{metrics['step']:,} ({metrics['epoch']:.2f} epochs, {metrics['tokens']:,} tokens seen)"),
        (
            "batch",
            f"{meta['effective_batch']} blocks per step ({cfg['batch_size']} × {cfg['grad_accum']} "
            f"accumulation × {meta['processes']} processes)",
        ),
        (
            "optimizer",
            f"AdamW, lr {meta['lr']:g} ({cfg['lr_schedule']}, {meta['warmup_steps']} warmup "
            f"steps), weight decay {cfg['weight_decay']:g}, grad clip {cfg['max_grad_norm']:g}",
        ),
        ("precision", meta["mixed_precision"]),
        ("final train loss", f"{metrics['loss']:.4f}" if metrics.get("loss") is not None else "n/a"),
        ("validation perplexity", f"{ppl:.3f}" if ppl is not None else "n/a (no validation data)"),
        ("seed", str(cfg["seed"])),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
tags: [llmkit, gpt2, text-generation]
---

# {meta["name"]}

A causal language model {how} `{cfg["model"]}` with
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
from transformers import pipeline

generator = pipeline("text-generation", model="{meta["name"]}")
```
"""
