"""How many CPU threads a decoding step uses: whichever measured faster for batches of its size.

A server's decoding steps are not a benchmark's. On a 2-core machine the HTTP event loop runs on
one core while torch's threads want both, and its threads wait passively (hardware.py), so every
parallel operator pays a wake-up: for the built-in model one thread decoded 1.35-1.6x faster than
two at 1 and at 16 clients, while for GPT-2 small's shape two threads won at 16 clients and lost at
one (bench/results/serve_threads.json). Which count wins depends on the model, the batch and the
machine, so the engine measures its own steps: per batch size rounded to a power of two, a few steps
at each candidate count, then the faster one for the rest of the server's life (fixed, so that a
request's result does not change with what was measured meanwhile); sizes whose answer follows from
the others' (assumed: more rows never make fewer threads pay) are not measured.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping

from llmkit.errors import UsageError

TRIALS = 8  # timed steps per candidate and batch size before the choice is made
ENV = "LLMKIT_SERVE_THREADS"


def bucket(rows: int) -> int:
    """Batches of 1, 2-3, 4-7, 8-15, … rows share a choice."""
    return max(1, rows).bit_length()


class ThreadTuner:
    """Chooses between one thread and `most` per batch size from the step times it is given
    (`pinned`: always `most`)."""

    def __init__(self, most: int, trials: int = TRIALS, pinned: bool = False) -> None:
        self.most = max(1, most)
        self.candidates = (1, self.most) if self.most > 1 and not pinned else (self.most,)
        self.trials = trials
        self._times: dict[int, dict[int, list[float]]] = {}
        self._chosen: dict[int, int] = {}

    def choose(self, rows: int) -> int:
        """Threads for a decoding step of `rows` rows: a candidate still owed trials, else the choice."""
        key = bucket(rows)
        chosen = self._chosen.get(key)
        if chosen is not None:
            return chosen
        if len(self.candidates) == 1:
            self._chosen[key] = self.candidates[0]
            return self.candidates[0]
        inferred = self._inferred(key)
        if inferred is not None:
            self._chosen[key] = inferred
            return inferred
        times = self._times.setdefault(key, {c: [] for c in self.candidates})
        # Alternate the candidates so a change in the machine's load hits them alike.
        return min(self.candidates, key=lambda c: (len(times[c]), -c))

    def _inferred(self, key: int) -> int | None:
        """A choice that follows from others, assuming more rows never make fewer threads pay: a batch
        size above one that chose every thread takes every thread, one below a size that chose one
        thread takes one, and one between a size that chose one and a size that chose every thread
        takes every thread (what the engine did before it measured). Measuring costs steps at the
        slower count, 16 per size, and sizes between those ends occur only while a batch fills or
        drains: measured for ever there, GPT-2 small's shape served 16 clients at 0.95x the pinned
        server's tokens/s (7 noisy rounds), 1.03x once they were inferred."""
        smaller = [t for k, t in self._chosen.items() if k < key]
        larger = [t for k, t in self._chosen.items() if k > key]
        if self.most in smaller or (1 in smaller and self.most in larger):
            return self.most
        if 1 in larger:
            return 1
        return None

    def record(self, rows: int, threads: int, seconds: float) -> None:
        key = bucket(rows)
        if key in self._chosen or threads not in self.candidates:
            return
        times = self._times.setdefault(key, {c: [] for c in self.candidates})
        times[threads].append(seconds)
        if all(len(t) >= self.trials for t in times.values()):
            self._chosen[key] = min(self.candidates, key=lambda c: statistics.median(times[c]))

    def choices(self) -> dict[str, int]:
        """What was decided so far, by batch sizes ("1", "2-3", …), for /health and -v."""
        return {_label(key): threads for key, threads in sorted(self._chosen.items())}


def _label(key: int) -> str:
    low, high = 1 << (key - 1), (1 << key) - 1
    return str(low) if low == high else f"{low}-{high}"


def for_engine(threads: int, environ: Mapping[str, str] = os.environ) -> ThreadTuner:
    """The tuner for an engine whose torch has `threads` threads (--threads caps it).

    `LLMKIT_SERVE_THREADS=N` pins decoding steps to N threads (benchmarks comparing the two,
    and users who measured for themselves); unset or `auto`, the engine measures.
    """
    value = environ.get(ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return ThreadTuner(threads)
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"{ENV}={value!r} is not a thread count", "use a whole number (1 or more), or auto")
    return ThreadTuner(int(value), pinned=True)
