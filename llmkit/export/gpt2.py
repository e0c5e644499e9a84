"""GPT-2 in llama.cpp's terms: its metadata keys and tensor names (its converter's `conversion/gpt2.py`).

HF's GPT-2 keeps attention and MLP weights as Conv1D, (in, out): llama.cpp wants (out, in), like a
Linear, so those four are transposed. The causal-mask buffers are not weights and are left out.

The output matrix is tied to the token embeddings. llama.cpp's gpt2 loader falls back to
`token_embd.weight` when `output.weight` is missing only since March 2025 (ggml-org/llama.cpp PR
#12456, which also stopped its converter writing the copy); older builds — still inside some
llama-cpp-python, ollama and LM Studio installs — refuse such a file ("missing tensor
'output.weight'"). So the copy is written, as the converter did for two years: a file every
llama.cpp since GGUF's start loads, for the price of one more vocab x n_embd matrix on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llmkit.errors import ModelError

if TYPE_CHECKING:
    import gguf
    import numpy as np
    from transformers import PreTrainedModel

ARCH = "gpt2"
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias")
# llama.cpp's GELU is the tanh approximation; "gelu" (erf) differs from it by < 1e-3 per activation.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")


def check(config: Any, label: str) -> None:
    """Refuse the GPT-2 variants llama.cpp's gpt2 graph does not compute."""
    unsupported = []
    if config.activation_function not in ACTIVATIONS:
        unsupported.append(f"activation {config.activation_function}")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx")
    if not getattr(config, "scale_attn_weights", True):
        unsupported.append("unscaled attention (scale_attn_weights false)")
    if getattr(config, "add_cross_attention", False):
        unsupported.append("cross-attention")
    if unsupported:
        raise ModelError(
            f"{label}: llama.cpp's gpt2 architecture has no {', '.join(unsupported)}",
            "export a standard GPT-2 model (gelu, scaled attention)",
        )


def feed_forward_length(config: Any) -> int:
    return config.n_inner or 4 * config.n_embd


def context_length(config: Any) -> int:
    return config.n_positions


def add_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_block_count(config.n_layer)
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(feed_forward_length(config))
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def tensors(model: PreTrainedModel) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every tensor of the file, output last."""
    import gguf
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    state = model.state_dict()
    tied = state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    for hf_name, tensor in state.items():
        if hf_name.endswith(NOT_WEIGHTS) or hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"unexpected tensor {hf_name} in a GPT-2 model", "is this a standard GPT-2?")
        data = tensor.detach().to(torch.float32)
        if hf_name.endswith(CONV1D):
            data = data.T
        yield name, data.contiguous().numpy()
    output = state["transformer.wte.weight" if tied else "lm_head.weight"]
    yield "output.weight", output.detach().to(torch.float32).contiguous().numpy()
