"""`llmkit train-tokenizer`: a GPT-2-style byte-level BPE trained on your own text."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import DataArg, ErrorsOpt, GlobOpt, TextFieldOpt

EXAMPLES = """\b
Examples:
  llmkit train-tokenizer corpus/ -o my-bpe --vocab-size 8000
  llmkit finetune corpus/ -o my-model --from-scratch -m gpt2 --tokenizer my-bpe
"""


def train_tokenizer(
    data: DataArg,
    output: Annotated[
        str, typer.Option("--output", "-o", help="Directory for the tokenizer files.", show_default=False)
    ],
    vocab_size: Annotated[
        int,
        typer.Option("--vocab-size", help="Tokens in the vocabulary, 256 bytes and <|endoftext|> included."),
    ] = 8000,
    min_frequency: Annotated[
        int, typer.Option("--min-frequency", help="Merge only pairs seen this often.")
    ] = 2,
    text_field: TextFieldOpt = "text",
    glob: GlobOpt = None,
    errors: ErrorsOpt = "replace",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace tokenizer files already in OUT.")
    ] = False,
) -> None:
    """Train a byte-level BPE tokenizer (EOS <|endoftext|>) and save it in Hugging Face format."""
    from pathlib import Path

    from llmkit.bpe import EOS, train_bpe
    from llmkit.data import ReadStats, read_documents
    from llmkit.errors import OutputError, UsageError
    from llmkit.models import has_tokenizer, quiet_transformers

    if vocab_size < 258:
        raise UsageError("--vocab-size must be at least 258", "256 byte tokens and <|endoftext|> come first")
    if min_frequency < 1:
        raise UsageError("--min-frequency must be at least 1")
    target = Path(output)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} exists and is not a directory", "pass a directory path with -o")
    if target.is_dir() and has_tokenizer(target) and not overwrite:
        raise OutputError(f"{target} already holds a tokenizer", "pick another -o, or pass --overwrite")
    quiet_transformers(out.settings.verbose)
    stats = ReadStats()
    out.detail(f"training a byte-level BPE of {vocab_size:,} tokens")
    tokenizer = train_bpe(
        read_documents(data, text_field=text_field, glob=glob, errors=errors, stats=stats),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
    )
    if len(tokenizer) <= 257:
        raise UsageError(
            "the data is too small to learn any merges", "add more text or lower --min-frequency"
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(target)
    except OSError as exc:
        raise OutputError(f"cannot write to {target}: {exc.strerror or exc}", "pick another -o") from None
    if stats.invalid_bytes:
        out.warn(f"{stats.invalid_bytes:,} invalid UTF-8 byte(s) were replaced")
    out.say(
        f"trained a {len(tokenizer):,}-token byte-level BPE ({EOS} = {tokenizer.eos_token_id}) on "
        f"{stats.documents:,} document{'s' if stats.documents != 1 else ''}"
    )
    out.write(f"{target}\n")
