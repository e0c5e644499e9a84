"""Tiny GPT-2 models built from nothing, for tests and benchmarks (the hub is never needed)."""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the old king", "my friend", "the river", "a small bird", "the queen"]
VERBS = ["sees", "likes", "follows", "sings to", "waits for", "remembers", "finds"]
OBJECTS = ["the moon", "a red apple", "the sea", "her brother", "the green hill", "a quiet song"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(n)
    ]


def build_tiny_model(
    out: Path,
    *,
    vocab_size: int = 400,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = 128,
    seed: int = 0,
    dropout: float = 0.1,
) -> Path:
    """Random-weight GPT-2 with a BPE tokenizer trained on generated sentences, saved to `out`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.bpe import train_bpe

    corpus = sentences(2000, seed) + ["Ünïcödé — café, naïve, 日本語 ✓ 🙂"] * 5
    tokenizer = train_bpe(corpus, vocab_size=vocab_size)
    sample = "The cat sees the moon. Ünïcödé 🙂"
    if tokenizer.decode(tokenizer(sample)["input_ids"]) != sample:
        raise RuntimeError("tiny tokenizer does not round-trip")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    model = GPT2LMHeadModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
