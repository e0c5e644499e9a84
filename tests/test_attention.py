"""Attention over a float32 KV cache for half-precision models on the CPU (llmkit/attention.py), as
serve's engine uses it: the same attention as torch's half-precision SDPA up to one rounding of the
output, and the same model outputs step after step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmkit import attention
from llmkit.testing import build_tiny_family


def test_float32_kv_attention_is_half_precision_sdpa_up_to_one_rounding() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 2  # grouped-query attention: 4 query heads share 2 key heads
    for queries, keys in ((1, 37), (5, 5)):  # a decoding step, a prompt
        q = torch.randn(3, 4, queries, 16, generator=generator).bfloat16()
        k, v = (torch.randn(3, 2, keys, 16, generator=generator).bfloat16() for _ in range(2))
        mask = torch.ones(3, 1, queries, keys, dtype=torch.bool).tril(keys - queries)
        mask[0, ..., :3] = False  # a left-padded row
        theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
        ours, _ = attention.float32_kv_attention(module, q, k.float(), v.float(), mask, scaling=0.25)
        assert ours.dtype == torch.bfloat16 and ours.shape == theirs.shape
        # One bfloat16 rounding of values below 4 in magnitude is at most 2**-7 · 4.
        assert (ours.float() - theirs.float()).abs().max() <= 2**-5
        wrong, _ = attention.float32_kv_attention(module, q, k.float(), v.float(), mask, scaling=0.5)
        assert (wrong.float() - theirs.float()).abs().max() > 2**-5  # the comparison can fail


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_bf16_model_decodes_the_same_over_a_float32_cache(
    family: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    from llmkit.serve.kvcache import new_cache

    path = tiny_model if family == "gpt2" else build_tiny_family(tmp_path / family, family)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    monkeypatch.setenv(attention.ENV, "1")
    assert attention.use(ours, torch.device("cpu")) == torch.float32
    assert ours.config._attn_implementation == attention.NAME

    calls = []
    real = attention.float32_kv_attention

    def spy(*args, **kwargs):
        calls.append(args[2].dtype)  # the keys it was given
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "float32_kv_attention", spy)
    attention.register()
    ids = torch.tensor([[5, 17, 33, 8, 21, 40, 2]])
    with torch.inference_mode():
        a_cache, b_cache = DynamicCache(), new_cache(store=torch.float32)
        a = plain(input_ids=ids, cache=a_cache, use_cache=True).logits[:, -1]
        b = ours(input_ids=ids, cache=b_cache, use_cache=True).logits[:, -1]
        for _ in range(12):  # teacher-forced on the plain model's greedy tokens
            assert (a - b).abs().max() <= 0.05 * a.abs().max()
            token = a.argmax(-1, keepdim=True)
            a = plain(input_ids=token, cache=a_cache, use_cache=True).logits[:, -1]
            b = ours(input_ids=token, cache=b_cache, use_cache=True).logits[:, -1]
    assert calls and set(calls) == {torch.float32}
    assert b_cache.layers[0].keys.dtype == torch.float32
    attention.register()  # the real function again, for what runs after this test


def test_only_half_precision_cpu_models_on_sdpa_switch(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    cpu = torch.device("cpu")
    monkeypatch.setenv(attention.ENV, "1")
    full = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert attention.use(full, cpu) is None and full.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.bfloat16, attn_implementation="eager"
    )
    assert attention.use(eager, cpu) is None and eager.config._attn_implementation == "eager"
    half = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    monkeypatch.setenv(attention.ENV, "0")  # the measurement's answer, forced
    assert attention.use(half, cpu) is None and half.config._attn_implementation == "sdpa"


def test_the_engine_keeps_a_bf16_models_cache_in_float32(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from llmkit.config import LoadConfig
    from llmkit.models import load
    from llmkit.serve.engine import Engine
    from llmkit.serve.sampling import SamplingParams

    monkeypatch.setenv(attention.ENV, "1")
    engine = Engine(load(LoadConfig(model=str(tiny_model), dtype="bfloat16")), max_batch=4)
    assert engine.kv_dtype == torch.float32
    seen: list[torch.dtype] = []
    engine.after_step = lambda: seen.extend(
        layer.keys.dtype for layer in (engine._cache.layers if engine._cache else [])
    )
    done = threading.Event()
    texts: list[str] = []

    def deliver(chunk):
        texts.append(chunk.text)
        if chunk.finish_reason or chunk.error:
            assert chunk.error is None
            done.set()

    engine.start()
    try:
        ids = engine.tokenizer("The cat")["input_ids"]
        engine.submit([engine.sequence(ids, SamplingParams(max_tokens=8, min_tokens=8), deliver, seed=1)])
        assert done.wait(60)
    finally:
        engine.stop()
    assert seen and set(seen) == {torch.float32}
    assert "".join(texts)
