"""The Typer app: global flags, command registration, and the one place errors become exit codes."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from llmkit import __version__
from llmkit.cli import _output as out
from llmkit.errors import LlmkitError

EXIT_INTERRUPTED = 130
# Failures of the machine rather than of llmkit: reported in one line like any other llmkit error.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head`


class LlmkitGroup(TyperGroup):
    """Maps llmkit errors and Ctrl-C to a message and an exit code; tracebacks only with --debug."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            result = super().invoke(ctx)
            _close_process_group()
            return result
        except LlmkitError as exc:
            if out.debug_enabled():
                raise
            out.error(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if out.debug_enabled():
                raise
            sys.stderr.write("Interrupted.\n")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, and keep the final flush from complaining.
            _silence_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if out.debug_enabled():
                raise
            if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
                where = f" ({exc.filename})" if exc.filename else ""
                out.error(
                    LlmkitError(f"{exc.strerror}{where}", "check free space and permissions, then run again")
                )
            else:
                out.error(
                    LlmkitError(
                        f"unexpected {type(exc).__name__}: {exc}",
                        "this is probably a bug in llmkit: rerun with --debug and report the traceback",
                    )
                )
            raise typer.Exit(1) from None


def _close_process_group() -> None:
    """Under torchrun, take the process group down while Python is still whole.

    Left to interpreter teardown, gloo's worker threads can abort the process ("terminate called
    without an active exception"), turning a finished run into a failed one. Only after success: a
    rank that failed can't count on the others joining a collective shutdown.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file descriptor (e.g. under a test runner)


HELP = "A command line for GPT-2-family language models: generate, score, tokenize, inspect, fine-tune."
# name, module under llmkit.cli, function: modules import only typer and stdlib at module level.
COMMANDS = (
    ("generate", "generate", "generate"),
    ("tokenize", "tokenize", "tokenize"),
    ("perplexity", "perplexity", "perplexity"),
    ("info", "info", "info"),
    ("finetune", "finetune", "finetune"),
    ("train-tokenizer", "train_tokenizer", "train_tokenizer"),
    ("plot", "plot", "plot"),
    ("serve", "serve", "serve"),
    ("export", "export", "export"),
    ("chat", "chat", "chat"),
)


def _version(value: bool) -> None:
    if value:
        print(f"llmkit {__version__}")
        raise typer.Exit()


def _global(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            envvar="LLMKIT_THREADS",
            help="CPU threads for torch (default: one per core, waiting passively).",
            show_default=False,
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="LLMKIT_DEBUG", help="Show tracebacks for errors.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    out.settings.verbose, out.settings.quiet, out.settings.debug = verbose, quiet, debug
    from llmkit.errors import UsageError
    from llmkit.hardware import apply_threads

    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, not {threads}")

    out.detail(apply_threads(threads))  # before any command imports torch


def build(names: Sequence[str] | None = None) -> typer.Typer:
    """The app with these commands (all by default)."""
    import importlib

    built = typer.Typer(
        name="llmkit",
        cls=LlmkitGroup,
        help=HELP,
        context_settings={"help_option_names": ["-h", "--help"]},
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    built.callback()(_global)
    for name, module_name, function in COMMANDS:
        if names is None or name in names:
            module = importlib.import_module(f"llmkit.cli.{module_name}")
            built.command(name, epilog=module.EXAMPLES)(getattr(module, function))
    return built


app = build()


def _invoked(args: Sequence[str]) -> str | None:
    """The command named on the command line (global flags take no values), if it is one of ours."""
    first = next((arg for arg in args if not arg.startswith("-")), None)
    return first if any(first == name for name, _, _ in COMMANDS) else None


def main() -> None:
    # Typer builds every registered command's options before running one; with only the one named,
    # a short call (`generate --server`) starts ~20 ms sooner. `llmkit`, `--help` and typos get all.
    command = _invoked(sys.argv[1:])
    (build([command]) if command else app)(prog_name="llmkit")
