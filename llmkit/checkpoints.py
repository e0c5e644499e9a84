"""Training checkpoints: written atomically, pruned only after the new one is complete, found again.

A checkpoint is `OUT/checkpoints/step-N`: accelerate's saved state (model, optimizer, scheduler,
loss scaler, every process's RNG states) plus `trainer_state.json`, written last. It is built in
`.tmp-step-N` and renamed into place, so a kill at any instant leaves the previous one whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import InputError, OutputError

if TYPE_CHECKING:
    from accelerate import Accelerator

DIR = "checkpoints"
STATE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step-(\d+)$")


def root(out: Path) -> Path:
    return out / DIR


def complete(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    if root(out).is_dir():
        for path in root(out).iterdir():
            match = _NAME.match(path.name)
            if match and (path / STATE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def newest(out: Path) -> Path | None:
    found = complete(out)
    return found[-1][1] if found else None


def remove_stale(out: Path) -> None:
    """Half-written checkpoints from a run that died mid-save."""
    if root(out).is_dir():
        for path in root(out).glob(TMP_PREFIX + "*"):
            shutil.rmtree(path, ignore_errors=True)


def fault(point: str, step: int | None = None) -> None:
    """Test hook: LLMKIT_FAULT=point (or point@step) makes the process SIGKILL itself right there."""
    wanted = os.environ.get("LLMKIT_FAULT")
    if wanted and wanted in (point, f"{point}@{step}"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def save(acc: Accelerator, out: Path, step: int, state: dict[str, Any], keep: int, keep_best: bool) -> Path:
    """Every process calls this; the main process publishes the result and prunes old ones."""
    final = root(out) / f"step-{step}"
    tmp = root(out) / f"{TMP_PREFIX}step-{step}"
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            fault("checkpoint-write", step)
            (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune(out, keep, keep_best)
    except OSError as exc:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"could not write checkpoint {final}: {exc.strerror or exc}",
            "free some space (older checkpoints were kept) and resume with --resume",
        ) from None
    acc.wait_for_everyone()
    return final


def prune(out: Path, keep: int, keep_best: bool) -> None:
    found = complete(out)
    protected = {path for _, path in found[-keep:]} if keep > 0 else set()
    if keep_best:
        best = min(
            (
                (load_state(p).get("val_loss"), p)
                for _, p in found
                if load_state(p).get("val_loss") is not None
            ),
            default=None,
            key=lambda t: t[0],
        )
        if best is not None:
            protected.add(best[1])
    for _, path in found:
        if path not in protected:
            shutil.rmtree(path, ignore_errors=True)


def load_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path} is not a complete checkpoint ({STATE}: {exc})",
            "pass a checkpoints/step-N directory, or --resume for the newest one",
        ) from None


def locate(out: Path, explicit: str | None) -> Path:
    if explicit is not None:
        path = Path(explicit)
        if not (path / STATE).is_file():
            raise InputError(
                f"{explicit} is not a complete checkpoint", "pass an OUT/checkpoints/step-N directory"
            )
        return path
    path = newest(out)
    if path is None:
        raise InputError(
            f"no complete checkpoint in {root(out)} to resume from",
            "start without --resume, or pass --save-every to write checkpoints",
        )
    return path


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with file.open("rb") as f:
                os.fsync(f.fileno())
