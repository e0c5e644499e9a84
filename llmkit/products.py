"""How float32 matrix products of a few rows run on the CPU: weight on the left or on the right.

A decoding step of a batch multiplies a few rows (one per sequence) by every weight. torch's CPU
BLAS (MKL) computes x·Wᵀ for 2–16 rows far below the memory bound on some CPUs: on a 2-core AVX2
EPYC, GPT-2 small's LM head took 51 ms for 4 rows as x·Wᵀ and 14 ms as (W·xᵀ)ᵀ, the same product
with the weight on the left (bench/decode_step.py shows it per machine). Which form is faster is
the BLAS's business and differs between CPUs, so it is measured once per process on the shape of a
GPT-2 projection at 4 and 16 rows (`weight_left_faster`, the one function tests replace) rather
than assumed. One row is a matrix-vector product (addmv), as fast there as torch's own.
"""

from __future__ import annotations

import os
import time
from functools import cache
from typing import Any

import torch  # imported only where a model is being prepared (serve's engine)
from torch import nn

ENV = "LLMKIT_WEIGHT_LEFT"


class WeightLeftLinear(nn.Module):
    """y = x·Wᵀ + b, computed as (W·xᵀ)ᵀ for two rows or more; W is [out, in] like nn.Linear's."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight  # the same Parameter as before where it was [out, in]: ties stay tied
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] < 2:
            v = flat[0]
            out1 = self.weight @ v if self.bias is None else torch.addmv(self.bias, self.weight, v)
            return out1.reshape(*x.shape[:-1], self.out_features)
        if self.bias is None:
            out = self.weight @ flat.T
        else:
            out = torch.addmm(self.bias[:, None], self.weight, flat.T)
        return out.T.reshape(*x.shape[:-1], self.out_features)  # a transposed view, no copy

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


def _time(product: Any, repeats: int = 5) -> float:
    product()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - started)
    return best


def weight_left_faster() -> bool:
    """Whether (W·xᵀ)ᵀ beats x·Wᵀ by 10% on this CPU; `LLMKIT_WEIGHT_LEFT=0|1` decides instead."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "1", "false", "true", "no", "yes"):
        return forced in ("1", "true", "yes")
    return _measured()


@cache
def _measured() -> bool:
    """4 and 16 rows times a 768→3072 weight both ways, best of 5 each (~50 ms, once per process)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 768, generator=generator)
    right = left = 0.0
    with torch.inference_mode():
        for rows in (4, 16):
            x = torch.randn(rows, 768, generator=generator)
            right += _time(lambda x=x: nn.functional.linear(x, weight))
            left += _time(lambda x=x: weight @ x.T)
    return left * 1.1 < right


def weight_left(model: Any, device: torch.device) -> int:
    """Float32 Linear and GPT-2 Conv1D layers of a CPU model as WeightLeftLinear where that is faster.

    Returns how many layers changed (0: not float32 on the CPU, or the BLAS is fine as it is).
    """
    from transformers.pytorch_utils import Conv1D

    if device.type != "cpu" or not weight_left_faster():
        return 0
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child)
            if kind not in (nn.Linear, Conv1D) or child.weight.dtype != torch.float32:
                continue
            if kind is Conv1D:  # [in, out]: stored transposed once, the old copy freed
                weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
            else:
                weight = child.weight
            setattr(parent, name, WeightLeftLinear(weight, child.bias))
            changed += 1
    return changed
