"""Qwen2 in llama.cpp's terms, as its converter's `Qwen2Model` writes it: Llama's keys and layout
(llama.py), with query/key/value biases and no permutation (llama.cpp rotates qwen2 the NeoX way, as
transformers does)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gguf

from llmkit.errors import ModelError
from llmkit.export import llama
from llmkit.export.llama import NOT_WEIGHTS, WRITES_TIED_OUTPUT, add_metadata, context_length

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedModel

__all__ = ["ARCH", "NOT_WEIGHTS", "WRITES_TIED_OUTPUT", "add_metadata", "check", "context_length", "tensors"]

MODEL_ARCH = gguf.MODEL_ARCH.QWEN2
ARCH = gguf.MODEL_ARCH_NAMES[MODEL_ARCH]


def check(config: Any, label: str) -> None:
    if getattr(config, "use_sliding_window", False):
        raise ModelError(
            f"{label}: llama.cpp's qwen2 architecture has no sliding-window attention",
            "export a Qwen2 model with use_sliding_window false (as the released ones are)",
        )
    llama.check(config, label, ARCH)


def tensors(model: PreTrainedModel) -> Iterator[tuple[str, np.ndarray]]:
    return llama.tensors(model, MODEL_ARCH, permuted=False)
