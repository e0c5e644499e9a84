"""Serve's few-row products with the weight on the left (llmkit/products.py): same numbers, tied weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn


def test_weight_left_linear_equals_linear_and_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    from llmkit.products import WeightLeftLinear

    torch.manual_seed(0)
    linear, conv, bare = nn.Linear(24, 40), Conv1D(40, 24), nn.Linear(24, 40, bias=False)
    cases = [
        (linear, WeightLeftLinear(linear.weight, linear.bias)),
        (conv, WeightLeftLinear(nn.Parameter(conv.weight.t().contiguous()), conv.bias)),
        (bare, WeightLeftLinear(bare.weight, None)),
    ]
    for shape in [(1, 24), (1, 1, 24), (3, 24), (2, 5, 24), (7, 1, 24)]:
        x = torch.randn(shape)
        for before, after in cases:
            got = after(x)
            assert got.shape == before(x).shape
            torch.testing.assert_close(got, before(x), rtol=1e-5, atol=1e-6)


def test_weight_left_model_keeps_ties_and_logits(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from llmkit.products import WeightLeftLinear, weight_left

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model = copy.deepcopy(base)
    assert weight_left(model, torch.device("cpu")) == 4 * base.config.n_layer + 1
    assert isinstance(model.lm_head, WeightLeftLinear)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied: no second copy
    ids = torch.randint(0, base.config.vocab_size, (3, 9))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(ids[:1, :1]).logits, base(ids[:1, :1]).logits, rtol=1e-4, atol=1e-5)

    monkeypatch.setenv("LLMKIT_WEIGHT_LEFT", "0")
    assert weight_left(copy.deepcopy(base), torch.device("cpu")) == 0
    monkeypatch.setenv("LLMKIT_WEIGHT_LEFT", "1")
    assert weight_left(copy.deepcopy(base).to(torch.bfloat16), torch.device("cpu")) == 0  # float32 only
    assert weight_left(copy.deepcopy(base), torch.device("meta")) == 0  # the CPU's BLAS only


def test_the_choice_is_measured_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmkit import products

    real = products._measured.__wrapped__
    calls = []
    monkeypatch.setattr(products, "_measured", lambda: calls.append(1) or False)
    monkeypatch.delenv("LLMKIT_WEIGHT_LEFT")
    assert products.weight_left_faster() is False and calls == [1]
    monkeypatch.setenv("LLMKIT_WEIGHT_LEFT", "yes")
    assert products.weight_left_faster() is True and calls == [1]
    assert isinstance(real(), bool)  # the real probe runs (its answer is the CPU's)


def test_one_row_head_gives_the_same_logits_and_keeps_the_tie(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from llmkit.products import OneRowHead, one_row_head, weight_left

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model = copy.deepcopy(base)
    assert one_row_head(model, torch.device("cpu"))
    assert isinstance(model.lm_head, OneRowHead) and model.lm_head.weight is model.transformer.wte.weight
    assert not one_row_head(model, torch.device("cpu"))  # once
    ids = torch.randint(0, base.config.vocab_size, (2, 7))
    with torch.inference_mode():
        for batch in (ids[:1], ids):  # one row (the copy) and two (the tied weight)
            got, want = model(batch, logits_to_keep=1).logits, base(batch, logits_to_keep=1).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        greedy = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(ids[:1], **greedy), base.generate(ids[:1], **greedy))

    # serve's engine: the copy for one row, the weight on the left for more.
    assert (
        weight_left(model, torch.device("cpu")) == 4 * base.config.n_layer + 1 and model.lm_head.weight_left
    )
    with torch.inference_mode():
        for batch in (ids[:1], ids):
            got, want = model(batch).logits, base(batch).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    monkeypatch.setenv("LLMKIT_ONE_ROW_HEAD", "0")
    assert not one_row_head(copy.deepcopy(base), torch.device("cpu"))
    monkeypatch.delenv("LLMKIT_ONE_ROW_HEAD")
    measured = copy.deepcopy(base)  # decided by timing the model's own head: either answer is right
    assert one_row_head(measured, torch.device("cpu")) == isinstance(measured.lm_head, OneRowHead)
    monkeypatch.setenv("LLMKIT_ONE_ROW_HEAD", "1")
    assert not one_row_head(copy.deepcopy(base).to(torch.bfloat16), torch.device("cpu"))
