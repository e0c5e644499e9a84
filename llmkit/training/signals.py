"""Ctrl-C and SIGTERM during training: a request to stop at the end of the step, not a crash."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Stoppable(Protocol):
    stop_signal: int | None
    """The first signal received (None: none yet); the loop checkpoints and stops when it is set."""


@contextmanager
def catching(trainer: Stoppable) -> Iterator[None]:
    """Ctrl-C or SIGTERM: finish the step, checkpoint, stop. A second Ctrl-C aborts at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        if trainer.stop_signal is None:
            trainer.stop_signal = signum
        elif signum == signal.SIGINT and trainer.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
