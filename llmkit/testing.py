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


BOS = "<s>"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Decoder-only families beside GPT-2, as transformers names them, and whether their tokenizers add a
# BOS token the way the real ones do (Llama 3, Mistral, Phi-3, Gemma 2 do; Qwen2 does not).
FAMILIES = {"llama": True, "qwen2": False, "phi3": True, "gemma2": True, "mistral": True}


def build_tiny_family(
    out: Path,
    family: str,
    *,
    vocab_size: int = 400,
    hidden: int = 64,
    layers: int = 2,
    context: int = 128,
    seed: int = 0,
    chat_template: bool = True,
) -> Path:
    """A random-weight model of `family`'s shape (2 layers, 64 wide, grouped-query attention) with a
    byte-level BPE trained on generated sentences, ChatML special tokens and template, saved to `out`."""
    import torch
    from tokenizers import processors
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    from llmkit.bpe import EOS, train_bpe

    adds_bos = FAMILIES[family]
    corpus = sentences(2000, seed) + ["Ünïcödé — café, naïve, 日本語 ✓ 🙂"] * 5
    trained = train_bpe(corpus, vocab_size=vocab_size)
    backend = trained.backend_tokenizer
    backend.add_special_tokens([BOS, "<|im_start|>", "<|im_end|>"])
    if adds_bos:
        bos_id = backend.token_to_id(BOS)
        backend.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
                ),
            ]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS if adds_bos else None,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
    if chat_template:
        tokenizer.chat_template = CHATML
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (BOS, EOS, "<|im_end|>")}
    shape: dict = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=context,
        bos_token_id=ids[BOS] if adds_bos else None,
        eos_token_id=ids[EOS],
        pad_token_id=ids[EOS],
    )
    if family == "gemma2":
        shape.update(head_dim=hidden // 2, sliding_window=context)
    if family == "phi3":
        shape.update(original_max_position_embeddings=context)
    config = AutoConfig.for_model(family, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=shape["bos_token_id"],
        eos_token_id=[ids[EOS], ids["<|im_end|>"]] if chat_template else ids[EOS],
        pad_token_id=ids[EOS],
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
