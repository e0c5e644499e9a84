"""The GGUF file llama.cpp runs for a model at a tier: written by `llmkit export` on first use and
kept in llmkit's cache, keyed by what the model's files are (so an edited model is exported again)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from llmkit.errors import ModelError, UsageError
from llmkit.models import ModelSource

# --dtype / --quantize → the GGUF type of the same tier.
_BY_DTYPE = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
_BY_QUANTIZE = {"f16": "f16", "int8": "q8_0", "int4": "q4_0"}


def gguf_type(dtype: str, quantize: str | None, native_bf16: bool | None = None) -> str:
    """The llama.cpp type for llmkit's precision options: float32 → f32, float16 → f16, bfloat16 →
    bf16, --quantize int8 → q8_0, int4 → q4_0, and `auto` as llmkit's own: bf16 where the CPU
    computes it natively (hardware.cpu_bf16; there llama.cpp's bf16 decoded GPT-2 small 1.1-1.3x
    faster than its f16), else f16.
    """
    if quantize is not None:
        if quantize not in _BY_QUANTIZE:
            raise UsageError(f"unknown --quantize {quantize!r}", "use f16, int8 or int4")
        return _BY_QUANTIZE[quantize]
    if dtype == "auto":
        if native_bf16 is None:
            from llmkit.hardware import cpu_bf16

            native_bf16 = cpu_bf16().native
        return "bf16" if native_bf16 else "f16"
    return _BY_DTYPE[dtype]


def cache_dir() -> Path:
    """`llama.cpp/` beside the GGUF reading cache (`$LLMKIT_CACHE`, else `~/.cache/llmkit`)."""
    from llmkit.export.reading import cache_root

    return cache_root().parent / "llama.cpp"


def fingerprint(source: ModelSource) -> str:
    """A key for the files a model is made of (its directory, its adapters, its tokenizer)."""
    digest = hashlib.sha256()
    dirs = [source.model_dir, *source.adapters, source.tokenizer_dir]
    for folder in dict.fromkeys(dirs):
        digest.update(str(folder).encode() + b"\0")
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def check_family(model: str, source: ModelSource) -> None:
    """Only the families `llmkit export` writes can run on llama.cpp: say so before anything else."""
    import json

    from llmkit.export import FAMILIES

    kind = json.loads((source.model_dir / "config.json").read_text()).get("model_type")
    if kind not in FAMILIES:
        raise ModelError(
            f"--engine llama.cpp runs the model families llmkit exports to GGUF ({', '.join(FAMILIES)}); "
            f"{model} is a {kind or 'model of unknown type'}",
            "use --engine torch for it",
        )


def gguf_for(
    model: str,
    source: ModelSource,
    type: str,
    *,
    offline: bool = False,
    allow_pickle: bool = False,
    on_export: Callable[[Path], None] | None = None,
) -> Path:
    """The cached GGUF of `model` at `type`, exported first if there is none (`on_export` is told)."""
    from llmkit.export import export

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(source.model_dir).name)
    path = cache_dir() / f"{name}-{fingerprint(source)}-{type}.gguf"
    if path.is_file():
        return path
    if on_export is not None:
        on_export(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export(model, path, type=type, offline=offline, allow_pickle=allow_pickle)  # written whole or not at all
    return path
