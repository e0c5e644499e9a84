"""Conversations: the messages, rendering through the tokenizer's chat template, and the turn loop.

A `Chat` keeps the messages and asks a backend for each reply: `LocalChat` renders the whole
conversation through the model's own template every turn and decodes with transformers' `generate`
(the sampling settings are `generate`'s, through `Generator`); `RemoteChat` sends the messages to a
running `llmkit serve` (stdlib HTTP only, no torch import).

The KV cache is kept across turns: templates usually render turn N+1 as turn N's prompt, its reply
and the new message, so only the tokens after the longest common prefix with what the cache holds
are fed to the model; a template that renders earlier turns differently just costs a longer prefill.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llmkit.config import GenerateConfig
from llmkit.errors import InputError, LlmkitError, ModelError, OutputError

if TYPE_CHECKING:
    import threading

    from llmkit.models import LoadedModel
    from llmkit.remote import RemoteGenerator

Message = dict[str, str]
OnText = Callable[[str], None]
ROLES = ("system", "user", "assistant", "developer", "tool")
# End-of-turn markers of the common templates (ChatML, Llama 3, Gemma, Phi-3): a reply ends at any
# of them that the model's template uses and its vocabulary holds as one token, as well as at EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
NO_TEMPLATE_HINT = (
    "pass --chat-template chatml (or zephyr, or a FILE.jinja), "
    "or use a chat model such as -m HuggingFaceTB/SmolLM2-135M-Instruct"
)
FULL_HINT = (
    "start a new conversation (in the REPL: /save FILE keeps this one, /reset starts over), "
    "pass --drop-oldest to drop the oldest turns as the context fills, or lower --max-new-tokens"
)

LAST_MESSAGE_HINT = "nothing older is left to drop: shorten the message or lower --max-new-tokens"


class NoChatTemplate(ModelError):
    """The model's tokenizer has no chat template, so it cannot take messages."""


class ContextFull(LlmkitError):
    """The conversation and the longest reply no longer fit the model's context."""


@dataclass
class Turn:
    """What one reply was."""

    text: str
    finish_reason: str  # eos | stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int = 0
    """Prompt tokens whose keys and values came from the previous turn's cache (not recomputed)."""
    seconds: float = 0.0
    first_token_seconds: float | None = None
    """From sending to the reply's first token: mostly encoding the prompt (what the cache saves)."""
    dropped: int = 0
    """Messages dropped from the start of the conversation to make room (--drop-oldest)."""


class Backend(Protocol):
    seed: int | None
    """The sampling seed (None when greedy)."""

    def complete(self, messages: list[Message], on_text: OnText, cancel: threading.Event | None) -> Turn:
        """The reply to `messages`, its text handed to `on_text` as it comes; ContextFull if it can't fit."""
        ...


# -- the conversation ------------------------------------------------------------------------------
class Chat:
    """A conversation with one backend: the messages, the system message, and sending a turn."""

    def __init__(
        self,
        backend: Backend,
        system: str | None = None,
        messages: list[Message] | None = None,
        drop_oldest: bool = False,
    ) -> None:
        self.backend = backend
        self.messages: list[Message] = list(messages or [])
        self.drop_oldest = drop_oldest
        if system is not None:
            self.set_system(system)

    @property
    def system(self) -> str | None:
        first = self.messages[0] if self.messages else None
        return first["content"] if first is not None and first["role"] == "system" else None

    def set_system(self, text: str) -> None:
        """Replace the system message (or put one first); the rest of the conversation stays."""
        if self.system is not None:
            self.messages[0] = {"role": "system", "content": text}
        else:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self) -> None:
        """Forget every turn; a system message stays."""
        system = self.system
        self.messages = [] if system is None else [{"role": "system", "content": system}]

    def send(self, text: str, on_text: OnText, cancel: threading.Event | None = None) -> Turn:
        """Add a user message and get the reply; a cancelled or failed turn leaves no trace."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            turn = self.reply(on_text, cancel)
        except BaseException:
            self.messages = before
            raise
        if turn.finish_reason == "cancelled":
            self.messages = before
        return turn

    def reply(self, on_text: OnText, cancel: threading.Event | None = None) -> Turn:
        """The assistant's reply to the conversation as it stands, added to it unless cancelled."""
        before = list(self.messages)
        try:
            turn = self._complete(on_text, cancel)
        except BaseException:
            self.messages = before  # what --drop-oldest dropped comes back
            raise
        if turn.finish_reason == "cancelled":
            self.messages = before
        else:
            self.messages.append({"role": "assistant", "content": turn.text})
        return turn

    def _complete(self, on_text: OnText, cancel: threading.Event | None) -> Turn:
        dropped = 0
        while True:
            try:
                turn = self.backend.complete(self.messages, on_text, cancel)
            except ContextFull as exc:
                if not self.drop_oldest:
                    raise
                gone = self._drop_one_exchange()
                if not gone:
                    raise ContextFull(exc.message, LAST_MESSAGE_HINT) from None
                dropped += gone
                continue
            turn.dropped = dropped
            return turn

    def _drop_one_exchange(self) -> int:
        """Drop the oldest user message and the replies after it; never the system or the last message."""
        start = next((i for i, m in enumerate(self.messages) if m["role"] != "system"), None)
        last = len(self.messages) - 1
        if start is None or start >= last:
            return 0
        end = start + 1
        while end < last and self.messages[end]["role"] != "user":
            end += 1
        del self.messages[start:end]
        return end - start

    def save(self, path: str | Path) -> int:
        """Write the messages as JSONL (one {"role", "content"} object a line); returns how many."""
        text = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in self.messages)
        try:
            Path(path).expanduser().write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        return len(self.messages)


def read_conversation(text: str) -> list[Message]:
    """Messages from piped input: JSON lines of {"role", "content"}, or any other text as one user turn."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(
            "nothing to reply to on stdin", 'pipe a message, or JSON lines of {"role", "content"}'
        )
    try:
        first = json.loads(lines[0][1])
    except ValueError:
        first = None
    if not (isinstance(first, dict) and "role" in first):
        return [{"role": "user", "content": text.rstrip("\n")}]
    messages = []
    for n, line in lines:
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise InputError(f"stdin line {n} is not JSON: {exc}", "one message object per line") from None
        messages.append(_message(message, f"stdin line {n}"))
    return messages


def _message(obj: Any, where: str) -> Message:
    if not (
        isinstance(obj, dict) and isinstance(obj.get("role"), str) and isinstance(obj.get("content"), str)
    ):
        raise InputError(
            f'{where}: a message needs a "role" and a "content" string',
            'e.g. {"role": "user", "content": "Hi"}',
        )
    if obj["role"] not in ROLES:
        raise InputError(f"{where}: unknown role {obj['role']!r}", f"use one of {', '.join(ROLES)}")
    return {"role": obj["role"], "content": obj["content"]}


def context_full(prompt_tokens: int, max_new_tokens: int, context: int) -> ContextFull:
    return ContextFull(
        f"the conversation is full: its {prompt_tokens} tokens and a reply of up to {max_new_tokens} "
        f"(--max-new-tokens) exceed the model's context of {context} tokens",
        FULL_HINT,
    )


# -- a local model ---------------------------------------------------------------------------------
class LocalChat:
    """Replies from a loaded model, the KV cache carried from turn to turn."""

    def __init__(self, lm: LoadedModel, cfg: GenerateConfig, reuse_cache: bool = True) -> None:
        import torch

        from llmkit.generation import Generator

        if not getattr(lm.tokenizer, "chat_template", None):
            raise NoChatTemplate(
                f"{lm.source.name}: this model's tokenizer has no chat template", NO_TEMPLATE_HINT
            )
        self.lm, self.cfg, self.reuse_cache = lm, cfg, reuse_cache
        self.gen = Generator(lm, cfg)  # validates the budget against the context, draws the seed
        self.gen.eos_ids |= end_of_turn_ids(lm.tokenizer)
        self.gen.eos_id = sorted(self.gen.eos_ids) or None
        self.seed = self.gen.seed
        if self.seed is not None:
            torch.manual_seed(self.seed)  # once: every turn draws on from where the last one stopped
        self._cache: Any = None
        self._cached_ids: list[int] = []  # the tokens whose keys and values `_cache` holds
        # Test hook: seconds to sleep per decoding step, so a test can press Ctrl-C mid-reply.
        self._step_delay = float(os.environ.get("LLMKIT_TEST_STEP_DELAY", "0") or 0)

    @property
    def context(self) -> int:
        return self.lm.context

    def render(self, messages: list[Message]) -> list[int]:
        """The prompt's token ids: the template's rendering, ending where the assistant's reply begins."""
        try:
            ids = self.lm.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # the template's own refusals (raise_exception, roles it doesn't know)
            raise InputError(f"the chat template refused this conversation: {exc}") from None
        return list(ids)

    def complete(
        self, messages: list[Message], on_text: OnText, cancel: threading.Event | None = None
    ) -> Turn:
        import torch

        from llmkit.generation import Prompt, _Encoded, _TextStreamer

        ids = self.render(messages)
        budget = int(self.cfg.max_new_tokens or 1)
        if len(ids) + budget > self.context:
            raise context_full(len(ids), budget, self.context)
        cache, reused = self._cache_for(ids)
        criteria = list(self.gen._stopping_criteria(len(ids)) or [])
        criteria.append(_Cancel(cancel, self._step_delay))
        self.gen.first_token_at = None
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = self.lm.model.generate(
                    input_ids=torch.tensor([ids], device=self.lm.device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.lm.device),
                    cache=cache,
                    generation_config=self.gen.generation_config(budget),
                    stopping_criteria=criteria,
                    streamer=_TextStreamer(self.gen, on_text),
                )
        except BaseException:
            self._cache, self._cached_ids = None, []  # a step may have stopped half-way through the layers
            raise
        seconds = time.perf_counter() - started
        row = output[0, len(ids) :].tolist()
        if cache is not None:
            self._cache, self._cached_ids = cache, (ids + row)[: cache.get_seq_length()]
        sample = self.gen._finish(_Encoded(0, Prompt(0, ""), ids, budget), row, 0, seconds)
        reason = "cancelled" if cancel is not None and cancel.is_set() else sample.finish_reason
        first = self.gen.first_token_at
        return Turn(
            sample.completion,
            reason,
            len(ids),
            sample.completion_tokens,
            reused,
            round(seconds, 4),
            None if first is None else round(first - started, 4),
        )

    def _cache_for(self, ids: list[int]) -> tuple[Any, int]:
        """A cache holding the longest prefix of `ids` the last turn left (at least one token to feed)."""
        if not self.reuse_cache:
            return None, 0
        from transformers import DynamicCache

        keep = min(_common_prefix(self._cached_ids, ids), len(ids) - 1)
        if self._cache is None or keep == 0:
            cache = DynamicCache(config=self.lm.model.config)
            # Sliding-window and linear-attention layers can't be cut back to a prefix: fresh every turn.
            if not _croppable(cache):
                return None, 0
            return cache, 0
        self._cache.crop(keep - self._cache.get_seq_length())
        return self._cache, keep


class _Cancel:
    """A stopping criterion: stop when the Ctrl-C flag is up (and, in tests, go slowly)."""

    def __init__(self, flag: threading.Event | None, step_delay: float) -> None:
        self.flag, self.step_delay = flag, step_delay

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.step_delay:
            time.sleep(self.step_delay)
        stop = self.flag is not None and self.flag.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _croppable(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """The single-token end-of-turn markers the template uses, and the tokenizer's EOS."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[marker] for marker in END_OF_TURN if marker in template and marker in vocab)
    return ids


# -- a running `llmkit serve` ----------------------------------------------------------------------
class RemoteChat:
    """Replies from the chat endpoint of a running server, streamed; the server keeps its own cache."""

    def __init__(self, remote: RemoteGenerator) -> None:
        self.remote = remote  # its URL, key, model name, seed and the sampling body of a request
        self.seed = remote.seed
        self.turns = 0

    def complete(
        self, messages: list[Message], on_text: OnText, cancel: threading.Event | None = None
    ) -> Turn:
        body = self.remote._body("", self._seed())
        del body["prompt"], body["n"]
        body.update(messages=messages, stream=True, stream_options={"include_usage": True})
        text, reason, usage, first = "", "length", {}, None
        started = time.perf_counter()
        with self._post(body) as response:
            for line in response:
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break  # closing the connection ends the request on the server
                if not line.startswith(b"data: ") or line[6:].strip() == b"[DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise _server_error(event["error"].get("message"))
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        first = first if first is not None else time.perf_counter() - started
                        on_text(piece)
                        text += piece
                    reason = choice.get("finish_reason") or reason
        self.turns += 1
        if reason == "stop" and not self.remote.cfg.stop:
            reason = "eos"
        return Turn(
            text,
            reason,
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            seconds=round(time.perf_counter() - started, 4),
            first_token_seconds=None if first is None else round(first, 4),
        )

    def _seed(self) -> int | None:
        """Turn k (from 0) samples with seed + k: a fresh draw each turn, the same run again for a seed."""
        return self.remote.prompt_seed(self.turns)

    def _post(self, body: dict[str, Any]) -> Any:
        from llmkit.remote import _refused

        headers = {"Content-Type": "application/json", **self.remote._headers()}
        request = urllib.request.Request(
            self.remote.url + "/v1/chat/completions", data=json.dumps(body).encode(), headers=headers
        )
        try:
            return urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                error = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                error = {}
            if error.get("code") == "context_length_exceeded":
                raise ContextFull(f"the conversation is full: {error.get('message')}", FULL_HINT) from None
            if error.get("code") == "no_chat_template":
                raise NoChatTemplate(
                    f"the server's model has no chat template ({exc.code})",
                    "start the server with --chat-template chatml (or zephyr, or a FILE.jinja), "
                    "or serve a chat model",
                ) from None
            exc.read = lambda: payload  # type: ignore[method-assign]  # _refused reads the body again
            raise _refused(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self.remote._unreachable(exc) from None


def _server_error(message: str | None) -> LlmkitError:
    from llmkit.remote import ServerError

    return ServerError(f"the server failed: {message}", "see the server's log")
