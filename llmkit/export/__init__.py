"""`llmkit export`: a model as one GGUF file for llama.cpp, ollama, LM Studio and node-llama-cpp.

Shaped like llama.cpp's own converter (`convert_hf_to_gguf.py`): one module per model family with its
metadata and tensor names (`gpt2.py`, `llama.py` for Llama and Mistral, `qwen2.py`), the tokenizer as
GGUF metadata (`tokenizer.py`), and the file written with the `gguf` package, the format's own library
(`writer.py`). Reading a GGUF back as a model llmkit runs is `reading.py`.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from llmkit.errors import ModelError, UsageError
from llmkit.export.writer import TYPES, Written

__all__ = ["FAMILIES", "TYPES", "Written", "export"]

# transformers' model_type -> the module here that writes it (Mistral is llama.cpp's `llama`).
MODULES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
FAMILIES = tuple(MODULES)
"""model_type values llmkit export writes."""


def family(model_type: str | None, label: str) -> ModuleType:
    if model_type in MODULES:
        return importlib.import_module(f"llmkit.export.{MODULES[model_type]}")
    raise ModelError(
        f"{label} is a {model_type or 'unknown'} model: llmkit export writes "
        f"{', '.join(FAMILIES)} models only",
        "export a GPT-2, Llama, Mistral or Qwen2 model (the built-in tiny-shakespeare is a GPT-2)",
    )


def export(
    model: str,
    out: Path,
    *,
    type: str = "f16",
    ollama: bool = False,
    offline: bool = False,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Written, float]:
    """Write `model` (anything --model takes; an adapter is merged into its base) to `out` as GGUF.

    Returns what was written and the seconds it took. With `ollama`, a Modelfile goes beside it.
    """
    import gguf
    from transformers import AutoConfig

    from llmkit.export import tokenizer as vocab_io
    from llmkit.export.ollama import modelfile
    from llmkit.export.writer import FILE_TYPES, add_tensors, check_output, write_atomic, write_text_atomic
    from llmkit.models import load_tokenizer, load_weights, resolve

    if type not in TYPES:
        raise UsageError(f"unknown --type {type!r}", f"use one of: {', '.join(TYPES)}")
    check_output(out)
    start = time.perf_counter()
    source = resolve(model, offline=offline, allow_pickle=allow_pickle)
    config = AutoConfig.from_pretrained(source.model_dir, local_files_only=True, trust_remote_code=False)
    module = family(config.model_type, model)
    module.check(config, model)
    tokenizer = load_tokenizer(source.tokenizer_dir, model)
    vocab = vocab_io.gpt2_vocab(tokenizer, config.vocab_size, model)
    weights = load_weights(source, model, dtype="float32", allow_pickle=allow_pickle)

    writer = gguf.GGUFWriter(path=None, arch=module.ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_display_name(model, source.path))
    module.add_metadata(writer, config)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab_io.add_to(writer, vocab)

    written = Written(path=out, type=type, size=0)
    state = weights.state_dict()
    total = sum(1 for name in state if not name.endswith(module.NOT_WEIGHTS))
    if not getattr(module, "WRITES_TIED_OUTPUT", True) and _tied(weights):
        total -= 1  # the output matrix is left out
    add_tensors(writer, module.tensors(weights), type, total, written, progress)
    written.size = write_atomic(writer, out)
    if ollama:
        eos = tokenizer.eos_token if isinstance(tokenizer.eos_token, str) else None
        text = modelfile(
            out, context=module.context_length(config), eos=eos, chat_template=vocab.chat_template
        )
        write_text_atomic(text, out.parent / "Modelfile")
    return written, time.perf_counter() - start


def _tied(model: Any) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embeddings.weight


def _display_name(model: str, path: Path) -> str:
    """general.name: the hub id or built-in name as given, a directory's own name."""
    return path.name if Path(model).expanduser().is_dir() else model
