"""`Generator` with llama.cpp computing the logits: the same prompts, budgets, records and streaming
(generation.py), and the same transformers logits processors and draws as `generate` makes.

transformers' `generate` samples with `torch.multinomial` over the softmax of the processed float32
scores, from the global generator that `Generator.run` seeds; this loop does the same per token, so
greedy text at f32 is the torch engine's and a seeded run is reproducible. Sequences decode one at a
time (llama.cpp's batch is one sequence here): `--input` files run prompt after prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.config import GenerateConfig
from llmkit.generation import Generator, _Encoded, find_stop
from llmkit.llamacpp.runtime import LlamaCpp
from llmkit.models import context_length

if TYPE_CHECKING:
    import torch


@dataclass
class Frame:
    """What `Generator` reads of a loaded model when no torch model is loaded: its config and
    generation config (for end-of-text), its tokenizer, its device."""

    model: Any  # .config and .generation_config
    tokenizer: Any
    device: Any

    @property
    def context(self) -> int:
        return context_length(self.model.config)


class LlamaCppGenerator(Generator):
    def __init__(self, frame: Frame, runtime: LlamaCpp | None, cfg: GenerateConfig, **kwargs: Any) -> None:
        super().__init__(frame, cfg, **kwargs)  # type: ignore[arg-type]
        self.runtime = runtime  # None until the caller has one: the options are checked first

    def processors(self) -> Any:
        """transformers' processors for these options, in the order `generate` applies them.

        All but `MinNewTokensLengthLogitsProcessor`: the decoding loop masks end-of-text itself while
        it applies (the same scores: -inf stays -inf through every later processor), because that
        processor's full-vocabulary `isin` was a third of a millisecond per token for GPT-2 small.
        """
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
            TypicalLogitsWarper,
        )

        cfg, out = self.cfg, LogitsProcessorList()
        if cfg.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(penalty=cfg.repetition_penalty))
        if cfg.no_repeat_ngram_size > 0:
            out.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
        if cfg.do_sample:
            if cfg.temperature != 1.0:
                out.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k:
                out.append(TopKLogitsWarper(top_k=cfg.top_k))
            if cfg.top_p < 1.0:
                out.append(TopPLogitsWarper(top_p=cfg.top_p))
            if cfg.min_p is not None:
                out.append(MinPLogitsWarper(min_p=cfg.min_p))
            if cfg.typical_p is not None and cfg.typical_p < 1.0:
                out.append(TypicalLogitsWarper(mass=cfg.typical_p))
        return out

    def _generate_batch(self, batch: list[_Encoded], streamer: Any = None) -> list[list[Any]]:
        if streamer is None and self.time_first_token:
            from llmkit.generation import _FirstToken

            streamer = _FirstToken(self)
        results = []
        for enc in batch:
            samples = []
            for s in range(self.cfg.num_samples):
                started = time.perf_counter()
                row = self._decode_one(enc, streamer)
                samples.append(self._finish(enc, row, s, round(time.perf_counter() - started, 4)))
            results.append(samples)
        return results

    def _decode_one(self, enc: _Encoded, streamer: Any) -> list[int]:
        import torch

        assert self.runtime is not None, "give the generator its runtime before decoding"
        processors = self.processors()
        eos = sorted(self.eos_ids)
        ids = torch.tensor([enc.ids])
        if streamer is not None:
            streamer.put(ids)
        logits = self.runtime.start(enc.ids)
        row: list[int] = []
        while True:
            if len(row) < self.cfg.min_new_tokens and eos:
                logits[eos] = float("-inf")
            token = self._pick(processors, ids, logits)
            row.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in self.eos_ids or len(row) >= enc.budget or self._stopped(row):
                break
            if processors:  # only processors read the sequence so far
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            logits = self.runtime.feed([token])
        if streamer is not None:
            streamer.end()
        return row

    def _pick(self, processors: Any, ids: torch.Tensor, logits: torch.Tensor) -> int:
        import torch

        scores = processors(ids, logits[None, :]) if processors else logits[None, :]
        if not self.cfg.do_sample:
            return int(scores[0].argmax())
        return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0])

    def _stopped(self, row: list[int]) -> bool:
        """Whether a stop string ends in the newest tokens (Generator._finish cuts the text there).

        Tested at every token, so a stop can only have completed at the last one: decoding a tail
        that holds the longest stop string's bytes (4 tokens to spare, for a tokenizer that drops a
        leading space at the start of a decode) keeps each test short however long the text grows.
        """
        if not self.cfg.stop:
            return False
        tail = 4 * max(len(stop) for stop in self.cfg.stop) + 4
        return find_stop(self.decode(row[-tail:]), self.cfg.stop) is not None

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
