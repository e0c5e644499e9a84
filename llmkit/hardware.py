"""What the machine computes natively, and how torch's CPU threads behave on it: the one place
precision and thread defaults are decided from.

The CPUs this project runs on differ from session to session (a Xeon without bf16, an EPYC with
avx512_bf16), so defaults come from what torch reports, never from what one machine did.
`LLMKIT_CPU_BF16=0|1` overrides the answer (tests, and users who know better).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "LLMKIT_CPU_BF16"
WAIT_POLICY = "OMP_WAIT_POLICY"


def thread_environment(threads: int | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set before torch starts its OpenMP threads.

    OpenMP threads spin while they wait for each other at the end of every parallel operator; when
    another process holds a core, the thread on it runs part of the time and the spinning ones
    wait for it, burning the other cores. Waiting passively (sleeping) measured 19x the decoding
    speed of spinning on a shared 2-core machine, and beat one thread too (bench/busy_cpu.py), so
    that is the default unless the user chose a policy. `threads` (--threads) caps the threads.
    """
    env = {}
    if WAIT_POLICY not in environ:
        env[WAIT_POLICY] = "PASSIVE"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


_SET_HERE: set[str] = set()  # the variables apply_threads chose (not the user's)


def apply_threads(threads: int | None) -> str:
    """Put `thread_environment` in place (torch imported already gets set_num_threads); says what."""
    chosen = thread_environment(threads, os.environ)
    _SET_HERE.update(chosen)
    os.environ.update(chosen)
    torch = sys.modules.get("torch")
    if threads is not None and torch is not None:
        torch.set_num_threads(threads)
    count = f"{threads} thread{'s' if threads != 1 else ''}" if threads else "a thread per core"
    return f"CPU: {count}, {WAIT_POLICY}={os.environ[WAIT_POLICY]}"


def spin_for_llama_cpp(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Give OpenMP its default waiting (spin a while, then sleep) back, for llama.cpp's threads.

    llama.cpp's CPU backend runs each token's graph as one OpenMP region and synchronises inside it
    with barriers of its own that spin whatever OpenMP is told; sleeping between regions then only
    adds a wake-up to every token: passive waiting halved its decoding speed on a 2-core EPYC (f16
    GPT-2 small 40 → 80 tokens/s). Only a policy llmkit chose is taken back, and only before torch
    (whose libgomp llama.cpp shares) has started OpenMP; returns whether it was.
    """
    if WAIT_POLICY not in _SET_HERE or "torch" in sys.modules or WAIT_POLICY not in environ:
        return False
    del environ[WAIT_POLICY]
    _SET_HERE.discard(WAIT_POLICY)
    return True


@dataclass(frozen=True)
class Bf16Support:
    """Whether bfloat16 arithmetic runs natively, and the reason in words for `-v` and `info`."""

    native: bool
    reason: str


def cpu_bf16() -> Bf16Support:
    """bf16 is native on a CPU with avx512_bf16 or AMX; elsewhere every bf16 product is converted first."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "1", "false", "true", "no", "yes"):
        native = forced in ("1", "true", "yes")
        return Bf16Support(native, f"{ENV}={forced}")
    import torch

    features = []
    if torch.cpu._is_avx512_bf16_supported():
        features.append("avx512_bf16")
    if torch.cpu._is_amx_tile_supported():
        features.append("AMX")
    if features:
        return Bf16Support(True, f"the CPU has {' and '.join(features)}")
    return Bf16Support(False, "the CPU has no native bf16 (no avx512_bf16 or AMX)")


def auto_dtype(device_type: str) -> tuple[str, str]:
    """(dtype name, why) for `--dtype auto` on a device."""
    import torch

    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU supports bf16"
        return "float32", "the GPU has no bf16"
    if device_type == "cpu":
        bf16 = cpu_bf16()
        return ("bfloat16" if bf16.native else "float32"), bf16.reason
    return "float32", f"the default on {device_type}"


def auto_mixed_precision(device_type: str) -> tuple[str, str]:
    """(accelerate mixed-precision mode, why) for `--mixed-precision auto`."""
    dtype, why = auto_dtype(device_type)
    return ("bf16" if dtype == "bfloat16" else "no"), why
