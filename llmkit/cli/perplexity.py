"""`llmkit perplexity`: how well a model predicts text (perplexity, NLL, bits per byte)."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    ModelOpt,
    OfflineOpt,
    QuantizeOpt,
    check_format,
)

EXAMPLES = """\b
Examples:
  llmkit perplexity -m gpt2 book.txt
  llmkit perplexity -m ./my-model valid.txt --format json | jq .bits_per_byte
  llmkit perplexity --per-line data.txt | jq -c 'select(.perplexity < 200)'
"""


def perplexity(
    files: Annotated[
        list[str] | None,
        typer.Argument(
            help="Text files to score; `-` (or nothing, with stdin piped) reads stdin.", show_default=False
        ),
    ] = None,
    model: ModelOpt = "gpt2",
    context: Annotated[
        int | None,
        typer.Option(
            "--context", help="Window length in tokens (default: the model's context).", show_default=False
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            "--stride", help="How far each window advances (default: context / 2).", show_default=False
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Windows (or lines) per forward pass.")
    ] = 4,
    per_line: Annotated[
        bool, typer.Option("--per-line", help="Score each line on its own; write JSONL.")
    ] = False,
    fmt: FormatOpt = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    offline: OfflineOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Perplexity of a model on text, with sliding windows so long files are scored exactly once."""
    from llmkit.cli._inputs import open_text, stdin_is_terminal
    from llmkit.cli._loading import load_model
    from llmkit.cli._options import load_config
    from llmkit.config import PerplexityConfig
    from llmkit.errors import UsageError

    check_format(fmt, ("text", "json"))
    if not files:
        if stdin_is_terminal():
            raise UsageError("no files given", "pass text files, or pipe text in with -")
        files = ["-"]
    cfg = PerplexityConfig(context=context, stride=stride, batch_size=batch_size)
    load_cfg = load_config(model, device, dtype, offline, allow_pickle, quantize)
    streams = [(path, open_text(path)) for path in files]  # fail on a bad path before loading the model
    lm = load_model(load_cfg)
    from llmkit.scoring import resolve_window

    resolve_window(lm, cfg)  # a bad --context or --stride fails before any reading
    if per_line:
        _per_line(lm, streams, cfg)
        return
    results = [(path, _score_file(lm, path, stream, cfg)) for path, stream in streams]
    _report(results, fmt)


def _score_file(lm, path: str, stream, cfg):
    from llmkit.errors import InputError
    from llmkit.scoring import perplexity as score
    from llmkit.tokens import iter_ids

    label = "stdin" if path == "-" else path
    try:
        with out.progress(f"scoring {label}", None, unit="windows") as bar:
            return score(
                lm, iter_ids(lm.tokenizer, stream), cfg, on_window=lambda: out.advance(bar), label=label
            )
    except UnicodeDecodeError as exc:
        raise InputError(f"{label}: not valid UTF-8 (byte {exc.start})", "convert it to UTF-8") from None


def _report(results: list, fmt: str) -> None:
    from functools import reduce

    total = reduce(lambda a, b: a + b, (score for _, score in results))
    if fmt == "json":
        record = total.as_dict()
        if len(results) > 1:
            record["files"] = [{"file": path, **score.as_dict()} for path, score in results]
        out.write_json(record)
        return
    rows = results + ([("total", total)] if len(results) > 1 else [])
    for path, score in rows:
        out.write(
            f"{path}: perplexity {score.perplexity:.4f}  nll {score.nll:.4f}  "
            f"bits/byte {score.bits_per_byte:.4f}  ({score.tokens} tokens, {score.bytes} bytes)\n"
        )


def _per_line(lm, streams: list, cfg) -> None:
    from llmkit.scoring import per_line

    for path, stream in streams:
        lines = (line.rstrip("\r\n") for line in stream)
        for number, (line, score) in enumerate(per_line(lm, lines, cfg), start=1):
            out.write_json({"file": path, "line": number, "text": line, **score.as_dict()})
            out.flush()
