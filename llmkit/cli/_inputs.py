"""Reading what the user hands us: positional text, `-`, piped stdin, prompt files."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from llmkit.errors import InputError, UsageError


def stdin_is_terminal() -> bool:
    return sys.stdin is None or sys.stdin.isatty()


def text_argument(words: list[str] | None, what: str) -> str:
    """Positional words joined by spaces; `-` or no words with stdin piped means all of stdin."""
    if words and words != ["-"]:
        return " ".join(words)
    if words == ["-"] or not stdin_is_terminal():
        try:
            return open_text("-").read()
        except UnicodeDecodeError as exc:
            raise InputError(f"stdin is not valid UTF-8 (byte {exc.start})", "convert it to UTF-8") from None
    raise UsageError(f"no {what} given", "pass it as arguments, or pipe it in: echo 'text' | llmkit ... -")


def open_text(path: str, errors: str = "strict") -> TextIO:
    """A UTF-8 text stream for a path or `-`, with llmkit errors for the usual problems."""
    if path == "-":
        # Bytes as they are: UTF-8 whatever the locale, and no newline translation (\r\n stays).
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:
            return sys.stdin
        return io.TextIOWrapper(buffer, encoding="utf-8", errors=errors, newline="")
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path} is a directory", "pass a text file")
    try:
        stream = p.open(encoding="utf-8", errors=errors, newline="")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file", "check the path") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied", "check the file's permissions") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror or exc}") from None
    head = stream.buffer.peek(8192)[:8192] if hasattr(stream, "buffer") else b""
    if b"\x00" in head:
        stream.close()
        raise InputError(f"{path} looks like a binary file (it contains NUL bytes)", "pass a UTF-8 text file")
    return stream


def read_prompts(path: str, fmt: str = "auto") -> Iterator[tuple[Any, str]]:
    """(id, prompt) pairs from a prompt file: one per line, or JSONL objects with "prompt" and "id"."""
    from llmkit.generation import Prompt

    stream = open_text(path)
    try:
        for number, line in enumerate(_lines(stream, path), start=1):
            if not line.strip():
                continue
            if fmt == "auto":
                fmt = (
                    "jsonl" if path.endswith((".jsonl", ".json")) or line.lstrip().startswith("{") else "text"
                )
            if fmt == "text":
                yield Prompt(number, line.rstrip("\r\n"))
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise InputError(
                    f"{path}:{number}: invalid JSON: {exc.msg}",
                    'each line must be an object like {"id": 1, "prompt": "..."}',
                ) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise InputError(
                    f'{path}:{number}: expected an object with a "prompt" string',
                    'each line must be an object like {"id": 1, "prompt": "..."}',
                )
            yield Prompt(obj.get("id", number), obj["prompt"])
    finally:
        if path != "-":
            stream.close()


def _lines(stream: TextIO, path: str) -> Iterator[str]:
    try:
        yield from stream
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {exc.start})", "convert it to UTF-8") from None


def count_prompt_lines(path: str) -> int | None:
    """Non-blank lines of a prompt file, for the progress bar total (None for stdin)."""
    if path == "-":
        return None
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None
