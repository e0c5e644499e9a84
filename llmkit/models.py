"""Find a model (local directory, built-in name, or hub id), check it is safe and usable, load it."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import lora
from llmkit.config import LoadConfig
from llmkit.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_DIR = Path(__file__).parent / "builtin"
CONFIG_FILE = "config.json"
SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
# Everything a GPT-2-style checkpoint needs, and nothing else (no TF/Flax/ONNX copies).
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", *SAFETENSORS_PATTERNS]
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
MAX_ADAPTER_DEPTH = 8  # adapters of adapters; deeper is a loop in base_model_name_or_path
NO_CACHE_HINT = (
    "pass a local directory with --model, try the built-in -m tiny-shakespeare (it works offline), "
    "or connect once to download it"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are on disk, and how they were found."""

    name: str
    path: Path
    origin: str  # "local directory" | "built-in" | "hub cache" | "GGUF file"
    base: ModelSource | None = None
    """For a LoRA adapter at `path`: the model it adapts, found by the same rules as --model."""

    @property
    def model_dir(self) -> Path:
        """The directory with config.json and the base weights (an adapter's base's, however deep)."""
        return self.path if self.base is None else self.base.model_dir

    @property
    def tokenizer_dir(self) -> Path:
        """An adapter's own tokenizer if it saved one, else its base's."""
        if self.base is None or has_tokenizer(self.path):
            return self.path
        return self.base.tokenizer_dir

    @property
    def adapters(self) -> list[Path]:
        """Adapter directories to apply to the model in `model_dir`, innermost first."""
        return [] if self.base is None else [*self.base.adapters, self.path]

    @property
    def reference(self) -> str:
        """How a new adapter names this model as its base: what --model resolves again, wherever the
        adapter goes. A local directory by its absolute path (a relative one would depend on where
        llmkit runs); a built-in or hub model by its name, not by the cache folder it happens to sit in.
        """
        return str(self.path) if self.origin == "local directory" else self.name


@dataclass
class LoadedModel:
    """A model ready to run, with its tokenizer and placement."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    source: ModelSource
    dtype_reason: str = ""
    """Why this dtype: asked for, or what `auto` found the device computes natively."""

    @property
    def context(self) -> int:
        return context_length(self.model.config)


def context_length(config: Any) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def builtin_names() -> list[str]:
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def resolve(
    name: str,
    *,
    offline: bool = False,
    allow_pickle: bool = False,
    weights: bool = True,
    tokenizer: bool = True,
    _depth: int = 0,
) -> ModelSource:
    """Map --model to a directory on disk: a local directory, a built-in model, or the hub cache.

    A LoRA adapter directory resolves to itself with its base model resolved in turn (`base`).
    `weights=False` is for runs that only need the config and tokenizer (training from scratch);
    `tokenizer=False` for those that bring their own tokenizer too.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        source = ModelSource(name, path.resolve(), "local directory")
    elif name in builtin_names():
        source = ModelSource(name, BUILTIN_DIR / name, "built-in")
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{name}: no such GGUF file", "check the path")
        from llmkit.export.reading import model_dir  # read once into llmkit's cache, then like a directory

        source = ModelSource(name, model_dir(path, name), "GGUF file")
    elif path.exists():
        raise ModelError(
            f"{name} is a file, not a model directory",
            "pass the directory that holds config.json and the weights",
        )
    else:
        source = ModelSource(name, _from_hub(name, offline=offline, allow_pickle=allow_pickle), "hub cache")
    check_model_dir(source.path, allow_pickle=allow_pickle, name=name, weights=weights, tokenizer=tokenizer)
    if lora.is_adapter_dir(source.path):
        return _with_base(source, offline, allow_pickle, weights=weights, tokenizer=tokenizer, depth=_depth)
    return source


def _with_base(
    adapter: ModelSource, offline: bool, allow_pickle: bool, *, weights: bool, tokenizer: bool, depth: int
) -> ModelSource:
    """An adapter's source with its base model found as --model would find it."""
    base_name = lora.read_config(adapter.path, adapter.name)["base_model_name_or_path"]
    if depth >= MAX_ADAPTER_DEPTH:
        raise ModelError(
            f"{adapter.name}: adapters of adapters more than {MAX_ADAPTER_DEPTH} deep",
            f"check base_model_name_or_path in {lora.CONFIG_FILE}: it may loop back",
        )
    try:
        base = resolve(
            base_name,
            offline=offline,
            allow_pickle=allow_pickle,
            weights=weights,
            tokenizer=tokenizer and not has_tokenizer(adapter.path),
            _depth=depth + 1,
        )
    except ModelError as exc:
        if depth:
            raise  # said once, by the adapter the user named
        message = f"{adapter.name} is a LoRA adapter for {base_name}: {exc.message}"
        raise ModelError(message, exc.hint) from None
    return replace(adapter, base=base)


def _from_hub(repo_id: str, *, offline: bool, allow_pickle: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    looks_like_path = repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1
    if looks_like_path:
        raise ModelError(f"{repo_id}: no such directory", "check the path, or pass a hub id such as gpt2")
    patterns = HUB_PATTERNS + ([*PICKLE_PATTERNS, lora.PICKLE_WEIGHTS] if allow_pickle else [])
    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=patterns, local_files_only=offline or constants.is_offline_mode()
            )
        )
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model {repo_id!r} is not in the local cache and the hub can't be reached", NO_CACHE_HINT
        ) from None
    except GatedRepoError:
        raise ModelError(
            f"model {repo_id!r} is gated on the hub",
            "accept its terms on the hub and log in with `hf auth login`",
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"no model {repo_id!r} on the hub (or it is private)",
            "check the name, or pass a local directory with --model",
        ) from None
    except HFValidationError:
        raise ModelError(
            f"{repo_id!r} is neither a directory nor a valid hub id",
            "pass a local model directory, a built-in name, or an id such as gpt2",
        ) from None
    except OSError as exc:  # network trouble that did not fall back to the cache
        raise ModelError(f"could not download {repo_id!r}: {exc}", NO_CACHE_HINT) from None


def check_model_dir(
    path: Path, *, allow_pickle: bool, name: str | None = None, weights: bool = True, tokenizer: bool = True
) -> None:
    """Refuse what we can't or shouldn't load before transformers gets a chance to fail obscurely."""
    label = name or str(path)
    if lora.is_adapter_dir(path):
        lora.check_dir(path, allow_pickle=allow_pickle, label=label, weights=weights)
        return  # the base model is checked when resolve() finds it; the tokenizer may be either's
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ModelError(
            f"{label} is not a model directory: no {CONFIG_FILE}",
            "pass a directory saved with save_pretrained, a built-in name, or a hub id",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{label}: cannot read {CONFIG_FILE}: {exc}") from None
    _check_causal(config, label)
    has_safetensors = any(any(path.glob(p)) for p in SAFETENSORS_PATTERNS)
    has_pickle = any(any(path.glob(p)) for p in PICKLE_PATTERNS)
    if weights and not has_safetensors:
        if has_pickle and not allow_pickle:
            raise ModelError(
                f"{label} has only pickle weights (.bin), which can run code when loaded",
                "convert it to safetensors, or pass --allow-pickle if you trust its source",
            )
        if not has_pickle:
            raise ModelError(
                f"{label} has no weights (*.safetensors)",
                "save the model with save_pretrained, or pass another directory",
            )
    if tokenizer and not has_tokenizer(path):
        raise ModelError(
            f"{label} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt)",
            "save the tokenizer next to the model with tokenizer.save_pretrained(DIR)",
        )


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def _check_causal(config: dict[str, Any], label: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"{label} is a {model_type or 'unknown'} model, not a causal language model",
            "llmkit runs GPT-2-family (decoder-only) models such as gpt2 or distilgpt2",
        )


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {name} requested but CUDA is not available",
                "use --device cpu, or install a CUDA build of torch",
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"device {name} requested but only {torch.cuda.device_count()} GPU(s) exist",
                "pick an index below the GPU count",
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device mps requested but MPS is not available", "use --device cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, why): `auto` asks what the device computes natively (see llmkit.hardware)."""
    import torch

    from llmkit.hardware import auto_dtype

    why = "asked for"
    if name == "auto":
        name, why = auto_dtype(device.type)
        why = f"auto: {why}"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name], why


def quiet_transformers(verbose: bool = False) -> None:
    """transformers' own warnings and progress bars stay quiet (and on stderr) unless --verbose."""
    import logging

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    logging.getLogger("accelerate").setLevel(logging.INFO if verbose else logging.ERROR)
    hf_logging.disable_progress_bar()  # "Loading weights": a bar for a second, noise even under -v
    if verbose:
        hf_logging.set_verbosity_warning()
    else:
        hf_logging.set_verbosity_error()
        disable_progress_bars()


def load_tokenizer(path: Path, label: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(
            f"{label}: cannot load its tokenizer: {exc}",
            "save the tokenizer next to the model with tokenizer.save_pretrained(DIR)",
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(cfg: LoadConfig) -> LoadedModel:
    """Resolve, check and load a model and its tokenizer onto the chosen device."""
    device = pick_device("cpu" if cfg.quantize else cfg.device)
    dtype, why = pick_dtype("float32" if cfg.quantize else cfg.dtype, device)
    source = resolve(cfg.model, offline=cfg.offline, allow_pickle=cfg.allow_pickle)
    tokenizer = load_tokenizer(source.tokenizer_dir, cfg.model)
    model = load_weights(source, cfg.model, dtype=dtype, allow_pickle=cfg.allow_pickle)
    model.to(device)
    model.eval()
    if cfg.quantize == "int8":
        from llmkit.quantize import int8_dynamic

        model = int8_dynamic(model)
    elif cfg.quantize == "int4":
        from llmkit.quantize import int4_weight_only

        model = int4_weight_only(model)
    elif cfg.quantize == "f16":
        from llmkit.quantize import f16_weights

        model = f16_weights(model)
    return LoadedModel(model, tokenizer, device, dtype, source, why)


def load_weights(
    source: ModelSource, label: str, *, dtype: torch.dtype | str, allow_pickle: bool, **config: Any
) -> PreTrainedModel:
    """The model of a resolved source (for an adapter: its base with the adapter merged in), on the CPU.

    `config` overrides settings of the model's config (dropout, for training).
    """
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.model_dir,
            dtype=dtype,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=None if allow_pickle else True,
            **config,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"{label}: cannot load the model: {exc}",
            "the weights may be incomplete or corrupt; save the model again",
        ) from None
    for adapter in source.adapters:
        model = lora.merge_into(model, adapter, label)
    return model
