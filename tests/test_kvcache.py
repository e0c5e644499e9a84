"""The serving engine's KV cache (spare columns instead of a copy per step) against transformers' own."""

from __future__ import annotations

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from llmkit.serve.kvcache import SPARE, new_cache


def decode(make_cache, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of 3 left-padded rows; after half the steps row 1 leaves and padding-only columns
    are trimmed, as the engine does. (stacked last-token logits of the rows kept, final keys of layer 0)"""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, 97, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :5] = 0  # rows 0 and 2 padded, row 1 not: trimming after row 1 leaves drops columns
    mask[2, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = [0, 1, 2]
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=make_cache())
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for step in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            positions = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones((len(keep), 1))], dim=1)
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache)
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
            if step == steps // 2:
                keep = [0, 2]
                cache.batch_select_indices(torch.tensor([0, 2]))
                mask = mask[[0, 2]]
                logits = [row[[0, 2]] for row in logits]
                first = int((mask.sum(0) > 0).nonzero()[0])
                assert first == 3
                for layer in cache.layers:
                    if hasattr(layer, "trim"):
                        layer.trim(first)
                    else:
                        layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
                mask = mask[:, first:]
    return torch.stack(logits), cache.layers[0].keys


def test_same_logits_as_dynamic_cache_through_growth_leaving_and_trimming() -> None:
    steps = 2 * SPARE + 5  # the buffers grow twice
    expected, expected_keys = decode(DynamicCache, steps)
    got, got_keys = decode(new_cache, steps)
    assert torch.equal(got, expected)
    assert torch.equal(got_keys, expected_keys)


def test_a_cache_built_from_tensors_holds_them_and_grows() -> None:
    keys, values = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    cache = new_cache([(keys, values)])
    layer = cache.layers[0]
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert cache.get_seq_length() == 5
    new_keys, new_values = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    got_keys, got_values = cache.update(new_keys, new_values, 0)
    assert torch.equal(got_keys, torch.cat([keys, new_keys], dim=2))
    assert torch.equal(got_values, torch.cat([values, new_values], dim=2))
