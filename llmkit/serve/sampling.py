"""One request's sampling settings, and one row of logits turned into a token with them.

Penalties and warpers are transformers' own logits processors, built once per sequence; OpenAI's
presence/frequency penalties and logit_bias have no processor there and are three lines here.
"""

from __future__ import annotations

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
        edits = p.presence_penalty or p.frequency_penalty or p.logit_bias or generated < p.min_tokens
        if edits and scores is logits:
            scores = scores.clone()  # the row is a view of the whole batch's logits: edit a copy
        if p.presence_penalty or p.frequency_penalty:
            for token, count in self.counts.items():
                scores[0, token] -= p.presence_penalty + p.frequency_penalty * count
        if p.logit_bias:
            scores[0].index_add_(0, self.bias_ids, self.bias_values)
        if generated < p.min_tokens and self.eos_ids:
            scores[0, self.eos_ids] = float("-inf")
        return scores

    def pick(self, scores: torch.Tensor, context: torch.Tensor | None) -> int:
        import torch

        if self.params.greedy:
            token = int(scores[0].argmax())
        else:
            warped = self.warpers(context, scores) if self.warpers else scores
            probs = torch.softmax(warped[0], dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.counts[token] = self.counts.get(token, 0) + 1
        return token
