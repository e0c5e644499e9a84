"""One request's sampling settings, and one row of logits turned into a token with them.

Penalties and warpers are transformers' own logits processors, built once per sequence; OpenAI's
presence/frequency penalties and logit_bias have no processor there and are three lines here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmkit.config import is_greedy

if TYPE_CHECKING:
    import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    """Alternatives per token to report (0–5); None: no logprobs."""
    echo: bool = False

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)


class Sampler:
    """Samples one sequence's next token; owns its RNG so a seeded request repeats alone or in a batch."""

    def __init__(self, params: SamplingParams, eos_ids: set[int], seed: int) -> None:
        import torch
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
            TypicalLogitsWarper,
        )

        self.params = params
        self.eos_ids = sorted(eos_ids)
        self.generator = torch.Generator().manual_seed(seed % 2**64)  # torch's own reading of negatives
        processors: list[Any] = []
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        warpers: list[Any] = []
        if not params.greedy:
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
            if params.min_p:
                warpers.append(MinPLogitsWarper(params.min_p))
            if params.typical_p is not None and params.typical_p < 1.0:
                warpers.append(TypicalLogitsWarper(params.typical_p))
        self.processors = LogitsProcessorList(processors)
        self.warpers = LogitsProcessorList(warpers)
        self.counts: dict[int, int] = {}
        # One indexed add per step, however many tokens the bias names.
        self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)

    def adjust(self, logits: torch.Tensor, context: torch.Tensor | None, generated: int) -> torch.Tensor:
        """Penalties, bias and min_tokens on one row [1, vocab] (float32) given the ids so far [1, n]."""
        p = self.params
        scores = self.processors(context, logits) if self.processors else logits
        edits = p.presence_penalty or p.frequency_penalty or self.edits(generated)
        if edits and scores is logits:
            scores = scores.clone()  # the row is a view of the whole batch's logits: edit a copy
        if p.presence_penalty or p.frequency_penalty:
            for token, count in self.counts.items():
                scores[0, token] -= p.presence_penalty + p.frequency_penalty * count
        self.edit(scores[0], generated)
        return scores

    def edit(self, row: torch.Tensor, generated: int) -> None:
        """logit_bias and min_tokens on this row [vocab] of a batch's own copy, in place."""
        p = self.params
        if p.logit_bias:
            row.index_add_(0, self.bias_ids, self.bias_values)
        if generated < p.min_tokens and self.eos_ids:
            row[self.eos_ids] = float("-inf")

    def edits(self, generated: int) -> bool:
        p = self.params
        return bool(p.logit_bias) or (generated < p.min_tokens and bool(self.eos_ids))

    @property
    def shares_a_batch(self) -> bool:
        """Rows without penalties over their own history can be sampled together with their kind."""
        p = self.params
        return not self.processors and not p.presence_penalty and not p.frequency_penalty

    def kind(self) -> tuple:
        """Rows of one kind go through the same warpers, so one batched call serves them all."""
        p = self.params
        if p.greedy:
            return ("greedy",)
        return ("sample", p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p)

    def pick(self, scores: torch.Tensor, context: torch.Tensor | None) -> int:
        if self.params.greedy:
            token = int(scores[0].argmax())
        else:
            warped = self.warpers(context, scores) if self.warpers else scores
            token = draw_rows([self], softmax_rows(warped), [True])[0]
            assert isinstance(token, int)
        self.count(token)
        return token

    def count(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1


UNSAMPLEABLE = "probability tensor contains either `inf`, `nan` or element < 0"


def softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Probabilities of each row [rows, vocab]; a row that can't be sampled raises, as multinomial does."""
    import torch

    probs = torch.softmax(scores, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(UNSAMPLEABLE)
    return probs


# Drawing 50,257 exponentials is a row's main sampling cost and runs on one core; rows draw from
# generators of their own, so threads can draw several rows at once (torch releases the GIL).
PARALLEL_DRAWS_FROM = 4
_pool: Any = None


def draw_rows(samplers: list[Sampler], probs: torch.Tensor, finite: list[bool]) -> list[int | Exception]:
    """`torch.multinomial(probs[j], 1, generator)` for each row, the way torch computes one sample.

    torch draws q ~ Exp(1) for every token from the generator and takes argmax(p / q) (the Gumbel
    trick, ATen's fast path for one sample); done here so a batch of rows shares the division and
    the argmax while each row still draws from its own generator: the same token for the same seed,
    alone or in any batch.
    """
    global _pool
    import torch

    q = torch.ones_like(probs)
    inference = torch.is_inference_mode_enabled()  # thread-local: the pool's threads need it too

    def fill(j: int) -> None:
        if finite[j]:
            with torch.inference_mode(inference):
                q[j].exponential_(1, generator=samplers[j].generator)

    if len(samplers) >= PARALLEL_DRAWS_FROM and torch.get_num_threads() > 1:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="llmkit-draw")
        list(_pool.map(fill, range(len(samplers))))
    else:
        for j in range(len(samplers)):
            fill(j)
    tokens = (probs / q).argmax(-1).tolist()
    return [tokens[j] if finite[j] else ValueError(UNSAMPLEABLE) for j in range(len(samplers))]


def pick_batch(
    samplers: list[Sampler],
    logits: torch.Tensor,
    contexts: list[Callable[[], torch.Tensor]],
    generated: list[int],
) -> list[int | Exception]:
    """The next token of every row [rows, vocab] (float32, not edited), or the exception of that row.

    Rows of one kind (greedy, or the same temperature/top-k/top-p/min-p/typical-p) without penalties
    over their own history are warped, normalised and compared in one batched call; each still draws
    from its own generator. The others, and any group whose batched call fails, go row by row, so a
    row that can't be sampled fails alone.
    """
    import torch

    results: list[int | Exception] = [0] * len(samplers)
    groups: dict[tuple, list[int]] = {}
    alone: list[int] = []
    for i, sampler in enumerate(samplers):
        if sampler.shares_a_batch:
            groups.setdefault(sampler.kind(), []).append(i)
        else:
            alone.append(i)
    for kind, rows in groups.items():
        if len(rows) == 1:
            alone.extend(rows)
            continue
        try:  # nothing drawn yet: on failure the row-by-row path starts these rows afresh
            edited = [i for i in rows if samplers[i].edits(generated[i])]
            scores = logits[rows] if len(rows) < len(samplers) or edited else logits
            for j, i in enumerate(rows):
                if i in edited:
                    samplers[i].edit(scores[j], generated[i])
            if kind[0] == "greedy":
                tokens: list[int | Exception] = list(scores.argmax(-1).tolist())
            else:
                warpers = samplers[rows[0]].warpers
                probs = torch.softmax(warpers(None, scores) if warpers else scores, dim=-1)
                finite = torch.isfinite(probs).all(-1).tolist()
        except Exception:
            alone.extend(rows)
            continue
        if kind[0] != "greedy":
            tokens = draw_rows([samplers[i] for i in rows], probs, finite)
        for i, token in zip(rows, tokens, strict=True):
            if isinstance(token, int):
                samplers[i].count(token)
            results[i] = token
    for i in alone:
        sampler = samplers[i]
        try:
            context = contexts[i]() if sampler.processors else None  # warpers never read the ids
            results[i] = sampler.pick(sampler.adjust(logits[i : i + 1], context, generated[i]), context)
        except Exception as exc:
            results[i] = exc
    return results
