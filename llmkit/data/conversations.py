"""Conversation records read from JSONL: a `messages` list rendered through the model's chat template,
learnt on the assistant turns only.

A record's messages are rendered to one text by the template; each assistant turn's characters are
found by rendering prefixes: messages[:i] with the generation prompt ends where assistant turn i
begins, messages[:i+1] ends after its end-of-turn marker (<|im_end|>, </s>, <|eot_id|>, …). The spans,
trailing whitespace after the marker left out, become the learn mask once the text is tokenized with
offsets (encoder.py). Rendering prefixes works for every template that renders earlier turns the same
whatever follows; one that doesn't (it rewrites earlier turns) is refused by name rather than trained
on a mask that is off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

from llmkit.data.sources import ReadStats, _close, _json_lines, _open, _Source
from llmkit.errors import InputError, ModelError

ROLES = ("system", "user", "assistant")

Spans = list[tuple[int, int]]
"""Character spans [start, end) of a rendered conversation that the loss learns."""
Render = Callable[[list[dict[str, str]], bool], str]


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template text; ModelError when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise ModelError(
            "the model has no chat template, so conversation records can't be rendered",
            "pass --chat-template to give one, or train on prompt/completion records instead",
        )
    return template


def template_digest(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()


def renderer(tokenizer: Any, template: str) -> Render:
    """render(messages, add_generation_prompt) → text, through `template`."""

    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    return render


def assistant_spans(messages: list[dict[str, str]], render: Render, where: str) -> tuple[str, Spans]:
    """(the rendered conversation, each assistant turn's span: its content and end-of-turn marker)."""

    def rendered(part: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return render(part, generation_prompt)
        except Exception as exc:  # the template's raise_exception ("roles must alternate"), or a bug in it
            raise InputError(
                f"{where}: the chat template refuses the conversation: {exc}",
                "fix the record to the template's rules (many want user and assistant turns to "
                "alternate), or train with another template (--chat-template)",
            ) from None

    text = rendered(messages, False)
    spans: Spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = rendered(messages[:i], True)
        through = rendered(messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise InputError(
                f"{where}: the chat template renders assistant turn {i + 1} differently once later "
                "messages follow, so its tokens can't be found",
                "use a template that renders earlier turns unchanged (it may not rewrite past turns)",
            )
        end = len(through.rstrip())  # the newline after <|im_end|> belongs to no turn
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def conversation_items(
    source: _Source, *, field: str, errors: str, stats: ReadStats, render: Render
) -> Iterator[tuple[str, Spans, int]]:
    """(rendered text, assistant spans, line number) for each record of a JSONL source."""
    hint = (
        f'each line must be a JSON object with a "{field}" list of {{"role", "content"}} messages, '
        f"roles {', '.join(ROLES)}, at least one assistant turn (see --messages-field)"
    )
    raw = _open(source)
    try:
        for number, obj, _line in _json_lines(raw, source.label, errors, stats, hint):
            where = f"{source.label}:{number}"
            messages = _messages(obj, field, where, hint)
            text, spans = assistant_spans(messages, render, where)
            stats.documents += 1
            yield text, spans, number
    finally:
        _close(raw, source)


def _messages(obj: dict, field: str, where: str, hint: str) -> list[dict[str, str]]:
    """obj[field], checked: a non-empty list of messages with known roles, string content, an assistant."""
    if field not in obj:
        if "prompt" in obj or "completion" in obj:
            raise InputError(
                f'{where}: a prompt/completion record among conversation records (no "{field}" field)',
                "one run trains on one kind of record: convert it to messages, or split the files",
            )
        raise InputError(f'{where}: no "{field}" field', hint)
    value = obj[field]
    if not isinstance(value, list) or not value:
        raise InputError(f'{where}: "{field}" must be a non-empty list of messages', hint)
    messages: list[dict[str, str]] = []
    for n, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise InputError(f"{where}: message {n} is {type(message).__name__}, not an object", hint)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"{where}: message {n} has role {role!r}, not one of {', '.join(ROLES)}", hint)
        if not isinstance(content, str):
            raise InputError(
                f'{where}: message {n} "content" is {type(content).__name__}, not a string', hint
            )
        if any("\ud800" <= c <= "\udfff" for c in content):  # a JSON escape can make one
            raise InputError(f"{where}: message {n} has a lone surrogate", "fix the \\u escape")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: no assistant message, so nothing to learn", hint)
    return messages
