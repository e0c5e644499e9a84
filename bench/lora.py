"""Memory and speed of LoRA against full fine-tuning, GPT-2 medium's shape (355M, random weights), CPU.

Each mode runs in its own child process (so peak RSS is that mode's alone): llmkit's own training loop,
block 512, the same batch, a few optimizer steps. Reported: trainable parameters, peak resident memory,
and tokens/s from the end of the first step to the end of the last.
Targets: LoRA peak memory <= 40% of full fine-tuning, and LoRA steps no slower than full ones.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BUILD, corpus_text, describe_machine, gpt2_small, save, table

BLOCK = 512
BATCH = 2
STEPS = 4


def medium(path: Path = BUILD / "gpt2-medium-shape") -> Path:
    """GPT-2 medium's exact shape (24 layers, 1024 wide, 16 heads), random weights, GPT-2-size vocab."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(gpt2_small())
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=24,
        n_embd=1024,
        n_head=16,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one(mode: str, model: Path, data: Path, out: Path) -> dict[str, Any]:
    """Runs in the child: train a few steps, report what it saw."""
    from llmkit.config import TrainConfig
    from llmkit.training import Metrics, Plan, Trainer

    extra = {"lora": True} if mode == "lora" else {}
    cfg = TrainConfig(
        model=str(model),
        data=[str(data)],
        output=str(out),
        overwrite=True,
        block_size=BLOCK,
        batch_size=BATCH,
        max_steps=STEPS,
        lr=1e-4,
        val_split=0.0,
        log_every=1,
        save_every=0,
        mixed_precision="no",
        cache_dir=str(BUILD / "lora-cache"),
        **extra,
    )
    stamps: dict[int, float] = {}
    trainable = total = 0
    trainer = Trainer(cfg)
    for event in trainer.events():
        if isinstance(event, Plan):
            module = trainer.acc.unwrap_model(trainer.model)
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            total = sum(p.numel() for p in module.parameters())
        if isinstance(event, Metrics):
            stamps[event.step] = time.perf_counter()
    rate = BLOCK * BATCH * (STEPS - 1) / (stamps[STEPS] - stamps[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "mode": mode,
        "tokens_per_s": rate,
        "peak_rss_bytes": peak,
        "trainable": trainable,
        "total": total,
    }


def main() -> None:
    print(describe_machine())
    model = medium()
    data = BUILD / "lora-data.txt"
    data.write_text(corpus_text()[:400_000], encoding="utf-8")
    results = {}
    for mode in ("full", "lora"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.lora",
                "--one",
                mode,
                str(model),
                str(data),
                str(BUILD / f"lora-out-{mode}"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    full, lora = results["full"], results["lora"]
    rows = [("mode", "trainable parameters", "peak RSS", "tokens/s")]
    for r in (full, lora):
        rows.append(
            (
                r["mode"],
                f"{r['trainable']:,} of {r['total']:,}",
                f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
                f"{r['tokens_per_s']:.1f}",
            )
        )
    print(table(rows))
    memory = lora["peak_rss_bytes"] / full["peak_rss_bytes"]
    speed = lora["tokens_per_s"] / full["tokens_per_s"]
    print(f"LoRA / full: peak memory {memory:.0%} (target <= 40%), speed {speed:.2f}x (target >= 1.0)")
    save(
        "lora",
        {
            "block": BLOCK,
            "batch": BATCH,
            "steps": STEPS,
            **results,
            "memory_ratio": memory,
            "speed_ratio": speed,
        },
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))))
    else:
        main()
