"""What the machine computes natively: the one place precision defaults are decided from.

The CPUs this project runs on differ from session to session (a Xeon without bf16, an EPYC with
avx512_bf16), so defaults come from what torch reports, never from what one machine did.
`LLMKIT_CPU_BF16=0|1` overrides the answer (tests, and users who know better).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "LLMKIT_CPU_BF16"


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
