"""The output directory of a training run: claiming it, metrics, and a final save that is atomic.

OUT only becomes a model directory (config.json present; adapter_config.json for a LoRA adapter)
after the weights and tokenizer are in place, and `llmkit.json` is written last: a run killed
mid-save never leaves OUT looking complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from llmkit.checkpoints import complete, fault
from llmkit.errors import OutputError, UsageError

METADATA = "llmkit.json"
METRICS = "metrics.jsonl"
CARD = "README.md"
CHECKPOINTS = "checkpoints"
PLOT = "loss.png"  # what `llmkit plot OUT` writes by default
# What makes a directory a model (or a LoRA adapter) to llmkit, transformers and PEFT.
MARKERS = ("config.json", "adapter_config.json")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
TEMP_PREFIX = ".llmkit-tmp-"


def is_llmkit_run(path: Path) -> bool:
    return (path / METADATA).is_file() or (path / METRICS).is_file() or (path / CHECKPOINTS).is_dir()


def claim(path: Path, *, overwrite: bool) -> None:
    """Make OUT ready for a fresh run, refusing a directory that is somebody else's, or an earlier run's
    model or checkpoints, unless `overwrite`. (A resumed run never claims OUT.)"""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} exists and is not a directory", "pass a directory path with -o")
    if path.is_dir():
        earlier = is_llmkit_run(path)
        if any(path.iterdir()) and not earlier and not overwrite:
            raise OutputError(
                f"{path} is not empty and is not an earlier llmkit run",
                "pick another -o, or pass --overwrite to replace the model files in it",
            )
        if earlier and not overwrite:
            _refuse_earlier_run(path)
        # Remove what an earlier run left, config.json first so OUT stops looking like a finished model.
        for name in (*MARKERS, METADATA, *MODEL_FILES, METRICS, CARD, *([PLOT] if earlier else [])):
            (path / name).unlink(missing_ok=True)
        for stale in [*path.glob(TEMP_PREFIX + "*"), path / CHECKPOINTS]:
            shutil.rmtree(stale, ignore_errors=True)  # a fresh run must never resume into an older one
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / (TEMP_PREFIX + "probe")
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"cannot write to {path}: {exc.strerror or exc}",
            "check the path and its permissions, or pick another -o",
        ) from None


def _refuse_earlier_run(path: Path) -> None:
    """An earlier run's model or checkpoints are not replaced without a word; a run that stopped before
    its first checkpoint left only metrics, and OUT is taken over as before."""
    if any((path / name).is_file() for name in (*MARKERS, METADATA)):
        raise UsageError(
            f"{path} holds the model of an earlier llmkit run",
            "pick another -o, or pass --overwrite to replace it (its model, checkpoints, metrics and "
            f"{PLOT} go; other files stay)",
        )
    if complete(path):
        raise UsageError(
            f"{path} holds checkpoints of an earlier llmkit run",
            "continue it with --resume, or pass --overwrite to start over (its checkpoints go)",
        )


@dataclass
class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written so a crash loses nothing."""

    file: TextIO

    @classmethod
    def open(cls, path: Path) -> MetricsLog:
        return cls((path / METRICS).open("a", encoding="utf-8"))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def save_final(
    out: Path, model: Any, tokenizer: Any, metadata: dict[str, Any], card: str, **save_options: Any
) -> None:
    """Write the model to a temporary sibling, then move it in: weights and tokenizer, config, metadata.

    `model` may be a PEFT adapter; `save_options` go to its save_pretrained.
    """
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True, **save_options)
        tokenizer.save_pretrained(tmp)
        (tmp / CARD).write_text(card, encoding="utf-8")  # replaces any card save_pretrained wrote
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        last = (*MARKERS, METADATA)
        for file in sorted(tmp.iterdir()):
            if file.name not in last:
                os.replace(file, out / file.name)
        fault("final-save")
        for name in last:
            if (tmp / name).is_file():
                _fsync(tmp / name)
                os.replace(tmp / name, out / name)
    except OSError as exc:
        raise OutputError(
            f"could not save the model to {out}: {exc.strerror or exc}",
            "free some space or pick another -o; OUT was not left looking complete",
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
