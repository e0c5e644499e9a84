"""Int8 and int4 weights for CPU inference. int8: torch's dynamic quantization (fbgemm, VNNI where
the CPU has it); int4: weight-only, groups of 32, torch's CPU int4 kernel.

Decoding one sequence reads every weight once per token, so on a CPU tokens/s is bound by memory
bandwidth; int8 weights read a quarter of float32's bytes. Activations are quantized on the fly,
per batch. GPT-2 keeps its projections in transformers' `Conv1D` (a transposed Linear), which torch's
quantizer doesn't know, so they become `nn.Linear` first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch  # imported only when a model is being quantized (inside models.load)
from torch import nn

from llmkit.errors import LlmkitError


def _conv1d_to_linear(model: Any) -> None:
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                nx, nf = child.weight.shape
                linear = nn.Linear(nx, nf, dtype=child.weight.dtype)
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(parent, name, linear)


def int8_dynamic(model: Any) -> Any:
    """The float32 model with every Linear layer (the LM head included) in int8; embeddings stay."""
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None or "fbgemm" not in torch.backends.quantized.supported_engines:
        raise LlmkitError(
            f"--quantize int8 needs torch's dynamic quantization with fbgemm, which torch "
            f"{torch.__version__} lacks",
            "drop --quantize, or install a torch build that has it (x86 CPU builds up to 2.13 do)",
        )
    _conv1d_to_linear(model)
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        # torch.ao's quantization APIs announce their move to torchao on every call.
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


# Groups of 32 input weights share a scale and an offset (llama.cpp's q4_0 uses blocks of 32 too).
INT4_GROUP = 32


class Int4Linear(nn.Module):
    """y = x·Wᵀ + b with W in 4 bits, per group: w = (q - 8)·scale + zero (torch's CPU kernel).

    The kernel is fast only with bf16 inputs, so the input is cast at the product and the output
    cast back: norms, attention and the residual stream stay float32.
    """

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.group = group
        w = nn.functional.pad(w, (0, 0, 0, -self.out_features % 16))  # the kernel packs 16 rows at a time
        groups = w.reshape(w.shape[0], self.in_features // group, group)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.clamp(torch.round((groups - low) / scale), 0, 15).to(torch.int32).reshape(w.shape)
        zero = low + 8 * scale
        scales_zeros = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], -1)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16).contiguous())
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros)
        y = y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"
        )


class F16Linear(nn.Module):
    """y = x·Wᵀ + b with W stored in float16 and everything around the product in float32.

    One-row products read the weights once each: half the bytes of float32 is what buys the speed,
    and the CPU's one-row f16 product (oneDNN) is twice as fast as its bf16 one on the CPUs measured.
    Norms, attention and the residual stream stay float32, so the model is closer to float32 than a
    bf16 model is.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.float16))
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        )
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(torch.float16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 weights"


def _replace_linears(model: Any, make: Callable[[nn.Linear], nn.Module | None]) -> None:
    """Every Linear layer (GPT-2's Conv1D ones first made Linear) replaced by `make(layer)`, except
    those it returns None for."""
    _conv1d_to_linear(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (replacement := make(child)) is not None:
                setattr(parent, name, replacement)


def int4_weight_only(model: Any, group: int = INT4_GROUP) -> Any:
    """The float32 model with every Linear layer whose inputs split into groups (the LM head too) in
    4 bits; a layer whose inputs don't split into groups stays float32."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        raise LlmkitError(
            f"--quantize int4 needs torch's CPU int4 kernel, which torch {torch.__version__} lacks",
            "drop --quantize or use --quantize int8",
        )
    _replace_linears(model, lambda layer: None if layer.in_features % group else Int4Linear(layer, group))
    return model


def f16_weights(model: Any) -> Any:
    """The float32 model with every Linear layer's weight (the LM head's too) stored in float16."""
    _replace_linears(model, F16Linear)
    return model
