"""Prompts in, samples out: batching, budgets, stop strings, streaming and finish reasons.

Decoding itself is transformers' `generate` with a GenerationConfig (logits processors, stop-string
criteria); this module decides what goes into each call and turns token ids back into honest records.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from llmkit.config import GenerateConfig
from llmkit.errors import InputError, UsageError
from llmkit.models import LoadedModel
from llmkit.special import bos_id

if TYPE_CHECKING:
    from transformers import GenerationConfig

# Prompts are sorted by length inside windows of this many batches, so padding stays small while
# output can still be written (in input order) long before the input ends.
SORT_WINDOW_BATCHES = 8
AUTO_BATCH = {"cpu": 16, "mps": 16, "cuda": 64}


@dataclass
class Prompt:
    id: Any
    text: str


@dataclass
class Sample:
    """One generated sample; `record()` is the JSONL object."""

    id: Any
    prompt: str
    sample: int
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | eos | length
    seed: int | None  # None for greedy decoding, which draws nothing
    seconds: float

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Shard:
    """This process's part of a multi-process run, and how results reach the main process."""

    rank: int
    world: int
    gather: Callable[[dict[int, list[Sample]]], dict[int, list[Sample]] | None]
    """Collective: every process passes its results; the main one gets them all, the others None."""
    barrier: Callable[[], None] = lambda: None
    """Collective: wait until every process gets here."""


@dataclass
class _Encoded:
    index: int
    prompt: Prompt
    ids: list[int]
    budget: int  # new tokens this prompt may generate


def find_stop(text: str, stops: Iterable[str], start: int = 0) -> tuple[int, int] | None:
    """Earliest stop string in the generated `text` (from `start` on): (start, end) offsets, or None.

    Only generated text counts, as OpenAI, vLLM and llama.cpp define stop sequences: a stop string
    that would begin in the prompt and end in the completion is not a stop.
    """
    best: tuple[int, int] | None = None
    for stop in stops:
        idx = text.find(stop, start)
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, idx + len(stop))
    return best


class GeneratedOnly:
    """A transformers stopping criterion that sees only the tokens after the prompt.

    transformers' `StopStringCriteria` matches the end of the whole sequence, prompt included, so a
    prompt ending in "\n" stops `--stop "\n\n"` at the first generated "\n". Left padding gives every
    row the same prompt width, so slicing there leaves exactly the generated tokens.
    """

    def __init__(self, inner: Any, prompt_width: int) -> None:
        self.inner = inner
        self.prompt_width = prompt_width

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return self.inner(input_ids[:, self.prompt_width :], scores, **kwargs)


def held_back(text: str, stops: Iterable[str]) -> int:
    """How many trailing characters might still become a stop string (or a split UTF-8 character)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    last = text[-1:]
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            # The cheap test first: a 1,000-character stop costs one comparison per length, not n.
            if stop[n - 1] == last and text.endswith(stop[:n]):
                hold = n
                break
    return hold


class Generator:
    """Runs a GenerateConfig against a loaded model; holds no output state between calls."""

    def __init__(
        self,
        lm: LoadedModel,
        cfg: GenerateConfig,
        warn: Callable[[str], None] | None = None,
        time_first_token: bool = False,
    ):
        self.lm = lm
        self.cfg = cfg
        self.warn = warn or (lambda _msg: None)
        self.seed: int | None = None  # greedy decoding draws nothing: no seed to report
        if cfg.do_sample:
            self.seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        self.batch_size = cfg.batch_size or AUTO_BATCH.get(lm.device.type, 16)
        tok = lm.tokenizer
        self.eos_id = lm.model.generation_config.eos_token_id
        if self.eos_id is None:
            self.eos_id = tok.eos_token_id
        if isinstance(self.eos_id, list):
            self.eos_ids = set(self.eos_id)
        else:
            self.eos_ids = {self.eos_id} if self.eos_id is not None else set()
        self.start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self._stop_criterion: Any = None
        self._check_lengths()
        self.tokens_generated = 0
        self.first_token_at: float | None = None
        # Timing hooks into generate's streamer, which copies every token to the host: only on request.
        self.time_first_token = time_first_token

    # -- budgets -----------------------------------------------------------------------------------
    def _check_lengths(self) -> None:
        cfg, context = self.cfg, self.lm.context
        if cfg.max_length is not None:
            if cfg.max_length > context:
                raise UsageError(
                    f"--max-length {cfg.max_length} exceeds the model's context of {context}",
                    f"use at most {context}",
                )
        elif cfg.max_new_tokens is not None and cfg.max_new_tokens >= context:
            raise UsageError(
                f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                f"context of {context} tokens",
                f"use fewer than {context}",
            )

    def encode(self, index: int, prompt: Prompt) -> _Encoded:
        cfg, context = self.cfg, self.lm.context
        tok = self.lm.tokenizer
        ids = tok(prompt.text, add_special_tokens=False)["input_ids"] if prompt.text else []
        bos = bos_id(tok)
        if bos is not None:
            ids = [bos, *ids]  # what the model saw before every text it learnt (Llama, Mistral, …)
        elif not ids:
            # GPT-2 samples unconditionally from <|endoftext|>.
            ids = [self.start_id]
        if cfg.max_length is not None:
            room = cfg.max_length - max(1, cfg.min_new_tokens)
        else:
            room = context - (cfg.max_new_tokens or 1)
        if len(ids) > room:
            if cfg.truncate == "error":
                raise InputError(
                    f"prompt {prompt.id} has {len(ids)} tokens; only {room} fit with the "
                    "requested new tokens",
                    "shorten it, lower --max-new-tokens, or use --truncate left",
                )
            self.warn(f"prompt {prompt.id} has {len(ids)} tokens; kept the last {room} to fit the context")
            ids = ids[:1] + ids[len(ids) - room + 1 :] if bos is not None else ids[-room:]  # BOS stays
        budget = cfg.max_length - len(ids) if cfg.max_length is not None else cfg.max_new_tokens
        return _Encoded(index, prompt, ids, int(budget or 1))

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        from transformers import GenerationConfig

        cfg = self.cfg
        options: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=cfg.min_new_tokens or None,
            do_sample=cfg.do_sample,
            num_return_sequences=cfg.num_samples,
            repetition_penalty=cfg.repetition_penalty,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
            eos_token_id=self.eos_id,
            pad_token_id=self.lm.tokenizer.pad_token_id,
            bos_token_id=self.lm.tokenizer.bos_token_id,
        )
        if cfg.do_sample:
            options.update(
                temperature=cfg.temperature,
                top_k=cfg.top_k or None,
                top_p=cfg.top_p,
                min_p=cfg.min_p,
                typical_p=cfg.typical_p,
            )
        else:
            options.update(temperature=None, top_k=None, top_p=None)
        if cfg.compile:
            options.update(cache_implementation="static", compile_config=self._compile_config())
        return GenerationConfig(**options)

    def _compile_config(self) -> Any:
        """transformers compiles the decoding step itself once the cache is static; prefill stays eager."""
        from transformers import CompileConfig

        if self.lm.device.type == "cuda":
            return CompileConfig()  # reduce-overhead: CUDA graphs
        config = CompileConfig(mode="default")
        # transformers compiles only on accelerators unless told; on a 2-core CPU: 1.14x faster tokens.
        config._compile_all_devices = True
        return config

    # -- running -----------------------------------------------------------------------------------
    def run(self, prompts: Iterable[Prompt], shard: Shard | None = None) -> Iterator[list[Sample]]:
        """The samples of each prompt (`num_samples` of them), prompt by prompt in input order.

        With a `shard`, this process generates every world-th prompt of each window and the main
        process gathers and yields all of them (the others yield nothing).
        """
        import torch

        if self.seed is not None:
            torch.manual_seed(self.seed)
        window = self.batch_size * SORT_WINDOW_BATCHES * (shard.world if shard else 1)
        it = iter(enumerate(prompts))
        while group := [self.encode(i, p) for i, p in islice(it, window)]:
            done: dict[int, list[Sample]] = {}
            mine = [e for e in group if shard is None or e.index % shard.world == shard.rank]
            order = sorted(mine, key=lambda e: -len(e.ids))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for enc, samples in zip(batch, self._generate_batch(batch), strict=True):
                    done[enc.index] = samples
                if shard is None:
                    # Emit what is ready, in input order.
                    while group and group[0].index in done:
                        yield done.pop(group.pop(0).index)
            if shard is not None:
                gathered = shard.gather(done)
                if gathered is not None:
                    for enc in group:
                        yield gathered[enc.index]

    def stream(self, prompt: Prompt, on_text: Callable[[str], None]) -> Sample:
        """One prompt, one sample, its text delivered to `on_text` as soon as it is final."""
        import torch

        if self.seed is not None:
            torch.manual_seed(self.seed)
        enc = self.encode(0, prompt)
        streamer = _TextStreamer(self, on_text)
        [sample] = self._generate_batch([enc], streamer=streamer)[0]
        return sample

    def _generate_batch(self, batch: list[_Encoded], streamer: Any = None) -> list[list[Sample]]:
        import torch

        model, tok = self.lm.model, self.lm.tokenizer
        width = max(len(e.ids) for e in batch)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e.ids)) + e.ids for e in batch])
        mask = torch.tensor([[0] * (width - len(e.ids)) + [1] * len(e.ids) for e in batch])
        max_new = max(e.budget for e in batch)
        if streamer is None and self.time_first_token:
            streamer = _FirstToken(self)
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(self.lm.device),
                attention_mask=mask.to(self.lm.device),
                generation_config=self.generation_config(max_new),
                stopping_criteria=self._stopping_criteria(width),
                streamer=streamer,
            )
        seconds = round(time.perf_counter() - started, 4)
        rows = output[:, width:].tolist()
        results = []
        for b, enc in enumerate(batch):
            samples = []
            for s in range(self.cfg.num_samples):
                samples.append(self._finish(enc, rows[b * self.cfg.num_samples + s], s, seconds))
            results.append(samples)
        return results

    def _stopping_criteria(self, prompt_width: int) -> Any:
        from transformers import StoppingCriteriaList

        if not self.cfg.stop:
            return None
        if self._stop_criterion is None:
            # Built once: it precomputes how every vocabulary token can overlap each stop string.
            from transformers import StopStringCriteria

            self._stop_criterion = StopStringCriteria(self.lm.tokenizer, list(self.cfg.stop))
        return StoppingCriteriaList([GeneratedOnly(self._stop_criterion, prompt_width)])

    def _finish(self, enc: _Encoded, row: list[int], sample: int, seconds: float) -> Sample:
        tokens, reason = row, "length"
        for k, token in enumerate(row):
            if token in self.eos_ids:
                tokens, reason = row[:k], "eos"
                break
        if len(tokens) > enc.budget:
            tokens, reason = tokens[: enc.budget], "length"
        text = self.decode(tokens)
        hit = find_stop(text, self.cfg.stop)
        if hit is not None:
            text, reason = text[: hit[1] if self.cfg.keep_stop else hit[0]], "stop"
        self.tokens_generated += len(tokens)
        return Sample(
            enc.prompt.id,
            enc.prompt.text,
            sample,
            text,
            len(enc.ids),
            len(tokens),
            reason,
            self.seed,
            seconds,
        )

    def decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class _FirstToken:
    """Notes when the first new token exists (generate calls put() with the prompt first)."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.calls = 0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.gen.first_token_at is None:
            self.gen.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class _TextStreamer(_FirstToken):
    """Decodes incrementally; holds back split UTF-8 characters and possible stop-string prefixes."""

    def __init__(self, gen: Generator, on_text: Callable[[str], None]) -> None:
        super().__init__(gen)
        self.on_text = on_text
        self.ids: list[int] = []
        self.emitted = 0
        self.finished = False

    def put(self, value: Any) -> None:
        super().put(value)
        if self.calls == 1 or self.finished:
            return
        token = int(value.reshape(-1)[0])
        if token in self.gen.eos_ids:
            self.flush(final=True)
            return
        self.ids.append(token)
        self.flush(final=False)

    def end(self) -> None:
        self.flush(final=True)

    def flush(self, final: bool) -> None:
        if self.finished:
            return
        text = self.gen.decode(self.ids)
        hit = find_stop(text, self.gen.cfg.stop)
        if hit is not None:
            text = text[: hit[1] if self.gen.cfg.keep_stop else hit[0]]
            final = True
        elif not final:
            text = text[: len(text) - held_back(text, self.gen.cfg.stop)]
        if len(text) > self.emitted:
            self.on_text(text[self.emitted :])
            self.emitted = len(text)
        self.finished = final
