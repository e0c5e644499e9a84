"""Validated settings for each command. Stdlib only: importing this must stay cheap."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmkit.errors import UsageError

Truncate = Literal["left", "error"]


def _check(ok: bool, message: str, hint: str | None = None) -> None:
    if not ok:
        raise UsageError(message, hint)


@dataclass
class LoadConfig:
    """How to find and place a model."""

    model: str = "gpt2"
    """Local directory, built-in model name, or hub id."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps. auto picks cuda, then mps, then cpu."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16. auto: bfloat16 on GPUs that support it, else float32."""
    offline: bool = False
    """Never contact the hub; use only local directories and the local cache."""
    allow_pickle: bool = False
    """Allow loading pickle (`.bin`) weights, which can run code when loaded."""

    def __post_init__(self) -> None:
        _check(
            self.device in ("auto", "cpu", "cuda", "mps")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
            f"unknown device {self.device!r}",
            "use auto, cpu, cuda, cuda:N or mps",
        )
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"unknown dtype {self.dtype!r}",
            "use auto, float32, bfloat16 or float16",
        )


@dataclass
class GenerateConfig:
    """Decoding settings for `generate`; mapped onto a transformers GenerationConfig."""

    max_new_tokens: int | None = 50
    """Tokens to generate per sample (ignored when max_length is set)."""
    max_length: int | None = None
    """Total tokens, prompt included, as in the classic transformers example."""
    min_new_tokens: int = 0
    """End-of-text is suppressed until this many tokens exist."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_k: int = 50
    """Sample from the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""
    min_p: float | None = None
    """Drop tokens less likely than min_p times the most likely one."""
    typical_p: float | None = None
    """Locally typical sampling mass."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens that already appear."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size; 0 disables."""
    greedy: bool = False
    """Always pick the most likely token."""
    num_samples: int = 1
    """Samples per prompt."""
    seed: int | None = None
    """Seed for sampling; None draws one (and reports it)."""
    stop: list[str] = field(default_factory=list)
    """Stop when any of these strings is generated."""
    keep_stop: bool = False
    """Keep the stop string at the end of the completion."""
    truncate: Truncate = "left"
    """What to do with a prompt that leaves no room in the context: keep its end, or fail."""
    batch_size: int | None = None
    """Prompts per forward pass; None chooses by device."""

    def __post_init__(self) -> None:
        if self.max_length is None:
            _check(
                self.max_new_tokens is not None and self.max_new_tokens >= 1,
                "--max-new-tokens must be at least 1",
            )
        else:
            _check(self.max_length >= 2, "--max-length must be at least 2")
        _check(self.min_new_tokens >= 0, "--min-new-tokens must be 0 or more")
        if self.max_length is None and self.max_new_tokens is not None:
            _check(
                self.min_new_tokens <= self.max_new_tokens, "--min-new-tokens cannot exceed --max-new-tokens"
            )
        _check(self.temperature >= 0, "--temperature must be 0 or more", "0 means greedy decoding")
        _check(self.top_k >= 0, "--top-k must be 0 or more", "0 disables top-k filtering")
        _check(0 < self.top_p <= 1, "--top-p must be in (0, 1]")
        _check(self.min_p is None or 0 <= self.min_p <= 1, "--min-p must be in [0, 1]")
        _check(self.typical_p is None or 0 < self.typical_p <= 1, "--typical-p must be in (0, 1]")
        _check(self.repetition_penalty > 0, "--repetition-penalty must be positive", "1.0 disables it")
        _check(self.no_repeat_ngram_size >= 0, "--no-repeat-ngram-size must be 0 or more")
        _check(self.num_samples >= 1, "--num-samples must be at least 1")
        _check(
            self.num_samples == 1 or self.do_sample,
            "greedy decoding gives the same text for every sample",
            "sample with --temperature above 0 (and no --greedy), or use -s 1",
        )
        _check(self.batch_size is None or self.batch_size >= 1, "--batch-size must be at least 1")
        _check(all(self.stop), "--stop cannot be empty")
        _check(self.truncate in ("left", "error"), "--truncate must be left or error")

    @property
    def do_sample(self) -> bool:
        return not self.greedy and self.temperature > 0


@dataclass
class PerplexityConfig:
    """Sliding-window scoring settings for `perplexity`."""

    context: int | None = None
    """Window length in tokens; None uses the model's context."""
    stride: int | None = None
    """How far each window advances; None uses context // 2."""
    batch_size: int = 4
    """Windows (or lines) per forward pass."""

    def __post_init__(self) -> None:
        _check(self.context is None or self.context >= 2, "--context must be at least 2")
        _check(self.stride is None or self.stride >= 1, "--stride must be at least 1")
        if self.context is not None and self.stride is not None:
            _check(
                self.stride < self.context,
                "--stride must be smaller than --context",
                "windows must overlap by at least one token so every token is scored with context",
            )
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
