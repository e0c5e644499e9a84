"""A completion request's life: prompts → engine sequences → OpenAI choices, whole or streamed.

The engine's worker thread delivers chunks; `Run` hands them to the request's event loop, assembles
choices (text, logprobs, finish reason) and cancels its sequences when the client goes away.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llmkit.serve.engine import Chunk, Engine, Sequence, TokenInfo, describe
from llmkit.serve.errors import APIError
from llmkit.serve.sampling import SamplingParams
from llmkit.serve.schemas import MAX_PROMPTS, CompletionRequest, Sampling
from llmkit.special import with_bos

DISCONNECT_POLL_S = 0.5


@dataclass
class Choice:
    index: int
    prompt_tokens: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt_text_len: int = 0  # offsets of generated tokens start after an echoed prompt
    finish_reason: str | None = None
    stop_reason: str | None = None
    completion_tokens: int = 0

    def add(self, chunk: Chunk) -> None:
        if chunk.echo:
            self.prompt_text_len = len(chunk.text)
            self.text += chunk.text
            self.tokens.extend(chunk.tokens)
            return
        self.text += chunk.text
        for token in chunk.tokens:
            self.tokens.append(
                TokenInfo(token.id, token.text, token.start + self.prompt_text_len, token.logprob, token.top)
            )
        if chunk.finish_reason is not None:
            self.finish_reason, self.stop_reason = chunk.finish_reason, chunk.stop_reason


def logprobs_object(tokens: list[TokenInfo]) -> dict[str, Any]:
    """The legacy completions `logprobs`: four lists aligned token by token."""
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top for t in tokens],
        "text_offset": [t.start for t in tokens],
    }


def sampling_params(
    engine: Engine, req: Sampling, max_tokens: int, logprobs: int | None, echo: bool
) -> SamplingParams:
    vocab = len(engine.tokenizer)
    outside = [k for k in req.logit_bias or {} if int(k) >= vocab]
    if outside:
        raise APIError(
            400,
            f"logit_bias: token id {outside[0]} is outside the vocabulary (0–{vocab - 1})",
            param="logit_bias",
            code="invalid_value",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        typical_p=req.typical_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        min_tokens=req.min_tokens,
        stop=list(req.stop or []),
        seed=req.seed,
        logprobs=logprobs,
        echo=echo,
    )


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of a request's `index`-th choice (k·n + j for sample j of prompt k): seed + index,
    wrapped into torch's 64 bits."""
    return None if seed is None else (seed + index) % 2**64


def encode_prompts(engine: Engine, prompt: Any) -> list[tuple[list[int], str | None]]:
    """(token ids, text) per prompt; text is None for prompts given as ids."""
    tok = engine.tokenizer
    vocab = len(tok)
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    out = []
    for item in prompt:
        if isinstance(item, str):
            # Text gets the tokenizer's BOS (as `tokenizer(text)` does: lm-eval's hf model scores so);
            # token ids are taken as given.
            ids = tok(item, add_special_tokens=False)["input_ids"] if item else []
            ids = with_bos(tok, ids)
            text: str | None = item
        else:
            ids, text = list(item), None
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise APIError(
                    400, f"token id {bad[0]} is outside the vocabulary (0–{vocab - 1})", param="prompt"
                )
        if not ids:
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [start]  # GPT-2 samples unconditionally from <|endoftext|>
            text = "" if text is not None else None
        out.append((ids, text))
    return out


def check_budget(engine: Engine, prompt_tokens: int, max_tokens: int) -> None:
    if prompt_tokens + max_tokens > engine.context:
        raise APIError(
            400,
            f"This model's maximum context length is {engine.context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce your prompt or completion length.",
            param="prompt" if prompt_tokens >= engine.context else "max_tokens",
            code="context_length_exceeded",
        )


class Bridge:
    """Carries chunks from the engine's thread to one event loop, waking it once per burst.

    A decoding step delivers a chunk to every sequence in the batch; one `call_soon_threadsafe` per
    chunk would wake the loop (a syscall, and a turn of the loop that competes with decoding for the
    two cores) that many times. Here the first chunk of a burst schedules one hand-over for them all.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._waiting.append((queue, item))
            if len(self._waiting) > 1:
                return  # a hand-over is already scheduled and will take this one too
        self.loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for queue, item in waiting:
            queue.put_nowait(item)


_bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Bridge] = weakref.WeakKeyDictionary()


def bridge(loop: asyncio.AbstractEventLoop) -> Bridge:
    found = _bridges.get(loop)
    if found is None:
        found = _bridges[loop] = Bridge(loop)
    return found


class Run:
    """The sequences of one request, and the bridge from the engine's thread to this event loop."""

    def __init__(self, engine: Engine, kind: str, model: str) -> None:
        self.engine = engine
        self.bridge = bridge(asyncio.get_running_loop())
        self.queue: asyncio.Queue[tuple[int, Chunk]] = asyncio.Queue()
        self.sequences: list[Sequence] = []
        self.choices: list[Choice] = []
        self.id = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.kind = kind
        self.model = model

    def add(self, ids: list[int], text: str | None, params: SamplingParams, seed: int | None) -> None:
        index = len(self.sequences)

        def deliver(chunk: Chunk, index: int = index) -> None:
            self.bridge.post(self.queue, (index, chunk))

        self.sequences.append(self.engine.sequence(ids, params, deliver, seed=seed, prompt_text=text))
        self.choices.append(Choice(index, len(ids)))

    def start(self) -> None:
        self.engine.submit(self.sequences)

    def cancel(self) -> None:
        self.engine.cancel(self.sequences)

    async def chunks(self, is_disconnected: Any = None) -> AsyncIterator[tuple[int, Chunk]]:
        """Every chunk as it comes, until every choice has finished; a failed sequence raises 500."""
        open_choices = len(self.sequences)
        while open_choices:
            try:
                if self.queue.empty():
                    index, chunk = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                else:  # no timer and no task when the chunk is already here
                    index, chunk = self.queue.get_nowait()
            except TimeoutError:
                if is_disconnected is not None and await is_disconnected():
                    self.cancel()
                    return
                continue
            if chunk.error is not None:
                self.cancel()
                raise APIError(500, f"generation failed: {describe(chunk.error)}", "server_error")
            self.choices[index].add(chunk)
            if chunk.finish_reason is not None:
                open_choices -= 1
            yield index, chunk

    def usage(self, prompts: list[int]) -> dict[str, int]:
        prompt_tokens = sum(prompts)
        completion = sum(s.completion_tokens for s in self.sequences)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }


def completion_run(engine: Engine, req: CompletionRequest, model: str) -> tuple[Run, list[int]]:
    """Check a completion request against the model and queue its sequences; (run, prompt lengths)."""
    if req.suffix:
        raise APIError(400, "suffix is not supported by this model", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    prompts = encode_prompts(engine, req.prompt)
    if len(prompts) * req.n > MAX_PROMPTS:
        raise APIError(
            400,
            f"{len(prompts)} prompts × n {req.n} is {len(prompts) * req.n} choices; at most {MAX_PROMPTS} "
            "per request",
            param="n",
            code="invalid_value",
        )
    run = Run(engine, "text_completion", model)
    lengths = []
    for k, (ids, text) in enumerate(prompts):
        max_tokens = req.max_tokens if req.max_tokens is not None else engine.context - len(ids)
        check_budget(engine, len(ids), max_tokens)
        params = sampling_params(engine, req, max_tokens, req.logprobs, req.echo)
        lengths.append(len(ids))
        for j in range(req.n):
            # Choice index k·n + j, as OpenAI numbers them: different prompts draw differently, and a
            # list of prompts samples what the same prompts sent one by one (seed + k·n) would.
            run.add(ids, text, params, choice_seed(req.seed, k * req.n + j))
    return run, lengths


def completion_choice(run: Run, choice: Choice, logprobs: bool) -> dict[str, Any]:
    return {
        "text": choice.text,
        "index": choice.index,
        "logprobs": logprobs_object(choice.tokens) if logprobs else None,
        "finish_reason": choice.finish_reason,
        # Beyond OpenAI (clients ignore them): the stop string that ended the choice (as vLLM
        # reports it; null for end-of-text), and the choice's own token counts.
        "stop_reason": choice.stop_reason,
        "prompt_tokens": choice.prompt_tokens,
        "completion_tokens": run.sequences[choice.index].completion_tokens,
    }


def completion_body(run: Run, logprobs: bool, lengths: list[int]) -> dict[str, Any]:
    return {
        "id": run.id,
        "object": "text_completion",
        "created": run.created,
        "model": run.model,
        "choices": [completion_choice(run, c, logprobs) for c in run.choices],
        "usage": run.usage(lengths),
    }


def completion_chunk(run: Run, index: int, chunk: Chunk, logprobs: bool) -> dict[str, Any]:
    choice = run.choices[index]
    offset = 0 if chunk.echo else choice.prompt_text_len
    tokens = [TokenInfo(t.id, t.text, t.start + offset, t.logprob, t.top) for t in chunk.tokens]
    body: dict[str, Any] = {
        "text": chunk.text,
        "index": index,
        "logprobs": logprobs_object(tokens) if logprobs else None,
        "finish_reason": chunk.finish_reason,
    }
    if chunk.finish_reason is not None:
        body["stop_reason"] = chunk.stop_reason
        body["prompt_tokens"] = choice.prompt_tokens
        body["completion_tokens"] = run.sequences[index].completion_tokens
    return {
        "id": run.id,
        "object": "text_completion",
        "created": run.created,
        "model": run.model,
        "choices": [body],
    }
