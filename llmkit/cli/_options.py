"""Options shared by several commands, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="LLMKIT_MODEL",
        help="Local model directory, built-in model name, hub id, or .gguf file.",
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).")
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto, float32, bfloat16 or float16 (auto: bfloat16 where the device computes it natively — "
        "GPUs, CPUs with avx512_bf16 or AMX — else float32).",
    ),
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="f16, int8 or int4: float16, int8 (fbgemm) or 4-bit (groups of 32) weights on the CPU, "
        "float32 around them — faster decoding; int8 and int4 cost some perplexity.",
        show_default=False,
    ),
]
OfflineOpt = Annotated[
    bool, typer.Option("--offline", help="Never contact the hub: local directories and the local cache only.")
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Allow pickle (.bin) weights, which can run code when loaded. Off by default."
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="Output format: text or json.")]


def load_config(
    model: str, device: str, dtype: str, offline: bool, allow_pickle: bool, quantize: str | None = None
):
    from llmkit.config import LoadConfig

    return LoadConfig(
        model=model, device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle, quantize=quantize
    )


def check_format(fmt: str, allowed: tuple[str, ...]) -> str:
    from llmkit.errors import UsageError

    if fmt not in allowed:
        raise UsageError(f"unknown --format {fmt!r}", f"use {' or '.join(allowed)}")
    return fmt


# Options of the commands that read training data (finetune, train-tokenizer).
DataArg = Annotated[
    list[str], typer.Argument(help="Text files, directories, or - for stdin.", show_default=False)
]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="JSONL field holding the text.")]
GlobOpt = Annotated[
    str | None,
    typer.Option(
        "--glob",
        help="File pattern inside directories (default: common text extensions).",
        show_default=False,
    ),
]
ErrorsOpt = Annotated[str, typer.Option("--errors", help="Invalid UTF-8: replace (and count) or strict.")]
ChatTemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--chat-template",
        help="Chat template to use instead of the model's own: chatml (<|im_start|>role … <|im_end|>, "
        "its two tokens added where the vocabulary lacks them), zephyr (<|user|> … EOS, no tokens added), "
        "or a FILE.jinja.",
        show_default=False,
    ),
]
