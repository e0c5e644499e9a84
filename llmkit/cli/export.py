"""`llmkit export`: a model as a GGUF file for llama.cpp, ollama, LM Studio and node-llama-cpp."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import AllowPickleOpt, OfflineOpt

if TYPE_CHECKING:
    from llmkit.export import Written

EXAMPLES = """\b
Examples:
  llmkit export tiny-shakespeare -o shakespeare.gguf --type q8_0
  llmkit export ./my-model -o my-model.gguf --ollama && ollama create my-model -f Modelfile
  llmkit perplexity -m my-model.gguf valid.txt
"""


def export(
    model: Annotated[
        str,
        typer.Argument(
            help="Model directory, built-in name, hub id or LoRA adapter directory (merged into its base).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The GGUF file to write.", show_default=False)
    ],
    type: Annotated[
        str,
        typer.Option(
            "--type",
            "-t",
            help="Weight type: f32, f16, bf16, q8_0 or q4_0 (norms, biases and positions stay f32).",
        ),
    ] = "f16",
    ollama: Annotated[
        bool, typer.Option("--ollama", help="Also write an ollama Modelfile beside the GGUF file.")
    ] = False,
    offline: OfflineOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Write a model as one GGUF file, the way llama.cpp's own converter writes it."""
    from llmkit.export import export as write_gguf
    from llmkit.models import quiet_transformers

    quiet_transformers(out.settings.verbose)
    with out.progress(f"Writing {output.name}", None, unit="tensors") as bar:

        def step(done: int, total: int) -> None:
            if bar is not None:
                bar.update(bar.task_ids[0], completed=done, total=total)

        written, seconds = write_gguf(
            model, output, type=type, ollama=ollama, offline=offline, allow_pickle=allow_pickle, progress=step
        )
    out.say(summary(written, seconds))
    for name, wanted, got in written.fallbacks:
        out.detail(f"  {name}: {got.lower()} (rows do not split into {wanted.lower()} blocks)")
    if ollama:
        out.say(f"Wrote {output.parent / 'Modelfile'}: ollama create NAME -f {output.parent / 'Modelfile'}")


def summary(written: Written, seconds: float) -> str:
    counts = ", ".join(f"{n} {kind.lower()}" for kind, n in written.types.most_common())
    size = f"{written.size / 2**20:.1f} MiB"
    line = f"Wrote {written.path}: {written.type}, {size} in {seconds:.1f} s ({counts})"
    if written.fallbacks:
        line += (
            f"; {len(written.fallbacks)} tensors in f16 where {written.type} blocks don't fit their rows "
            f"({', '.join(name for name, _, _ in written.fallbacks[:4])}"
            f"{', …' if len(written.fallbacks) > 4 else ''})"
        )
    for name, kind in written.kept:
        line += f"; {name} kept at {kind.lower()}, as llama-quantize keeps the output above 4 bits"
    return line
