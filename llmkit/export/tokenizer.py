"""A GPT-2 byte-level BPE tokenizer as GGUF metadata, the way llama.cpp's converter writes it.

The loaded transformers tokenizer is the source of truth (whatever files it came from): its vocabulary
in byte-level form (`Ġthe`), a token type per id, its merges, its special tokens. llama.cpp's `gpt2`
tokenizer with the `gpt-2` pre-tokenizer splits text with GPT-2's own regex, which is what a ByteLevel
pre-tokenizer with `use_regex` does: llmkit's own trained tokenizers are of that kind. transformers
loads a Qwen2 model's tokenizer as Qwen2's own class, whichever files it came from: a Split on Qwen2's
regex, then ByteLevel without GPT-2's. That is llama.cpp's `qwen2` pre-tokenizer, the one its
converter picks for Qwen2's tokenizers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.errors import ModelError

if TYPE_CHECKING:
    import gguf
    from transformers import PreTrainedTokenizerBase


@dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    """bos, eos, unk, pad: whichever the tokenizer has."""
    add_bos: bool
    chat_template: str | None
    pre: str = "gpt-2"
    """llama.cpp's pre-tokenizer: `gpt-2` or `qwen2`."""


# Qwen2's split regex (transformers' Qwen2Tokenizer), llama.cpp's `qwen2` pre-tokenizer.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gpt2_vocab(tokenizer: PreTrainedTokenizerBase, n_vocab: int, label: str) -> Vocab:
    """The tokenizer's vocabulary padded to the model's `n_vocab` rows (unused ids as `[PAD{i}]`)."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else {}
    pre = _pre_tokenizer(backend, label)
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= n_vocab:
        raise ModelError(
            f"{label}: the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows",
            "export the model with the tokenizer it was trained with",
        )
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    special = {
        kind: token_id
        for kind in ("bos", "eos", "unk", "pad")
        if isinstance(token_id := getattr(tokenizer, f"{kind}_token_id", None), int)
    }
    return Vocab(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=_merges(backend),
        special_ids=special,
        add_bos=_adds_bos(tokenizer),
        chat_template=getattr(tokenizer, "chat_template", None) or None,
        pre=pre,
    )


def _pre_tokenizer(backend: dict[str, Any], label: str) -> str:
    """`gpt-2` for GPT-2's pre-tokenizer (byte-level, with its regex), `qwen2` for Qwen2's, both on a
    BPE model; else a clear refusal."""
    model = backend.get("model", {}).get("type")
    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if model == "BPE" and types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    qwen2_split = (
        parts[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT and parts[0].get("behavior") == "Isolated"
    )
    if (
        model == "BPE"
        and types == ["Split", "ByteLevel"]
        and qwen2_split
        and not parts[1].get("use_regex", True)
    ):
        return "qwen2"
    kinds = "+".join(str(t) for t in types) or "none"
    raise ModelError(
        f"{label}: its tokenizer is not GPT-2's or Qwen2's byte-level BPE "
        f"(model {model}, pre-tokenizer {kinds})",
        "llmkit export writes llama.cpp's gpt2 tokenizer; tokenizers from llmkit train-tokenizer "
        "and GPT-2's and Qwen2's own are of that kind",
    )


def _merges(backend: dict[str, Any]) -> list[str]:
    merges = backend.get("model", {}).get("merges", [])
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding prepends BOS (GPT-2's tokenizers don't); llama.cpp is told the same."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def add_to(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
