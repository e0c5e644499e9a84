"""Prompt/completion records read from JSONL: whether the data is records, and each record's texts.

A record is ids(prompt) + ids(completion) + EOS, the two texts tokenized apart (so the boundary between
them is exact) with a learn mask that is 0 on the prompt's ids and 1 on the completion's and the EOS.
The cache (cache.py) stores the ids, the mask (`<fingerprint>.mask`, one byte per id) and a record table
(`<fingerprint>.rec`: length, input index and line number per record); packing.py packs them into blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from llmkit.data.sources import ReadStats, _close, _json_lines, _open, _Source, _string_field
from llmkit.errors import InputError

DEFAULT_FIELDS = ("prompt", "completion")
MESSAGES = "messages"


# -- Which mode: text or prompt/completion -----------------------------------------------------------


def pair_fields(
    sources: Sequence[_Source], text_field: str, prompt_field: str | None, completion_field: str | None
) -> tuple[str, str] | None:
    """(prompt field, completion field) when the data is prompt/completion records, else None (text).

    Pairs when either field is given; else when the first record of the first JSONL input has both
    default fields ("prompt" and "completion") and no `text_field`.
    """
    if prompt_field is not None or completion_field is not None:
        return (prompt_field or DEFAULT_FIELDS[0], completion_field or DEFAULT_FIELDS[1])
    first = next((s for s in sources if s.jsonl and s.path is not None), None)
    record = _first_record(first) if first is not None else None
    if isinstance(record, dict) and all(f in record for f in DEFAULT_FIELDS) and text_field not in record:
        return DEFAULT_FIELDS
    return None


def messages_field(
    sources: Sequence[_Source],
    text_field: str,
    prompt_field: str | None,
    completion_field: str | None,
    messages: str | None,
) -> str | None:
    """The messages field when the data is conversation records (conversations.py), else None.

    Conversations when `messages` is given; else, with no prompt/completion field given, when the
    first record of the first JSONL input has a "messages" list and no `text_field`, prompt or completion.
    """
    if messages is not None:
        return messages
    if prompt_field is not None or completion_field is not None:
        return None
    first = next((s for s in sources if s.jsonl and s.path is not None), None)
    record = _first_record(first) if first is not None else None
    if (
        isinstance(record, dict)
        and isinstance(record.get(MESSAGES), list)
        and not any(f in record for f in (text_field, *DEFAULT_FIELDS))
    ):
        return MESSAGES
    return None


def _first_record(source: _Source) -> Any:
    """The first non-blank line of a JSONL file, parsed; None when there is none or it isn't JSON."""
    assert source.path is not None
    try:
        with open(source.path, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except (OSError, ValueError):
        pass
    return None


def _check_sources(sources: list[_Source]) -> list[_Source]:
    """The sources read as JSONL (stdin too); a plain-text file among them is refused."""
    for source in sources:
        if source.path is not None and not source.jsonl:
            raise InputError(
                f"{source.label} is not JSONL, and this run trains on prompt/completion records",
                "text and prompt/completion data can't be mixed in one run: pass only .jsonl files "
                "(--glob '*.jsonl' for directories), or plain text without --prompt-field/--completion-field",
            )
    return [_Source(s.label, s.path, True) for s in sources]


def _pair_items(
    source: _Source, *, fields: tuple[str, str], errors: str, stats: ReadStats
) -> Iterator[tuple[str, str, int]]:
    """(prompt, completion, line number) for each record of a JSONL source."""
    prompt_field, completion_field = fields
    hint = (
        f'each line must be a JSON object with "{prompt_field}" and "{completion_field}" strings '
        "(see --prompt-field, --completion-field)"
    )
    raw = _open(source)
    try:
        for number, obj, line in _json_lines(raw, source.label, errors, stats, hint):
            where = f"{source.label}:{number}"
            if prompt_field not in obj and MESSAGES in obj:
                raise InputError(
                    f'{where}: a conversation record ("{MESSAGES}") among prompt/completion records',
                    "one run trains on one kind of record: split the files, or convert the records",
                )
            prompt = _string_field(obj, prompt_field, where, line, errors, stats, hint)
            completion = _string_field(obj, completion_field, where, line, errors, stats, hint)
            if not prompt:
                raise InputError(
                    f'{where}: "{prompt_field}" is empty',
                    "every completion needs a prompt to follow; text without one trains as plain text",
                )
            stats.documents += 1
            yield prompt, completion, number
    finally:
        _close(raw, source)
