"""Memory and speed of LoRA against full fine-tuning, GPT-2 medium's shape (355M, random weights), CPU.

Each mode runs in its own child process (so peak RSS is that mode's alone): llmkit's own training loop,
block 512, the same batch, a few optimizer steps. Reported: trainable parameters, peak resident memory,
and tokens/s from the end of the first step to the end of the last.
Targets: LoRA peak memory <= 40% of full fine-tuning, and LoRA steps no slower than full ones.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BUILD, corpus_text, describe_machine, gpt2_small, save, table

BLOCK = 512
BATCH = 2
STEPS = 3
MODES = ("full", "lora", "full+gc", "lora+gc")  # +gc: with --gradient-checkpointing
# glibc's malloc raises its mmap threshold as big blocks are freed, after which activations come from
# the heap and stay counted in RSS once freed: peak RSS then overstates what a step holds at once. A
# fixed threshold returns them at free(), so the second column shows the memory a step really needs.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


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

    extra: dict[str, Any] = {"lora": True} if mode.startswith("lora") else {}
    # Explicit either way: --lora alone turns checkpointing on.
    extra["gradient_checkpointing"] = mode.endswith("+gc")
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
    results: dict[str, Any] = {}
    for mode, env in [(m, {}) for m in MODES] + [(m + " (fixed mmap)", FIXED_MMAP) for m in MODES]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.lora",
                "--one",
                mode.split()[0],
                str(model),
                str(data),
                str(BUILD / f"lora-out-{mode.split()[0]}"),
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = {**json.loads(done.stdout.strip().splitlines()[-1]), "mode": mode}
    rows = [("mode", "trainable parameters", "peak RSS", "tokens/s")]
    for r in results.values():
        rows.append(
            (
                r["mode"],
                f"{r['trainable']:,} of {r['total']:,}",
                f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
                f"{r['tokens_per_s']:.1f}",
            )
        )
    print(table(rows))
    ratios = {}
    pairs = [("lora", "full"), ("lora+gc", "full+gc"), ("lora+gc", "full")]
    for lora, full in pairs + [(a + " (fixed mmap)", b + " (fixed mmap)") for a, b in pairs]:
        memory = results[lora]["peak_rss_bytes"] / results[full]["peak_rss_bytes"]
        speed = results[lora]["tokens_per_s"] / results[full]["tokens_per_s"]
        ratios[f"{lora} / {full}"] = {"memory": memory, "speed": speed}
        print(f"{lora} / {full}: peak memory {memory:.0%} (target <= 40%), speed {speed:.2f}x (target >= 1)")
    save(
        "lora",
        {
            "block": BLOCK,
            "batch": BATCH,
            "steps": STEPS,
            "modes": results,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))))
    else:
        main()
