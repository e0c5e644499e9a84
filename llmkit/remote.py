"""`generate --server URL`: the same prompts in and Samples out as `Generator`, decoded by a server.

Stdlib only (urllib, json): a call must not pay for importing torch or transformers. It speaks the
OpenAI completions API as `llmkit serve` answers it, and reads llmkit's extra per-choice fields
(`stop_reason`, token counts) when they are there.

Seeds: the API takes one seed per request, and a server seeds a request's choice j with seed + j
for every prompt of the request, so a list of prompts in one request would share their samples'
randomness. Each prompt is therefore its own request, sent `batch_size` at a time so the server
still decodes them together: prompt k of the run (from 0) carries seed + k × num_samples, and
every sample of the run gets a seed of its own.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from llmkit.config import GenerateConfig
from llmkit.errors import InputError, LlmkitError, UsageError
from llmkit.generation import Prompt, Sample

TIMEOUT_S = 600
SEED_SPAN = 2**64  # seeds are signed 64-bit integers: derived ones wrap around inside that range


class ServerError(LlmkitError):
    """The server could not be reached, or refused the request."""


class RemoteGenerator:
    def __init__(
        self, url: str, cfg: GenerateConfig, api_key: str | None = None, model: str | None = None
    ) -> None:
        if cfg.max_length is not None:
            raise UsageError(
                "--max-length needs a local model (it counts prompt tokens)", "use -n with --server"
            )
        if cfg.no_repeat_ngram_size:
            raise UsageError(
                "--no-repeat-ngram-size is not part of the server API", "drop it, or run locally"
            )
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            self.url = "http://" + self.url
        self.cfg = cfg
        self.api_key = api_key
        self.model = model
        self.seed: int | None = None  # greedy decoding needs none, and reports none
        if cfg.do_sample:
            self.seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        self.batch_size = cfg.batch_size or 16
        self.tokens_generated = 0
        self.first_token_at: float | None = None

    # -- the Generator interface generate uses ----------------------------------------------------------
    def run(self, prompts: Iterable[Prompt], shard: Any = None) -> Iterator[list[Sample]]:
        """Each prompt's samples in input order; up to `batch_size` requests in flight at once."""
        pending: deque[_Request] = deque()
        for k, prompt in enumerate(prompts):
            pending.append(_Request(self, prompt, self.prompt_seed(k)))
            if len(pending) == self.batch_size:
                yield self._samples(pending.popleft())
        while pending:
            yield self._samples(pending.popleft())

    def prompt_seed(self, k: int) -> int | None:
        """The seed of the k-th prompt's request (from 0): the server adds j for its sample j."""
        if self.seed is None:
            return None
        return (self.seed + k * self.cfg.num_samples + SEED_SPAN // 2) % SEED_SPAN - SEED_SPAN // 2

    def stream(self, prompt: Prompt, on_text: Callable[[str], None]) -> Sample:
        started = time.perf_counter()
        text, last = "", None
        with self._post({**self._body(prompt.text, self.seed), "stream": True}) as response:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise ServerError(f"the server failed: {event['error'].get('message')}")
                for choice in event.get("choices", []):
                    if choice["text"]:
                        if self.first_token_at is None:
                            self.first_token_at = time.perf_counter()
                        on_text(choice["text"])
                        text += choice["text"]
                    if choice.get("finish_reason"):
                        last = choice
        if last is not None and self.cfg.keep_stop and last.get("stop_reason"):
            on_text(last["stop_reason"])
        choice = {**(last or {}), "text": text}
        return self._sample(prompt, 0, choice, time.perf_counter() - started, self.seed)

    def served_models(self) -> list[str] | None:
        """The ids the server lists at /v1/models; None when it has no such list to ask."""
        request = urllib.request.Request(self.url + "/v1/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return [str(entry["id"]) for entry in json.loads(response.read())["data"]]
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 405):
                return None
            raise _refused(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None
        except (ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def serves(model: str, served: list[str]) -> bool:
        """Whether `model` (as -m names it) is one of the served ids: the same name, or the same directory."""
        if model in served:
            return True
        here = os.path.realpath(os.path.expanduser(model))
        return os.path.isdir(here) and any(
            os.path.isdir(name) and os.path.realpath(name) == here for name in served
        )

    # -- inside ----------------------------------------------------------------------------------------
    def _complete(self, prompt: Prompt, seed: int | None) -> tuple[list[dict[str, Any]], float, float]:
        """One prompt's request: its choices, the seconds it took, and when it ended."""
        started = time.perf_counter()
        with self._post(self._body(prompt.text, seed)) as response:
            body = json.loads(response.read())
        ended = time.perf_counter()
        return sorted(body["choices"], key=lambda c: c["index"]), ended - started, ended

    def _samples(self, request: _Request) -> list[Sample]:
        choices, seconds, ended = request.result()
        if self.first_token_at is None:
            self.first_token_at = ended
        n, prompt, seed = self.cfg.num_samples, request.prompt, request.seed
        return [self._sample(prompt, s, choices[s], seconds, seed) for s in range(n)]

    def _body(self, text: str, seed: int | None) -> dict[str, Any]:
        cfg = self.cfg
        body: dict[str, Any] = {
            "prompt": text,
            "max_tokens": cfg.max_new_tokens,
            "n": cfg.num_samples,
            "temperature": cfg.temperature if cfg.do_sample else 0.0,
            "top_p": cfg.top_p,
            "top_k": cfg.top_k if cfg.do_sample else 0,
            "repetition_penalty": cfg.repetition_penalty,
            "min_tokens": cfg.min_new_tokens,
        }
        if seed is not None:
            body["seed"] = seed
        if cfg.min_p is not None:
            body["min_p"] = cfg.min_p
        if cfg.typical_p is not None:
            body["typical_p"] = cfg.typical_p
        if cfg.stop:
            body["stop"] = list(cfg.stop)
        if self.model:
            body["model"] = self.model
        return body

    def _sample(
        self, prompt: Prompt, index: int, choice: dict[str, Any], seconds: float, seed: int | None
    ) -> Sample:
        text, reason, stop = (
            choice["text"],
            choice.get("finish_reason") or "length",
            choice.get("stop_reason"),
        )
        if reason == "stop" and stop is None:
            reason = "eos"
        if stop is not None and self.cfg.keep_stop:
            text += stop
        completion_tokens = int(choice.get("completion_tokens", 0))
        self.tokens_generated += completion_tokens
        return Sample(
            prompt.id,
            prompt.text,
            index,
            text,
            int(choice.get("prompt_tokens", 0)),
            completion_tokens,
            reason,
            seed,
            round(seconds, 4),
        )

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json", **self._headers()}
        request = urllib.request.Request(
            self.url + "/v1/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            return urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise _refused(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> ServerError:
        return ServerError(
            f"cannot reach the server at {self.url}: {getattr(exc, 'reason', exc)}",
            "start one with: llmkit serve -m MODEL (or check --server / LLMKIT_SERVER)",
        )


class _Request:
    """A prompt's request on a thread of its own: daemon, so Ctrl-C never waits for the server."""

    def __init__(self, gen: RemoteGenerator, prompt: Prompt, seed: int | None) -> None:
        self.prompt, self.seed = prompt, seed
        self._outcome: Any = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._send, args=(gen,), daemon=True)
        self._thread.start()

    def _send(self, gen: RemoteGenerator) -> None:
        try:
            self._outcome = gen._complete(self.prompt, self.seed)
        except BaseException as exc:  # handed to the caller's thread by result()
            self._failure = exc

    def result(self) -> tuple[list[dict[str, Any]], float, float]:
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self._outcome


def _refused(exc: urllib.error.HTTPError) -> LlmkitError:
    try:
        message = json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = exc.reason
    if exc.code == 401:
        return ServerError(
            f"the server refused the request: {message}", "pass --api-key or set LLMKIT_API_KEY"
        )
    if 400 <= exc.code < 500:
        return InputError(f"the server refused the request: {message}")
    return ServerError(f"the server failed ({exc.code}): {message}", "see the server's log")
