"""Perplexity with sliding windows, and per-line scores for filtering data.

Definition (pinned by tests): the text is one token stream, after the BOS token for a tokenizer that
puts one before text (Llama, Mistral, Gemma: then every text token is scored, the first given the BOS)
and with nothing before it otherwise (GPT-2: every token after the first is scored); each token is
scored exactly once; windows of `context` tokens advance by `stride`, and each window scores only the
tokens no earlier window scored. `--per-line` scores each line as such a text of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.config import PerplexityConfig
from llmkit.errors import InputError, UsageError
from llmkit.models import LoadedModel
from llmkit.special import bos_id, with_bos

if TYPE_CHECKING:
    import torch


@dataclass
class Score:
    """Summed negative log-likelihood over scored tokens, and the text's size in UTF-8 bytes."""

    nll_sum: float
    tokens: int
    bytes: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else float("nan")

    def __add__(self, other: Score) -> Score:
        return Score(self.nll_sum + other.nll_sum, self.tokens + other.tokens, self.bytes + other.bytes)

    def as_dict(self) -> dict[str, Any]:
        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "perplexity": finite(self.perplexity),
            "nll": finite(self.nll),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "bits_per_byte": finite(self.bits_per_byte),
        }


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window; scored positions are [first_scored, end).

    Needs stride < context, so each window starts before the first token it scores.
    """
    spans, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        end = min(begin + context, n_tokens)
        if end > prev_end:
            spans.append((begin, end, prev_end))
            prev_end = end
        begin += stride
    return spans


def resolve_window(lm: LoadedModel, cfg: PerplexityConfig) -> tuple[int, int]:
    context = cfg.context or lm.context
    if context > lm.context:
        raise UsageError(
            f"--context {context} exceeds the model's context of {lm.context}", f"use at most {lm.context}"
        )
    stride = cfg.stride or max(1, context // 2)
    if stride >= context:
        raise UsageError(
            f"--stride {stride} must be smaller than the window of {context} tokens",
            "windows must overlap by at least one token so every token is scored with context",
        )
    return context, stride


def score_ids(
    lm: LoadedModel,
    ids: torch.Tensor,
    context: int,
    stride: int,
    batch_size: int,
    on_window: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of a 1-D id tensor under the sliding-window definition."""
    spans = windows(int(ids.numel()), context, stride)
    full = [s for s in spans if s[1] - s[0] == context]
    ragged = [s for s in spans if s[1] - s[0] != context]
    total, count = 0.0, 0
    # Equal-length windows batch together; a short one (text shorter than a window) goes alone.
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in ragged]
    for group in groups:
        nll, n = _score_group(lm, ids, group)
        total, count = total + nll, count + n
        if on_window:
            for _ in group:
                on_window()
    return total, count


def _score_group(lm: LoadedModel, ids: torch.Tensor, group: list[tuple[int, int, int]]) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    batch = torch.stack([ids[b:e] for b, e, _ in group]).to(lm.device)
    with torch.inference_mode():
        logits = lm.model(input_ids=batch).logits[:, :-1].float()
    targets = batch[:, 1:].clone()
    for row, (b, _e, first) in enumerate(group):
        targets[row, : first - b - 1] = -100  # already scored by an earlier window
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(nll), int((targets != -100).sum())


def perplexity(
    lm: LoadedModel,
    id_chunks: Iterable[tuple[list[int], str]],
    cfg: PerplexityConfig,
    on_window: Callable[[], None] | None = None,
    label: str = "text",
) -> Score:
    """Score one text stream, given as (ids, text) pieces such as `tokens.iter_ids` yields."""
    import numpy as np
    import torch

    parts, n_bytes = [], 0
    bos = bos_id(lm.tokenizer)
    if bos is not None:
        parts.append(np.asarray([bos], dtype=np.int64))
    for chunk_ids, text in id_chunks:
        parts.append(np.asarray(chunk_ids, dtype=np.int64))
        n_bytes += len(text.encode("utf-8"))
    ids = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)
    if ids.numel() < 2:
        text_tokens = ids.numel() - (bos is not None)
        raise InputError(
            f"{label} has {text_tokens} token(s); perplexity needs at least {2 - (bos is not None)}",
            "pass a longer text",
        )
    context, stride = resolve_window(lm, cfg)
    nll, count = score_ids(lm, ids, context, stride, cfg.batch_size, on_window)
    return Score(nll, count, n_bytes)


def per_line(lm: LoadedModel, lines: Iterable[str], cfg: PerplexityConfig) -> Iterator[tuple[str, Score]]:
    """Each line scored as its own text (see the module's definition), batched with padding."""
    context, stride = resolve_window(lm, cfg)
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= cfg.batch_size:
            yield from _score_lines(lm, batch, context, stride)
            batch = []
    if batch:
        yield from _score_lines(lm, batch, context, stride)


def _score_lines(lm: LoadedModel, lines: list[str], context: int, stride: int) -> Iterator[tuple[str, Score]]:
    import torch

    encoded = [
        with_bos(lm.tokenizer, ids) for ids in lm.tokenizer(lines, add_special_tokens=False)["input_ids"]
    ]
    scores: dict[int, Score] = {}
    short = []
    for i, (line, ids) in enumerate(zip(lines, encoded, strict=True)):
        if len(ids) < 2:
            scores[i] = Score(0.0, 0, len(line.encode("utf-8")))
        elif len(ids) > context:
            # Too long for one window: score it with the sliding-window definition.
            nll, n = score_ids(lm, torch.tensor(ids), context, stride, 1)
            scores[i] = Score(nll, n, len(line.encode("utf-8")))
        else:
            short.append(i)
    if short:
        width = max(len(encoded[i]) for i in short)
        pad = lm.tokenizer.pad_token_id or 0
        batch = torch.tensor([encoded[i] + [pad] * (width - len(encoded[i])) for i in short])
        mask = torch.tensor([[1] * len(encoded[i]) + [0] * (width - len(encoded[i])) for i in short])
        with torch.inference_mode():
            logits = lm.model(input_ids=batch.to(lm.device), attention_mask=mask.to(lm.device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_nll = -logp.gather(-1, batch[:, 1:].to(lm.device).unsqueeze(-1)).squeeze(-1)
        token_nll = token_nll * mask[:, 1:].to(lm.device)
        for row, i in enumerate(short):
            scores[i] = Score(float(token_nll[row].sum()), len(encoded[i]) - 1, len(lines[i].encode("utf-8")))
    for i, line in enumerate(lines):
        yield line, scores[i]
