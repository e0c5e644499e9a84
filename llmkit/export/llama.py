"""Llama (and Mistral, which llama.cpp runs as `llama`) in llama.cpp's terms, as its converter's
`LlamaModel` writes them; `qwen2.py` reuses all of it.

llama.cpp applies rotary embeddings to adjacent pairs of each head (GPT-J style), transformers to its
two halves (GPT-NeoX style): the converter permutes the rows of the query and key projections (their
biases too, where there are any) so that the pairs llama.cpp rotates are the halves transformers did.
Keys have their own head count under grouped-query attention. Qwen2 is rotated the NeoX way in
llama.cpp too, so it is written unpermuted.

With tied embeddings `output.weight` is left out, as the converter does: llama.cpp's llama and qwen2
loaders have always fallen back to `token_embd.weight` for it (unlike its gpt2 loader, see gpt2.py).

Mistral's `sliding_window` is not written, as the converter doesn't: llama.cpp's llama graph attends
to the whole context, the same as transformers up to the window (4096 for Mistral 7B v0.1; later
releases have none).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gguf

from llmkit.errors import ModelError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel

MODEL_ARCH = gguf.MODEL_ARCH.LLAMA
ARCH = gguf.MODEL_ARCH_NAMES[MODEL_ARCH]
NOT_WEIGHTS = (".rotary_emb.inv_freq",)
PERMUTED = True
WRITES_TIED_OUTPUT = False


def check(config: Any, label: str, arch: str = ARCH) -> None:
    """Refuse what llama.cpp's graph for `arch` would compute differently from transformers."""
    unsupported = []
    if config.hidden_act != "silu":
        unsupported.append(f"activation {config.hidden_act}")
    rope_type = rope(config).get("rope_type", "default")
    if rope_type != "default":
        # linear, dynamic, yarn, llama3 each need the converter's scaling keys (or rope_freqs): not written
        unsupported.append(f"{rope_type} rope scaling")
    if getattr(config, "mlp_bias", False):
        unsupported.append("MLP biases")
    if unsupported:
        raise ModelError(
            f"{label}: llmkit's {arch} export has no {', '.join(unsupported)}",
            f"export a {arch} model with SiLU and plain rotary embeddings",
        )


def rope(config: Any) -> dict[str, Any]:
    """The rope parameters: `rope_parameters` in transformers 5, `rope_theta`/`rope_scaling` before."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def context_length(config: Any) -> int:
    return config.max_position_embeddings


def add_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope(config)["rope_theta"]))
    writer.add_rope_dimension_count(head_dim(config))
    # Read by llama.cpp where head_dim isn't hidden_size / heads (some Mistral and Qwen models).
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The converter's `LlamaModel.permute`: each head's two halves interleaved into pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(
    model: PreTrainedModel, model_arch: gguf.MODEL_ARCH = MODEL_ARCH, permuted: bool = PERMUTED
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every tensor of the file."""
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    state = model.state_dict()
    tied = state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    for hf_name, tensor in state.items():
        if hf_name.endswith(NOT_WEIGHTS) or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(
                f"unexpected tensor {hf_name} in a {gguf.MODEL_ARCH_NAMES[model_arch]} model",
                "is this a standard model of its family?",
            )
        data = tensor.detach().to(torch.float32)
        if permuted and ".self_attn.q_proj." in hf_name:
            data = permute(data, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            data = permute(data, kv_heads(config))
        yield name, data.contiguous().numpy()
