"""`generate --server URL`: the same prompts in and Samples out as `Generator`, decoded by a server.

Stdlib only (urllib, json): a call must not pay for importing torch or transformers. It speaks the
OpenAI completions API as `llmkit serve` answers it, and reads llmkit's extra per-choice fields
(`stop_reason`, token counts) when they are there.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from llmkit.config import GenerateConfig
from llmkit.errors import InputError, LlmkitError, UsageError
from llmkit.generation import Prompt, Sample

TIMEOUT_S = 600


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
        self.seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        self.batch_size = cfg.batch_size or 16
        self.tokens_generated = 0
        self.first_token_at: float | None = None

    # -- the Generator interface generate uses ----------------------------------------------------------
    def run(self, prompts: Iterable[Prompt], shard: Any = None) -> Iterator[list[Sample]]:
        batch: list[Prompt] = []
        for prompt in prompts:
            batch.append(prompt)
            if len(batch) == self.batch_size:
                yield from self._complete(batch)
                batch = []
        if batch:
            yield from self._complete(batch)

    def stream(self, prompt: Prompt, on_text: Callable[[str], None]) -> Sample:
        started = time.perf_counter()
        text, last = "", None
        with self._post({**self._body([prompt.text]), "stream": True}) as response:
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
        return self._sample(prompt, 0, choice, time.perf_counter() - started)

    # -- inside ----------------------------------------------------------------------------------------
    def _complete(self, batch: list[Prompt]) -> Iterator[list[Sample]]:
        started = time.perf_counter()
        with self._post(self._body([p.text for p in batch])) as response:
            body = json.loads(response.read())
        seconds = time.perf_counter() - started
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        choices = sorted(body["choices"], key=lambda c: c["index"])
        n = self.cfg.num_samples
        for i, prompt in enumerate(batch):
            yield [self._sample(prompt, s, choices[i * n + s], seconds) for s in range(n)]

    def _body(self, texts: list[str]) -> dict[str, Any]:
        cfg = self.cfg
        body: dict[str, Any] = {
            "prompt": texts,
            "max_tokens": cfg.max_new_tokens,
            "n": cfg.num_samples,
            "seed": self.seed,
            "temperature": cfg.temperature if cfg.do_sample else 0.0,
            "top_p": cfg.top_p,
            "top_k": cfg.top_k if cfg.do_sample else 0,
            "repetition_penalty": cfg.repetition_penalty,
            "min_tokens": cfg.min_new_tokens,
        }
        if cfg.min_p is not None:
            body["min_p"] = cfg.min_p
        if cfg.typical_p is not None:
            body["typical_p"] = cfg.typical_p
        if cfg.stop:
            body["stop"] = list(cfg.stop)
        if self.model:
            body["model"] = self.model
        return body

    def _sample(self, prompt: Prompt, index: int, choice: dict[str, Any], seconds: float) -> Sample:
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
            self.seed,
            round(seconds, 4),
        )

    def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url + "/v1/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            return urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise _refused(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(
                f"cannot reach the server at {self.url}: {reason}",
                "start one with: llmkit serve -m MODEL (or check --server / LLMKIT_SERVER)",
            ) from None


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
