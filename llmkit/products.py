"""How float32 matrix products of a few rows run on the CPU: weight on the left or on the right.

A decoding step of a batch multiplies a few rows (one per sequence) by every weight. torch's CPU
BLAS (MKL) computes x·Wᵀ for 2–16 rows far below the memory bound on some CPUs: on a 2-core AVX2
EPYC, GPT-2 small's LM head took 51 ms for 4 rows as x·Wᵀ and 14 ms as (W·xᵀ)ᵀ, the same product
with the weight on the left (bench/serve_step.py measures what it gives per machine). Which form is faster is
the BLAS's business and differs between CPUs, so it is measured once per process on the shape of a
GPT-2 projection at 4 and 16 rows (`weight_left_faster`, the one function tests replace) rather
than assumed. One row is a matrix-vector product (addmv), as fast there as torch's own.
"""

from __future__ import annotations

import os
import time
from functools import cache
from typing import Any

import torch  # imported only where a model is being prepared for decoding (generate, chat, serve)
from torch import nn

ENV = "LLMKIT_WEIGHT_LEFT"
HEAD_ENV = "LLMKIT_ONE_ROW_HEAD"


class WeightLeftLinear(nn.Module):
    """y = x·Wᵀ + b, computed as (W·xᵀ)ᵀ for two rows or more; W is [out, in] like nn.Linear's."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight  # the same Parameter as before where it was [out, in]: ties stay tied
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _weight_left(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


def _weight_left(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 1:
        v = flat[0]
        one = weight @ v if bias is None else torch.addmv(bias, weight, v)
        return one.reshape(*x.shape[:-1], weight.shape[0])
    out = weight @ flat.T if bias is None else torch.addmm(bias[:, None], weight, flat.T)
    return out.T.reshape(*x.shape[:-1], weight.shape[0])  # a transposed view, no copy


def _time(product: Any, repeats: int = 5) -> float:
    product()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - started)
    return best


def _forced(name: str) -> bool | None:
    """What an `0|1` (false/true, no/yes) override in the environment says; None: measure."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    return None


def weight_left_faster() -> bool:
    """Whether (W·xᵀ)ᵀ beats x·Wᵀ by 10% on this CPU; `LLMKIT_WEIGHT_LEFT=0|1` decides instead."""
    forced = _forced(ENV)
    return _measured() if forced is None else forced


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
            if kind is OneRowHead and child.weight.dtype == torch.float32:
                child.weight_left = True
                changed += 1
                continue
            if kind not in (nn.Linear, Conv1D) or child.weight.dtype != torch.float32:
                continue
            if kind is Conv1D:  # [in, out]: stored transposed once, the old copy freed
                weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
            else:
                weight = child.weight
            setattr(parent, name, WeightLeftLinear(weight, child.bias))
            changed += 1
    return changed


class OneRowHead(nn.Module):
    """An LM head [vocab, hidden] that multiplies one row by a copy stored transposed, [hidden, vocab].

    Batch-1 decoding multiplies one row by the whole head, the largest weight of a small model: on the
    EPYCs measured, x·W from the transposed copy ran 1.5–1.7× faster than torch's x·Wᵀ (GPT-2 small:
    11 ms against 17). More rows keep the original (still tied to the embeddings). The copy is not
    updated: for models that only decode from here on (generate, chat), never one being trained.
    """

    def __init__(self, head: nn.Linear, transposed: torch.Tensor) -> None:
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.register_buffer("transposed", transposed, persistent=False)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight_left = False  # more rows as WeightLeftLinear does (set by `weight_left`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:
            if self.weight_left:
                return _weight_left(x, self.weight, self.bias)
            return nn.functional.linear(x, self.weight, self.bias)
        y = x.reshape(1, -1) @ self.transposed
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def one_row_head(model: Any, device: torch.device) -> bool:
    """Give a float32 CPU model's LM head the transposed copy, if it measures faster on its own weight.

    Costs the head's size in memory again (154 MB for GPT-2 small) and ~0.2 s at start to copy and
    decide (GPT-2 small on the AVX2 EPYC: it pays for itself after ~30 tokens); done once.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if device.type != "cpu" or type(head) is not nn.Linear or head.weight.dtype != torch.float32:
        return False
    forced = _forced(HEAD_ENV)
    if forced is False:
        return False
    with torch.inference_mode():
        # Transposed a block of rows at a time: twice as fast as one strided copy of the whole head.
        transposed = torch.cat([rows.t() for rows in head.weight.detach().split(512)], 1)
        if forced is None:
            x = torch.randn(1, head.in_features)
            ordinary = _time(lambda: nn.functional.linear(x, head.weight), 2)
            if _time(lambda: x @ transposed, 2) * 1.1 >= ordinary:
                return False
    model.set_output_embeddings(OneRowHead(head, transposed))
    return True
