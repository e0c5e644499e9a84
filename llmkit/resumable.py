"""JSONL outputs that a later run can continue: find what is done, drop what is half-written."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from llmkit.errors import OutputError


def id_key(value: Any) -> str:
    """Ids compare as JSON, so 3 and "3" stay different and survive a round trip through the file."""
    return json.dumps(value, sort_keys=True)


def completed(path: Path, samples_per_id: int) -> set[str]:
    """Ids with all their samples in `path`; rewrites the file without partial records if there are any.

    A run killed mid-write can leave a last line without its newline, or (with several samples per
    prompt) only some of a prompt's samples. Both are removed so that appending continues cleanly.
    """
    if path.is_dir():
        raise OutputError(f"{path} is a directory", "pass a JSONL file path to --resume-output")
    if not path.exists():
        return set()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = raw.split(b"\n")
    whole, tail = lines[:-1], lines[-1]  # `tail` is empty when the file ends with a newline
    records: list[tuple[str, bytes]] = []
    for number, line in enumerate(whole, start=1):
        try:
            records.append((id_key(json.loads(line)["id"]), line))
        except (ValueError, KeyError, TypeError):
            raise OutputError(
                f"{path}:{number} is not a llmkit JSONL record",
                "--resume-output continues a file written by generate --format jsonl",
            ) from None
    counts = Counter(key for key, _ in records)
    done = {key for key, n in counts.items() if n >= samples_per_id}
    keep = [line for key, line in records if key in done]
    if tail or len(keep) != len(records):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in keep))
        os.replace(tmp, path)
    return done
