"""stdout is data, stderr is talk: the writers for both, and the global verbosity."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from llmkit.errors import LlmkitError


@dataclass
class Verbosity:
    verbose: bool = False
    quiet: bool = False
    debug: bool = False


settings = Verbosity()


def debug_enabled() -> bool:
    return settings.debug or os.environ.get("LLMKIT_DEBUG", "") not in ("", "0")


def console() -> Console:
    """The stderr console for messages and progress; never styled when stderr isn't a terminal."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """Ordinary progress talk: hidden by --quiet."""
    if not settings.quiet:
        console().print(message, markup=False)


def detail(message: str) -> None:
    """Only with --verbose."""
    if settings.verbose and not settings.quiet:
        console().print(message, markup=False)


def warn(message: str) -> None:
    if not settings.quiet:
        console().print(f"Warning: {message}", markup=False, style="yellow")


def error(exc: LlmkitError) -> None:
    """One `Error:` line and, when there is one, a hint. Plain text so pipelines can grep it."""
    lines = [f"Error: {exc.message}"]
    if exc.hint:
        lines.append(f"Hint: {exc.hint}")
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def write(text: str, flush: bool = False) -> None:
    """Data on stdout. Plain text only: never ANSI, whatever the terminal."""
    sys.stdout.write(text)
    if flush:
        sys.stdout.flush()


def write_json(obj: Any, indent: int | None = None) -> None:
    write(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


@contextmanager
def progress(description: str, total: float | None, *, unit: str = "") -> Iterator[Progress | None]:
    """A rich progress bar on stderr, only when stderr is a terminal and not --quiet."""
    if settings.quiet or not stderr_is_terminal():
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console(), transient=True) as bar:
        bar.add_task(description, total=total)
        yield bar


def advance(bar: Progress | None, amount: float = 1) -> None:
    if bar is not None:
        bar.advance(bar.task_ids[0], amount)


def flush() -> None:
    sys.stdout.flush()
