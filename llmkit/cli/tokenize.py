"""`llmkit tokenize`: text to token ids (or strings, or a count), and ids back to text."""

from __future__ import annotations

import io
import json
import re
from typing import Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import AllowPickleOpt, FormatOpt, ModelOpt, OfflineOpt, check_format

EXAMPLES = """\b
Examples:
  llmkit tokenize -m gpt2 "Hello world"
  llmkit tokenize --count < book.txt
  llmkit tokenize "Hello world" | llmkit tokenize --decode
"""


def tokenize(
    text: Annotated[
        list[str] | None,
        typer.Argument(
            help="Text to tokenize (joined by spaces). `-`, or nothing with stdin piped, reads stdin.",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = "gpt2",
    file: Annotated[
        str | None, typer.Option("--file", help="Read the text from this file.", show_default=False)
    ] = None,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="Print token strings instead of ids (JSON has both).")
    ] = False,
    count: Annotated[bool, typer.Option("--count", "-c", help="Print only the number of tokens.")] = False,
    decode: Annotated[bool, typer.Option("--decode", "-d", help="Read ids, print the text.")] = False,
    fmt: FormatOpt = "text",
    offline: OfflineOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Turn text into token ids, token strings or a count; or ids back into text."""
    from llmkit.cli._inputs import open_text, stdin_is_terminal
    from llmkit.cli._loading import load_tokenizer_only
    from llmkit.cli._options import load_config
    from llmkit.errors import UsageError

    check_format(fmt, ("text", "json"))
    if sum([tokens, count, decode]) > 1:
        raise UsageError("--tokens, --count and --decode exclude each other")
    if file is not None and text:
        raise UsageError("pass text or --file, not both")
    if file is not None:
        stream = open_text(file)
    elif text and text != ["-"]:
        stream = io.StringIO(" ".join(text))
    elif text == ["-"] or not stdin_is_terminal():
        stream = open_text("-")
    else:
        raise UsageError("no text given", "pass it as arguments, with --file, or pipe it in")
    tokenizer = load_tokenizer_only(load_config(model, "cpu", "float32", offline, allow_pickle))
    if decode:
        _decode(tokenizer, stream.read(), fmt)
        return
    _encode(tokenizer, stream, fmt, tokens=tokens, count=count, label=file or "stdin")


def _encode(tokenizer, stream, fmt: str, *, tokens: bool, count: bool, label: str) -> None:
    from llmkit.errors import InputError
    from llmkit.tokens import SMALL_CHUNK_CHARS, count_tokens, iter_ids

    total, all_ids, first = 0, [], True
    try:
        if count:
            total = count_tokens(tokenizer, stream)
        for ids, _ in [] if count else iter_ids(tokenizer, stream, SMALL_CHUNK_CHARS):
            total += len(ids)
            if fmt == "json":
                all_ids.extend(ids)
            elif ids:
                shown = tokenizer.convert_ids_to_tokens(ids) if tokens else map(str, ids)
                out.write(("" if first else " ") + " ".join(shown))
                first = False
    except UnicodeDecodeError as exc:
        raise InputError(f"{label}: not valid UTF-8 (byte {exc.start})", "convert it to UTF-8") from None
    if fmt == "json":
        # The whole answer: ids and their strings side by side (--count asks for the number only).
        record: dict = {"count": total}
        if not count:
            record["ids"] = all_ids
            record["tokens"] = tokenizer.convert_ids_to_tokens(all_ids)
        out.write_json(record)
    elif count:
        out.write(f"{total}\n")
    else:
        out.write("\n")


def _decode(tokenizer, raw: str, fmt: str) -> None:
    from llmkit.errors import InputError

    raw = raw.strip()
    try:
        ids = json.loads(raw) if raw.startswith("[") else [int(x) for x in re.split(r"[\s,]+", raw) if x]
    except ValueError:
        raise InputError(
            "--decode expects token ids: integers separated by spaces or commas, or a JSON list",
            "for example: 464 2068 7586",
        ) from None
    if not all(isinstance(i, int) for i in ids):
        raise InputError("--decode expects a JSON list of integers")
    bad = [i for i in ids if not 0 <= i < len(tokenizer)]
    if bad:
        raise InputError(
            f"token id {bad[0]} is outside the vocabulary (0 to {len(tokenizer) - 1})",
            "were these ids made with another model's tokenizer?",
        )
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if fmt == "json":
        out.write_json({"text": text, "count": len(ids)})
    else:
        out.write(text + ("" if text.endswith("\n") else "\n"))
