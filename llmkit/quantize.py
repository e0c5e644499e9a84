"""Int8 weights for CPU inference: torch's dynamic quantization (fbgemm, VNNI where the CPU has it).

Decoding one sequence reads every weight once per token, so on a CPU tokens/s is bound by memory
bandwidth; int8 weights read a quarter of float32's bytes. Activations are quantized on the fly,
per batch. GPT-2 keeps its projections in transformers' `Conv1D` (a transposed Linear), which torch's
quantizer doesn't know, so they become `nn.Linear` first.
"""

from __future__ import annotations

import warnings
from typing import Any

from llmkit.errors import LlmkitError


def _conv1d_to_linear(model: Any) -> None:
    from torch import nn
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
    import torch
    from torch import nn

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
