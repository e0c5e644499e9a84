"""Shared pieces of the benchmarks: repeats, medians and spread, result files, the GPT-2-small model."""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
BUILD = Path(__file__).resolve().parent.parent / "build" / "bench"
CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
# Words for made-up prompts and stand-in text ("the" twice: it is that common).
WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "of",
    "a",
    "quiet",
    "river",
    "sing",
    "to",
    "her",
    "brother",
    "by",
    "the",
    "green",
    "hill",
]


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls (the machine is noisy: report the median and spread)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times)}


def machine() -> dict[str, Any]:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    from llmkit.hardware import cpu_bf16

    bf16 = cpu_bf16()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "kernel_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bf16.native,
        "native_bf16_why": bf16.reason,
    }


def describe_machine() -> str:
    """One line for the top of every benchmark's output: results depend on it."""
    m = machine()
    return (
        f"machine: {m['cpu']}, {m['cores']} CPUs, torch {m['torch']} ({m['torch_threads']} threads, "
        f"{m['kernel_capability']}), native bf16: {'yes' if m['native_bf16'] else 'no'} "
        f"({m['native_bf16_why']})"
    )


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    return path


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)


def gpt2_small(path: Path = BUILD / "gpt2-small-shape") -> Path:
    """GPT-2 small's exact shape (124M parameters, vocab 50257, context 1024), random weights.

    The tokenizer is a byte-level BPE trained on the shared corpus, padded with inert tokens to
    GPT-2's 50,257 so that every id the model can produce decodes.
    """
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.bpe import train_bpe

    tokenizer = train_bpe([corpus_text()], vocab_size=8192)
    tokenizer.add_tokens([f"<unused{i}>" for i in range(50257 - len(tokenizer))])
    assert len(tokenizer) == 50257
    torch.manual_seed(0)
    config = GPT2Config(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def corpus_text() -> str:
    """The shared corpus, or (on a machine without ../shared, such as a lent GPU box) stand-in text."""
    if CORPUS.is_file():
        return CORPUS.read_text(encoding="utf-8")
    import random

    rng = random.Random(0)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(100_000))


def python() -> str:
    return sys.executable
