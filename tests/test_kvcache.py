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


def test_rows_join_and_leave_in_place_as_a_fresh_concatenation_would_hold_them() -> None:
    """add_rows/keep_rows write into the buffers they have (room for 8 rows) and hold exactly what
    the engine's old path built: both sides zero-padded on the left to the wider one, then concatenated;
    or the rows kept, in order."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    def pad(t: torch.Tensor, width: int) -> torch.Tensor:
        return torch.cat([t.new_zeros((*t.shape[:2], width - t.shape[2], t.shape[3])), t], dim=2)

    cache = new_cache([(rand(2, 4, 6, 8), rand(2, 4, 6, 8))], rows=8)
    layer = cache.layers[0]
    buffer = layer._k.data_ptr()
    expected_k, expected_v = layer.keys.clone(), layer.values.clone()
    for i, (rows, width) in enumerate(((1, 4), (2, 7), (1, 7))):  # narrower than the batch, as wide, wider
        if i == 2:  # the engine trims columns that are padding everywhere: room on the left
            layer.trim(2)
            expected_k, expected_v = expected_k[:, :, 2:], expected_v[:, :, 2:]
        keys, values = rand(rows, 4, width, 8), rand(rows, 4, width, 8)
        assert layer.can_add(rows, width)
        layer.add_rows(keys, values)
        full = max(expected_k.shape[2], width)
        expected_k = torch.cat([pad(expected_k, full), pad(keys, full)])
        expected_v = torch.cat([pad(expected_v, full), pad(values, full)])
        assert torch.equal(layer.keys, expected_k) and torch.equal(layer.values, expected_v)
        step_k, step_v = rand(len(expected_k), 4, 1, 8), rand(len(expected_k), 4, 1, 8)
        got_k, _ = cache.update(step_k, step_v, 0)  # a decoding step still appends to every row
        expected_k, expected_v = torch.cat([expected_k, step_k], 2), torch.cat([expected_v, step_v], 2)
        assert torch.equal(got_k, expected_k)
    assert layer._k.data_ptr() == buffer  # never reallocated
    cache.batch_select_indices(torch.tensor([0, 2, 5]))
    assert torch.equal(layer.keys, expected_k[[0, 2, 5]]) and torch.equal(layer.values, expected_v[[0, 2, 5]])
    assert not layer.can_add(6, 3) and layer.can_add(5, 3)  # 3 + 6 rows > 8
    assert not layer.can_add(1, layer._end + 1)  # wider than the columns up to the newest
