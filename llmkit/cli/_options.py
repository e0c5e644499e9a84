"""Options shared by several commands, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", envvar="LLMKIT_MODEL", help="Local model directory, built-in model name, or hub id."
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).")
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto, float32, bfloat16 or float16 (auto: bfloat16 on GPUs that support it, else float32).",
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


def load_config(model: str, device: str, dtype: str, offline: bool, allow_pickle: bool):
    from llmkit.config import LoadConfig

    return LoadConfig(model=model, device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle)


def check_format(fmt: str, allowed: tuple[str, ...]) -> str:
    if fmt not in allowed:
        raise typer.BadParameter(f"must be one of: {', '.join(allowed)}", param_hint="--format")
    return fmt
