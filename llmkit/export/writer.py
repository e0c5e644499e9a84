"""Writing a GGUF file: the type of each tensor, quantization with the converter's fallbacks, and an
atomic write (a partial file never has the final name)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmkit.errors import OutputError

if TYPE_CHECKING:
    import gguf
    import numpy as np

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# general.file_type: gguf.LlamaFileType's name for each --type.
FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
}
# Kept in float32 whatever the type, as llama.cpp's converter and llama-quantize do: 1-D tensors
# (norms, biases) and the position embeddings.
ALWAYS_F32 = ("position_embd.weight",)
# llama-quantize keeps the output matrix above 4 bits (Q6_K); gguf-py can't write Q6_K, so Q8_0.
OUTPUT_ABOVE = {"q4_0": "Q8_0"}

ProgressFn = Callable[[int, int], None]


@dataclass
class Written:
    """What an export wrote, for its summary line."""

    path: Path
    type: str
    size: int
    types: Counter[str] = field(default_factory=Counter)
    """GGML type name -> how many tensors have it."""
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)
    """(tensor, type asked for, type written) where the shape could not take the asked-for type."""
    kept: list[tuple[str, str]] = field(default_factory=list)
    """(tensor, type) written above the file's type on purpose (the output matrix at q4_0)."""


def tensor_type(name: str, data: np.ndarray, file_type: str) -> gguf.GGMLQuantizationType:
    from gguf import GGMLQuantizationType as Q

    if data.ndim <= 1 or name.endswith("_norm.weight") or name in ALWAYS_F32 or not name.endswith(".weight"):
        return Q.F32
    if name == "output.weight" and file_type in OUTPUT_ABOVE:
        return Q[OUTPUT_ABOVE[file_type]]
    return Q[file_type.upper()]


def quantize(
    data: np.ndarray, wanted: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The data in `wanted`, or in F16 where rows don't split into its blocks (the converter's rule)."""
    import gguf

    try:
        return gguf.quants.quantize(data, wanted), wanted
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def add_tensors(
    writer: gguf.GGUFWriter,
    tensors: Iterable[tuple[str, np.ndarray]],
    file_type: str,
    total: int,
    written: Written,
    progress: ProgressFn | None = None,
) -> None:
    for done, (name, data) in enumerate(tensors, start=1):
        wanted = tensor_type(name, data, file_type)
        raw, got = quantize(data, wanted)
        writer.add_tensor(name, raw, raw_dtype=got)
        written.types[got.name] += 1
        if got != wanted:
            written.fallbacks.append((name, wanted.name, got.name))
        elif name == "output.weight" and file_type in OUTPUT_ABOVE:
            written.kept.append((name, got.name))
        if progress is not None:
            progress(done, total)


def temporary_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.partial")


def check_output(out: Path) -> None:
    """Before any loading: a place a file can go."""
    if out.is_dir():
        raise OutputError(f"{out} is a directory", "pass a file name such as model.gguf")
    if not out.parent.is_dir():
        raise OutputError(f"no such directory: {out.parent}", "create it first, or pick another -o")


def write_atomic(writer: gguf.GGUFWriter, out: Path) -> int:
    """Header, metadata and tensors to a temporary name beside `out`, then renamed; returns the size."""
    tmp = temporary_name(out)
    try:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        finally:
            writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out.stat().st_size


def write_text_atomic(text: str, out: Path) -> None:
    tmp = temporary_name(out)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
