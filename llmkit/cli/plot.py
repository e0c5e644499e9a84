"""`llmkit plot`: the loss and learning-rate curves of a training run, as a PNG."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.cli import _output as out

EXAMPLES = """\b
Examples:
  llmkit plot my-model
  llmkit plot my-model -o curves.png
"""


def plot(
    run_dir: Annotated[
        str, typer.Argument(help="A finetune output directory (or its metrics.jsonl).", show_default=False)
    ],
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="PNG to write (default: RUN_DIR/loss.png).", show_default=False),
    ] = None,
) -> None:
    """Plot train/val loss and the learning rate from a run's metrics.jsonl."""
    from pathlib import Path

    from llmkit.errors import OutputError, UsageError
    from llmkit.plotting import plot as draw
    from llmkit.plotting import read_metrics

    run = Path(run_dir)
    rows = read_metrics(run)
    target = Path(output) if output else (run if run.is_dir() else run.parent) / "loss.png"
    if target.suffix.lower() != ".png":
        raise UsageError(f"{target} is not a .png path", "pass -o something.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("plotting needs matplotlib", "pip install 'llmkit[plot]'") from None
    try:
        draw(rows, target, title=run.resolve().name)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}", "pick another -o") from None
    out.write(f"{target}\n")
