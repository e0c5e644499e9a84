"""The engine's batched sampling draws exactly what one row at a time with torch.multinomial draws."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from llmkit.serve.sampling import Sampler, SamplingParams, pick_batch

VOCAB = 3000
KINDS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, logit_bias={7: 30.0}),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=20),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, typical_p=0.9),
    SamplingParams(temperature=1.0, logit_bias={3: 5.0, 11: -100.0}, min_tokens=2),
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.3),
]


def reference(params: SamplingParams, seed: int, steps: list[torch.Tensor], history: list[list[int]]) -> list:
    """One row the way the engine sampled before batching: processors, edits, warpers, multinomial."""
    sampler = Sampler(params, {0}, seed)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step, logits in enumerate(steps):
        context = torch.tensor([history[step]])
        scores = sampler.adjust(logits[None].clone(), context, step)
        if params.greedy:
            token = int(scores[0].argmax())
        else:
            warped = LogitsProcessorList(sampler.warpers)(context, scores)
            token = int(torch.multinomial(torch.softmax(warped[0], -1), 1, generator=generator))
        sampler.count(token)
        out.append(token)
    return out


@pytest.mark.parametrize("copies", [1, 4])
@pytest.mark.parametrize("inference", [False, True])  # the engine samples under inference_mode
def test_batched_sampling_equals_row_by_row_multinomial(copies: int, inference: bool) -> None:
    torch.manual_seed(0)
    params = KINDS * copies  # 4 copies: groups big enough to draw on threads
    seeds = list(range(100, 100 + len(params)))
    samplers = [Sampler(p, {0}, s) for p, s in zip(params, seeds, strict=True)]
    steps = [torch.randn(len(params), VOCAB) * 4 for _ in range(6)]
    histories: list[list[int]] = [[1, 2, 3] for _ in params]
    got: list[list[int]] = [[] for _ in params]
    contexts_at: list[list[list[int]]] = [[] for _ in params]
    for step, logits in enumerate(steps):
        for i in range(len(params)):
            contexts_at[i].append(list(histories[i]))
        before = logits.clone()
        contexts = [lambda i=i: torch.tensor([histories[i]]) for i in range(len(params))]
        with torch.inference_mode(inference):
            tokens = pick_batch(samplers, logits, contexts, [step] * len(params))
        assert torch.equal(logits, before)  # the raw logits stay as they were (logprobs read them)
        for i, token in enumerate(tokens):
            assert isinstance(token, int), token
            got[i].append(token)
            histories[i].append(token)
    for i, (p, seed) in enumerate(zip(params, seeds, strict=True)):
        expected = reference(p, seed, [s[i] for s in steps], contexts_at[i])
        assert got[i] == expected, (i, p)


def test_a_row_that_cannot_be_sampled_fails_alone() -> None:
    params = [SamplingParams(temperature=1.0) for _ in range(5)]
    samplers = [Sampler(p, {0}, s) for s, p in enumerate(params)]
    twins = [Sampler(p, {0}, s) for s, p in enumerate(params)]
    logits = torch.randn(5, VOCAB)
    logits[2, 5] = float("nan")
    tokens = pick_batch(samplers, logits, [lambda: torch.tensor([[1]])] * 5, [0] * 5)
    assert isinstance(tokens[2], ValueError)
    alone = [
        pick_batch([t], logits[i : i + 1], [lambda: torch.tensor([[1]])], [0])[0] for i, t in enumerate(twins)
    ]
    assert [t for i, t in enumerate(tokens) if i != 2] == [t for i, t in enumerate(alone) if i != 2]


def test_a_seeded_request_alone_samples_what_transformers_and_multinomial_do(tiny_model: Path) -> None:
    """Sent alone, a seeded request's tokens are a plain forward loop's with torch.multinomial."""
    from llmkit.config import LoadConfig
    from llmkit.models import load
    from llmkit.serve.engine import Engine

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = tok("The cat", add_special_tokens=False)["input_ids"]
    engine = Engine(load(LoadConfig(model=str(tiny_model))), max_batch=4)
    chunks = []
    done = threading.Event()

    def deliver(chunk) -> None:
        chunks.append(chunk)
        if chunk.finish_reason or chunk.error:
            done.set()

    params = SamplingParams(max_tokens=20, min_tokens=20, temperature=0.9, top_k=40)
    engine.start()
    try:
        engine.submit([engine.sequence(ids, params, deliver, seed=1234)])
        assert done.wait(60)
    finally:
        engine.stop()
    got = [t.id for c in chunks for t in c.tokens]
    generator = torch.Generator().manual_seed(1234)
    sampler = Sampler(params, set(), 0)
    context, expected = list(ids), []
    with torch.inference_mode():
        for _ in range(20):
            logits = model(torch.tensor([context])).logits[:, -1].float()
            logits[:, sorted(engine.eos_ids)] = float("-inf")  # min_tokens covers every step
            probs = torch.softmax(LogitsProcessorList(sampler.warpers)(None, logits)[0], -1)
            token = int(torch.multinomial(probs, 1, generator=generator))
            expected.append(token)
            context.append(token)
    assert got == expected


def test_incremental_text_is_the_whole_decode_at_every_token(tiny_model: Path) -> None:
    """Random ids split characters across tokens and make invalid UTF-8: still decode(ids[:n])."""
    from llmkit.serve.engine import IncrementalText

    tok = AutoTokenizer.from_pretrained(tiny_model)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    emoji = tok("ab 😀 é ☃ 漢字\n\n x", add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    sequences = [emoji] + [torch.randint(0, len(tok), (60,), generator=generator).tolist() for _ in range(5)]
    for ids in sequences:
        text = IncrementalText(decode)
        for n, token in enumerate(ids, start=1):
            assert text.add(token) == decode(ids[:n])
