"""The engine in a process of its own: HTTP and decoding no longer take turns on one GIL.

`llmkit serve` runs the routes and the tokenizer in its own process and the model, with the engine
(engine.py), in a child it spawns (vLLM's API-server / engine-core split). Under many clients the
event loop's work per token (SSE chunks, ASGI sends) and the engine's per-step Python had to share
one interpreter lock; now each has a core. The child sends each step's chunks in one message, with
its counters for /health; the front hands them to the requests' event loop as the engine's own
callbacks did.

`EngineProcess` offers what the routes use of an `Engine` (tokenizer, context, sequence, submit,
cancel, stats, alive, start, stop), so the app does not know which one it has.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError
from llmkit.serve.engine import Chunk, Failed

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from llmkit.config import LoadConfig
    from llmkit.serve.sampling import SamplingParams
    from llmkit.templates import ChatTemplate

ENV = "LLMKIT_SERVE_ENGINE"  # "process" (the default) or "thread": the engine in the server's own process
READY_POLL_S = 0.5


def in_process() -> bool:
    value = os.environ.get(ENV, "process").strip().lower()
    if value not in ("process", "thread"):
        from llmkit.errors import UsageError

        raise UsageError(f"{ENV}={value!r} is not an engine placement", f"set {ENV} to process or thread")
    return value == "thread"


@dataclass
class Setup:
    """What the child needs to build the engine `llmkit serve` would have built in process."""

    load: LoadConfig
    template: ChatTemplate | None
    max_batch: int | None  # None: the device's default
    verbose: bool = False
    quiet: bool = False
    debug: bool = False


class RemoteSequence:
    """The front's handle on one sequence decoding in the child."""

    def __init__(self, sid: int, message: tuple, deliver: Callable[[Chunk], None]) -> None:
        self.sid = sid
        self.message = message  # (sid, prompt ids, params, seed, prompt text), sent on submit
        self.deliver = deliver
        self.completion_tokens = 0  # the child's count, set with the last chunk


class EngineProcess:
    """A child process that owns the model and the engine; `submit` and `cancel` from any thread."""

    def __init__(self, setup: Setup) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that has torch's threads
        commands, self._commands = context.Pipe(duplex=False)
        self._events, events = context.Pipe(duplex=False)
        self._proc = context.Process(
            target=_child, args=(setup, commands, events), name="llmkit-engine", daemon=True
        )
        self._proc.start()
        commands.close()  # the child holds these ends now; ours would hide its exit from us
        events.close()
        self._send_lock = threading.Lock()
        self._live: dict[int, RemoteSequence] = {}
        self._ids = itertools.count()
        self._dead = False
        self._reader = threading.Thread(target=self._read, name="llmkit-engine-events", daemon=True)
        try:
            # The tokenizer comes back pickled: its library loads here while the child loads the model.
            from transformers import PreTrainedTokenizerFast  # noqa: F401

            ready = self._wait_ready()
        except BaseException:  # a load error, or Ctrl-C while the model loads
            self._proc.kill()
            self._proc.join(5)
            raise
        self.tokenizer = ready["tokenizer"]
        self.context: int = ready["context"]
        self.weight_left_layers: int = ready["weight_left_layers"]
        self._stats: dict[str, Any] = ready["stats"]

    # -- what the routes use ------------------------------------------------------------------------
    def sequence(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        deliver: Callable[[Chunk], None],
        seed: int | None = None,
        prompt_text: str | None = None,
    ) -> RemoteSequence:
        sid = next(self._ids)  # no seed: the engine picks one, as in process
        return RemoteSequence(sid, (sid, prompt_ids, params, seed, prompt_text), deliver)

    def submit(self, sequences: list[RemoteSequence]) -> None:
        for seq in sequences:
            self._live[seq.sid] = seq
        if not self._dead:
            self._send(("submit", [seq.message for seq in sequences]))
        if self._dead:  # before, or found while sending: the reader may have failed the others already
            self._fail_all()

    def cancel(self, sequences: list[RemoteSequence]) -> None:
        sids = [seq.sid for seq in sequences if self._live.pop(seq.sid, None) is not None]
        if sids and not self._dead:
            self._send(("cancel", sids))

    def stats(self) -> dict[str, Any]:
        stats = dict(self._stats)
        # Submitted here but not yet counted there (the child reports after its next step).
        stats["waiting"] = max(stats["waiting"], len(self._live) - stats["running"])
        return stats

    @property
    def alive(self) -> bool:
        return not self._dead and self._proc.is_alive()

    def start(self) -> None:
        self._reader.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let the child finish what is in flight (within `timeout`), then end it."""
        if not self._dead:
            self._send(("stop", timeout))
        self._proc.join(timeout + 5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._reader.is_alive():
            self._reader.join(5)

    # -- inside -------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._commands.send(message)
        except (OSError, ValueError):  # the child has gone: the reader fails what was in flight
            self._dead = True

    def _wait_ready(self) -> dict[str, Any]:
        while not self._events.poll(READY_POLL_S):
            if not self._proc.is_alive():
                raise LlmkitError(
                    f"the model process ended while loading (exit code {self._proc.exitcode})",
                    "run again with --verbose; a negative code is the signal that ended it "
                    "(-9: out of memory, most often)",
                )
        kind, payload = self._events.recv()
        if kind == "error":
            raise _rebuilt(payload)
        return payload

    def _read(self) -> None:
        try:
            while True:
                kind, payload = self._events.recv()
                if kind == "stopped":
                    break
                items, self._stats = payload
                for sid, chunk, completion_tokens in items:
                    seq = self._live.get(sid)
                    if seq is None:
                        continue  # cancelled meanwhile
                    if completion_tokens is not None:
                        seq.completion_tokens = completion_tokens
                        self._live.pop(sid, None)
                    with contextlib.suppress(RuntimeError):  # its event loop closed: shutting down
                        seq.deliver(chunk)
        except (EOFError, OSError):
            pass
        self._dead = True
        self._fail_all()

    def _fail_all(self) -> None:
        error = Failed("EngineStopped", "the decoding process has stopped")
        for sid in list(self._live):
            seq = self._live.pop(sid, None)
            if seq is not None:
                seq.deliver(Chunk(error=error))


def _rebuilt(payload: dict[str, Any]) -> BaseException:
    import llmkit.errors

    cls = getattr(llmkit.errors, payload["type"], None)
    if isinstance(cls, type) and issubclass(cls, LlmkitError):
        return cls(payload["message"], payload["hint"])
    return RuntimeError(f"the model process failed: {payload['type']}: {payload['message']}")


# -- the child ----------------------------------------------------------------------------------------
def _child(setup: Setup, commands: Connection, events: Connection) -> None:
    # Ctrl-C and SIGTERM reach the whole process group; the front decides when the engine stops
    # (after requests in flight end), and the pipe's end tells the child if the front is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from llmkit.cli import _output as out

    out.settings.verbose, out.settings.quiet, out.settings.debug = setup.verbose, setup.quiet, setup.debug
    try:
        engine = build(setup)
    except BaseException as exc:
        if out.debug_enabled():
            traceback.print_exc()
        hint = exc.hint if isinstance(exc, LlmkitError) else None
        message = exc.message if isinstance(exc, LlmkitError) else str(exc)
        events.send(("error", {"type": type(exc).__name__, "message": message, "hint": hint}))
        return
    _Child(engine, commands, events).run()


def build(setup: Setup) -> Any:
    """The engine `llmkit serve` decodes with: the model loaded, its chat template applied."""
    from llmkit.cli._loading import load_model, use_chat_template
    from llmkit.generation import AUTO_BATCH
    from llmkit.serve.engine import Engine

    lm = load_model(setup.load)
    use_chat_template(lm, setup.template, setup.load.quantize)  # before the engine reads its stops
    return Engine(lm, max_batch=setup.max_batch or AUTO_BATCH.get(lm.device.type, 16))


class _Child:
    """The child's side: commands in on the main thread, each step's chunks out from the worker."""

    def __init__(self, engine: Any, commands: Connection, events: Connection) -> None:
        self.engine, self.commands, self.events = engine, commands, events
        self.sequences: dict[int, Any] = {}
        self.outbox: list[tuple[int, Chunk, int | None]] = []
        self.last_stats: dict[str, Any] | None = None

    def run(self) -> None:
        engine = self.engine
        ready = {
            "tokenizer": engine.tokenizer,
            "context": engine.context,
            "weight_left_layers": engine.weight_left_layers,
            "stats": engine.stats(),
        }
        self.events.send(("ready", ready))
        engine.after_step = self.flush
        engine.start()
        timeout = 5.0
        try:
            while True:
                kind, payload = self.commands.recv()
                if kind == "submit":
                    self.submit(payload)
                elif kind == "cancel":
                    engine.cancel([s for s in map(self.sequences.pop, payload, itertools.repeat(None)) if s])
                elif kind == "stop":
                    timeout = payload
                    break
        except (EOFError, OSError):  # the front is gone: nobody is waiting for these requests
            timeout = 0.0
        engine.stop(timeout)
        with contextlib.suppress(OSError):
            self.events.send(("stopped", None))

    def submit(self, messages: list[tuple]) -> None:
        new = []
        for sid, ids, params, seed, text in messages:

            def deliver(chunk: Chunk, sid: int = sid) -> None:
                self.outbox.append((sid, chunk, None))

            seq = self.engine.sequence(ids, params, deliver, seed=seed, prompt_text=text)
            self.sequences[sid] = seq
            new.append(seq)
        self.engine.submit(new)

    def flush(self) -> None:
        """On the worker, after a step: its chunks and the counters, in one message."""
        stats = self.engine.stats()
        if not self.outbox and stats == self.last_stats:
            return
        items, self.outbox = self.outbox, []
        for i, (sid, chunk, _) in enumerate(items):
            if chunk.error is not None:
                chunk.error = Failed(type(chunk.error).__name__, str(chunk.error))
            if chunk.error is not None or chunk.finish_reason is not None:
                seq = self.sequences.pop(sid, None)
                items[i] = (sid, chunk, seq.completion_tokens if seq is not None else 0)
        self.last_stats = stats
        with contextlib.suppress(OSError):  # the front is gone; the main thread sees it and stops
            self.events.send(("step", (items, stats)))
