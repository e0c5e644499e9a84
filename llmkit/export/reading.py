"""A GGUF file as a model llmkit runs: read once through transformers (`gguf_file=`, dequantised to
float32) into a model directory in llmkit's cache, which every command then loads like any other.

transformers' GGUF config mapping for gpt2 sends `context_length` to `n_ctx` and
`feed_forward_length` to a key of that name, neither of which GPT2Config reads: the model would get
GPT-2's default 1024 positions (the position table in the file may be 256 rows) and a 4 x n_embd MLP
whatever the file says. Both are set here from the file's own metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

from llmkit.errors import ModelError

GGUF_HINT = "llmkit reads GGUF files of the architectures transformers loads (gpt2, llama, qwen2 among them)"


def cache_root() -> Path:
    """`$LLMKIT_CACHE/gguf`, else `$XDG_CACHE_HOME/llmkit/gguf`, else `~/.cache/llmkit/gguf`."""
    if os.environ.get("LLMKIT_CACHE"):
        return Path(os.environ["LLMKIT_CACHE"]).expanduser() / "gguf"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llmkit" / "gguf"


def model_dir(path: Path, label: str) -> Path:
    """The directory for this GGUF file (this path, size and modification time), made on first use."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # transformers' GGUF reader and its saving draw tqdm bars of their own, which its logging
        # settings don't reach: the core library stays quiet.
        with contextlib.redirect_stderr(io.StringIO()):
            model, tokenizer = _load(path, label)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load(path: Path, label: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        fix_config(config, metadata(path))
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=name, config=config, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ModelError(f"{label}: cannot load this GGUF file: {exc}", GGUF_HINT) from None
    # Dequantised on load: plain float32 weights now, saved like any model's.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _tie_if_copied(model)
    return model, tokenizer


def metadata(path: Path) -> dict[str, Any]:
    """The file's scalar metadata (strings and numbers; not the token lists)."""
    from gguf import GGUFReader

    fields = {}
    for key, field in GGUFReader(path).fields.items():
        if len(field.data) == 1 and not key.startswith("tokenizer."):
            fields[key] = field.contents()
    return fields


def fix_config(config: Any, fields: dict[str, Any]) -> None:
    """What transformers' gpt2 mapping loses: the context and the MLP width (and a float32 epsilon)."""
    import numpy as np

    if config.model_type != "gpt2":
        return
    arch = fields.get("general.architecture", "gpt2")
    context = fields.get(f"{arch}.context_length")
    if isinstance(context, int):
        config.n_positions = context
    ff = fields.get(f"{arch}.feed_forward_length")
    if isinstance(ff, int):
        config.n_inner = None if ff == 4 * config.n_embd else ff
    for stray in ("n_ctx", "feed_forward_length"):
        if stray in config.__dict__:
            delattr(config, stray)
    # Stored as float32 (1e-5 reads back as 9.99999974e-06): the shortest decimal that is that float.
    config.layer_norm_epsilon = float(str(np.float32(config.layer_norm_epsilon)))


def _tie_if_copied(model: Any) -> None:
    """An `output.weight` that is a copy of the embeddings (as llmkit export writes it) is tied again."""
    import torch

    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embeddings.weight:
        return
    if head.weight.shape == embeddings.weight.shape and torch.equal(head.weight, embeddings.weight):
        model.config.tie_word_embeddings = True
        model.tie_weights()
