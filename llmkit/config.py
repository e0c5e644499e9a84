"""Validated settings for each command. Stdlib only: importing this must stay cheap."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from llmkit.errors import UsageError

Truncate = Literal["left", "error"]

# Sampling values whose arithmetic stays finite, shared by `generate` and `serve` so both refuse
# (or normalise) the same things. Logits are divided by the temperature: below this it samples as
# greedy, as vLLM does (1/1e-300 overflows float32 and every probability becomes NaN).
GREEDY_BELOW = 1e-5
# transformers divides positive scores by the repetition penalty and multiplies negative ones:
# 5e-324 is 0 in float32 (a division by zero) and 1e300 is inf (0 * inf is NaN).
REPETITION_PENALTY_MIN = 0.01
REPETITION_PENALTY_MAX = 100.0
# What torch.Generator.manual_seed takes without overflowing: a signed 64-bit integer.
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1


def is_greedy(temperature: float) -> bool:
    """A temperature too small to divide by means greedy decoding."""
    return temperature < GREEDY_BELOW


def _check(ok: bool, message: str, hint: str | None = None) -> None:
    if not ok:
        raise UsageError(message, hint)


def check_device(device: str) -> None:
    _check(
        device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()),
        f"unknown device {device!r}",
        "use auto, cpu, cuda, cuda:N or mps",
    )


@dataclass
class LoadConfig:
    """How to find and place a model."""

    model: str = "gpt2"
    """Local directory, built-in model name, or hub id."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps. auto picks cuda, then mps, then cpu."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16. auto: bfloat16 where the device computes it natively
    (GPUs with bf16, CPUs with avx512_bf16 or AMX), else float32."""
    offline: bool = False
    """Never contact the hub; use only local directories and the local cache."""
    allow_pickle: bool = False
    """Allow loading pickle (`.bin`) weights, which can run code when loaded."""
    quantize: str | None = None
    """f16 / int8 / int4: float16, int8 or 4-bit weights for CPU inference, float32 around the
    products (faster decoding; int8 and int4 cost some perplexity)."""

    def __post_init__(self) -> None:
        check_device(self.device)
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"unknown dtype {self.dtype!r}",
            "use auto, float32, bfloat16 or float16",
        )
        _check(
            self.quantize in (None, "f16", "int8", "int4"),
            f"unknown --quantize {self.quantize!r}",
            "use f16, int8 or int4",
        )
        if self.quantize is not None:
            _check(
                self.device in ("auto", "cpu"),
                f"--quantize {self.quantize} is for the CPU",
                "on a GPU use --dtype bfloat16 instead",
            )
            _check(
                self.dtype in ("auto", "float32"),
                f"--quantize {self.quantize} starts from float32 weights",
                "use --dtype float32 or auto",
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
    compile: bool = False
    """Static KV cache and torch.compile'd decoding: a slow first call, faster tokens after it."""

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
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "--temperature must be a finite number, 0 or more",
            f"0 (or anything below {GREEDY_BELOW:g}) means greedy decoding",
        )
        _check(self.top_k >= 0, "--top-k must be 0 or more", "0 disables top-k filtering")
        _check(0 < self.top_p <= 1, "--top-p must be in (0, 1]")
        _check(self.min_p is None or 0 <= self.min_p <= 1, "--min-p must be in [0, 1]")
        _check(self.typical_p is None or 0 < self.typical_p <= 1, "--typical-p must be in (0, 1]")
        _check(
            REPETITION_PENALTY_MIN <= self.repetition_penalty <= REPETITION_PENALTY_MAX,
            f"--repetition-penalty must be in [{REPETITION_PENALTY_MIN:g}, {REPETITION_PENALTY_MAX:g}]",
            "1.0 disables it; above 1 discourages repeats, below 1 encourages them",
        )
        _check(
            self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
            f"--seed must be in [{SEED_MIN}, {SEED_MAX}] (a signed 64-bit integer)",
        )
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
        return not self.greedy and not is_greedy(self.temperature)


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


LORA_R = 16
LORA_DROPOUT = 0.05
LORA_TARGETS = (
    "c_attn,c_proj,c_fc"  # GPT-2's default: attention (c_attn, c_proj), MLP (c_fc, c_proj) projections
)

MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Schedule = Literal["cosine", "linear", "constant"]
OptimizerName = Literal["adamw", "muon"]


@dataclass
class TrainConfig:
    """Everything that defines a fine-tuning run; saved as `llmkit.json` next to the model."""

    data: list[str]
    """Training text: files, directories, or `-` for stdin."""
    output: str
    """Output directory (a Hugging Face model directory when the run ends)."""
    model: str = "gpt2"
    """Base model: local directory, built-in name or hub id."""
    from_scratch: bool = False
    """Random initialisation from the base model's config instead of its weights."""
    tokenizer: str | None = None
    """Another tokenizer directory (from-scratch runs)."""
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    context: int | None = None
    """From-scratch architecture overrides."""
    dropout: float | None = None
    """Residual, embedding and attention dropout; None keeps the model config's."""
    block_size: int | None = None
    """Tokens per training block; None: min(model context, 1024)."""
    text_field: str = "text"
    prompt_field: str | None = None
    """Prompt/completion records: the JSONL field with the prompt. Giving it (or completion_field)
    selects that mode; None with both unset: the mode is detected from the first JSONL record."""
    completion_field: str | None = None
    """Prompt/completion records: the JSONL field with the completion, the only part learnt."""
    messages_field: str | None = None
    """Conversation records: the JSONL field with the messages list, rendered through the chat template
    and learnt on the assistant turns. None: detected from the first record ("messages")."""
    long_records: str = "error"
    """A prompt/completion record longer than a block: error (refuse the data) or skip it."""
    glob: str | None = None
    errors: str = "replace"
    num_proc: int = 1
    cache_dir: str | None = None
    no_cache: bool = False
    val_file: str | None = None
    val_split: float = 0.05
    epochs: float | None = None
    """Passes over the training blocks (default 1 when --max-steps is not given)."""
    max_steps: int | None = None
    """Optimizer steps; overrides epochs."""
    batch_size: int = 8
    """Blocks per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float | None = None
    """Peak learning rate; None: 5e-5 fine-tuning, 2e-4 with --lora, 6e-4 from scratch."""
    weight_decay: float = 0.01
    """Decay on matrices (none on biases and LayerNorm weights); Muon's matrices too."""
    optimizer: OptimizerName | None = None
    """adamw, or muon: Muon on the transformer blocks' 2-D weights, AdamW (--lr) on the rest.
    None: muon from scratch (better loss per token, measured on the built-in recipe), else adamw."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (same schedule as --lr)."""
    lr_schedule: Schedule = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables."""
    mixed_precision: MixedPrecision = "auto"
    """auto: bf16 autocast where the device computes bf16 natively (GPUs, CPUs with avx512_bf16
    or AMX), else fp32 (no)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass instead of keeping them. None: on with --lora (chosen
    to save memory, which at block 512 is mostly activations; LoRA with it still outran full fine-tuning
    without it), off otherwise."""
    lora: bool = False
    """Train LoRA adapters (PEFT) on a frozen model instead of every weight; OUT is an adapter."""
    lora_r: int | None = None
    """Adapter rank; None: 16 with --lora."""
    lora_alpha: float | None = None
    """Adapter scale numerator (the update is scaled by alpha / r); None: 2 × r with --lora."""
    lora_dropout: float | None = None
    """Dropout on the adapters' input; None: 0.05 with --lora."""
    lora_targets: str | None = None
    """Comma-separated names of the layers to adapt, or all-linear (every linear layer of the blocks).
    None: by architecture, filled in when the model is loaded (so a saved config says what ran): GPT-2's
    attention and MLP projections, else what PEFT adapts for the model type, else all-linear."""
    merge: bool = False
    """With --lora: save the full model with the adapters merged in, instead of the adapter."""
    chat_template: str | None = None
    """chatml, zephyr or a .jinja file: put on the tokenizer before training (its tokens added, the
    embeddings resized, its end of turn a stop) and saved with the model. None: the tokenizer's own."""
    compile: bool = False
    """torch.compile the model (in place): a slower start, faster steps on GPUs."""
    seed: int = 0
    eval_every: int = 0
    """Validation every N steps (and always at the end); 0: only at the end."""
    sample_every: int = 0
    sample_prompt: str = ""
    sample_tokens: int = 40
    log_every: int = 10
    report_to: str | None = None
    """An accelerate tracker: tensorboard, wandb, …"""
    overwrite: bool = False
    """Start over in an OUT holding an earlier run's model or checkpoints (refused without it), or in a
    non-empty directory that isn't a run (its model files are replaced)."""
    save_dtype: str = "float32"
    """Dtype of the final weights: float32, or bfloat16/float16 for half the size."""
    save_every: int = 500
    """Checkpoint every N steps (and at the end of each epoch); 0: only at epoch ends."""
    keep: int = 2
    """Checkpoints to keep (newest first); older ones go once a new one is complete."""
    keep_best: bool = False
    """Also keep the checkpoint with the best validation loss."""
    resume: bool = False
    """Continue from the newest complete checkpoint in the output directory."""
    resume_from: str | None = None
    """Continue from this checkpoint directory."""
    force: bool = False
    """Allow settings that can safely change (like eval_every) to differ on resume."""
    max_bad_steps: int = 5
    """Stop after this many non-finite losses in a row."""
    device: str = "auto"
    offline: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        check_device(self.device)
        _check(bool(self.data), "no training data given", "pass text files, directories, or - for stdin")
        _check(self.epochs is None or self.epochs > 0, "--epochs must be positive")
        _check(self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1")
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
        _check(self.grad_accum >= 1, "--grad-accum must be at least 1")
        _check(self.lr is None or self.lr > 0, "--lr must be positive")
        _check(self.weight_decay >= 0, "--weight-decay must be 0 or more")
        _check(
            self.lr_schedule in ("cosine", "linear", "constant"),
            "--lr-schedule must be cosine, linear or constant",
        )
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be 0 or more")
        _check(0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
        _check(self.max_grad_norm >= 0, "--max-grad-norm must be 0 or more")
        _check(
            self.mixed_precision in ("auto", "no", "bf16", "fp16"),
            "--mixed-precision must be auto, no, bf16 or fp16",
        )
        _check(self.optimizer in (None, "adamw", "muon"), "--optimizer must be adamw or muon")
        _check(self.muon_lr > 0, "--muon-lr must be positive")
        _check(
            not (self.optimizer == "muon" and self.mixed_precision == "fp16"),
            "--optimizer muon does not work with --mixed-precision fp16",
            "use bf16 (or no): a loss scaler steps two optimizers wrongly",
        )
        _check(self.dropout is None or 0 <= self.dropout < 1, "--dropout must be in [0, 1)")
        _check(self.block_size is None or self.block_size >= 2, "--block-size must be at least 2")
        _check(0 <= self.val_split < 1, "--val-split must be in [0, 1)")
        _check(self.num_proc >= 1, "--num-proc must be at least 1")
        _check(self.errors in ("strict", "replace"), "--errors must be strict or replace")
        _check(self.long_records in ("error", "skip"), "--long-records must be error or skip")
        for name in ("eval_every", "sample_every"):
            _check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more")
        _check(self.log_every >= 1, "--log-every must be at least 1")
        _check(self.save_every >= 0, "--save-every must be 0 or more")
        _check(
            self.save_dtype in ("float32", "bfloat16", "float16"),
            "--save-dtype must be float32, bfloat16 or float16",
        )
        _check(self.keep >= 1, "--keep must be at least 1", "the newest checkpoint is what --resume needs")
        _check(self.max_bad_steps >= 1, "--max-bad-steps must be at least 1")
        _check(not (self.resume and self.resume_from), "pass --resume or --resume-from, not both")
        _check(self.sample_tokens >= 1, "--sample-tokens must be at least 1")
        for name in ("n_layer", "n_head", "n_embd", "context"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1")
            _check(
                value is None or self.from_scratch,
                f"--{name.replace('_', '-')} needs --from-scratch",
                "a pretrained model's shape is fixed",
            )
        _check(
            self.tokenizer is None or self.from_scratch,
            "--tokenizer needs --from-scratch",
            "a pretrained model is tied to its own tokenizer",
        )
        if self.n_embd is not None and self.n_head is not None:
            _check(self.n_embd % self.n_head == 0, "--n-embd must be divisible by --n-head")
        self._check_lora()

    def _check_lora(self) -> None:
        """Validate the LoRA options, then fill in their defaults, so a saved config says what ran."""
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.lora
        given = {
            "--lora-r": self.lora_r is not None,
            "--lora-alpha": self.lora_alpha is not None,
            "--lora-dropout": self.lora_dropout is not None,
            "--lora-targets": self.lora_targets is not None,
            "--merge": self.merge,
        }
        for option, is_given in given.items():
            _check(self.lora or not is_given, f"{option} needs --lora", "add --lora to train adapters")
        if not self.lora:
            return
        _check(
            not self.from_scratch,
            "--lora cannot be combined with --from-scratch",
            "adapters adapt pretrained weights: drop one of the two",
        )
        self.lora_r = LORA_R if self.lora_r is None else self.lora_r
        _check(self.lora_r >= 1, "--lora-r must be at least 1")
        self.lora_alpha = float(2 * self.lora_r) if self.lora_alpha is None else self.lora_alpha
        _check(self.lora_alpha > 0, "--lora-alpha must be positive")
        self.lora_dropout = LORA_DROPOUT if self.lora_dropout is None else self.lora_dropout
        _check(0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
        if self.lora_targets is None:
            return  # the architecture's default, chosen when the model is loaded
        # One spelling, so a resume with `c_attn, c_fc` compares equal to `c_attn,c_fc`.
        self.lora_targets = ",".join(t.strip() for t in self.lora_targets.split(",") if t.strip())
        _check(bool(self.lora_targets), "--lora-targets names no layer", "e.g. --lora-targets c_attn,c_proj")

    @property
    def resuming(self) -> bool:
        return self.resume or self.resume_from is not None

    @property
    def optimizer_name(self) -> str:
        if self.optimizer is not None:
            return self.optimizer
        return "muon" if self.from_scratch and self.mixed_precision != "fp16" else "adamw"

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.default_lr(self.lora, self.from_scratch)

    @staticmethod
    def default_lr(lora: bool, from_scratch: bool) -> float:
        """The peak learning rate when --lr is not given (also what a saved run without it used)."""
        if lora:
            return 2e-4  # the LoRA paper's rate for GPT-2: a few small matrices, starting from zero
        return 6e-4 if from_scratch else 5e-5
