"""Shared fixtures: a tiny GPT-2 built once per session, offline mode, a CLI runner, and the corpora and
`finetune` arguments the fine-tuning tests share."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.testing import build_tiny_model, sentences

# A suite started in the background by a non-interactive shell (`make test &`, some CI runners) has
# SIGINT ignored, and children inherit that: the Ctrl-C tests would then test nothing but `nohup`.
# With a handler here, every child starts with the default disposition, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Defaults follow the CPU's bf16 support, which differs between machines: tests see a CPU without it
# unless they ask otherwise (tests/test_precision.py), so every machine computes the same numbers.
# Set here, not only per test: module- and session-scoped fixtures run before function-scoped ones.
os.environ["LLMKIT_CPU_BF16"] = "0"
# Likewise serve's few-row products (llmkit/products.py): the weight-left form on every machine, so the
# path a fast-BLAS CPU skips is still tested; tests/test_products.py checks the measurement itself.
os.environ["LLMKIT_WEIGHT_LEFT"] = "1"
os.environ["LLMKIT_ONE_ROW_HEAD"] = "1"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An accidental download must fail loudly, and no test may touch the user's cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants

    # The hub client reads its cache location at import; keep in-process tests out of ~/.cache too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.delenv("LLMKIT_MODEL", raising=False)
    monkeypatch.delenv("LLMKIT_DEBUG", raising=False)
    monkeypatch.setenv("LLMKIT_CPU_BF16", "0")  # back to the default, whatever a test changed
    monkeypatch.setenv("LLMKIT_WEIGHT_LEFT", "1")
    monkeypatch.setenv("LLMKIT_ONE_ROW_HEAD", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, 64 dims, context 128, a byte-level BPE of ~400 tokens; random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def cli(runner: CliRunner):
    """Invoke the real CLI in-process; stdout and stderr are kept apart."""
    from llmkit.cli import _output
    from llmkit.cli.app import app

    def invoke(*args: str, input: str | None = None):
        _output.settings.__init__()  # global flags from an earlier invocation must not leak
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


def run_llmkit(
    *args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The CLI as a real subprocess (pipes, signals, start-up)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llmkit", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_model_nodrop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model without dropout, so differently split batches give the same gradients."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-nodrop", dropout=0.0)


def run_torchrun(
    *args: str, env: dict[str, str] | None = None, nproc: int = 2, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The CLI under `torchrun` with `nproc` CPU processes, on a free port (a fixed one may be taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "llmkit",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def assert_same_weights(
    left: Path, right: Path, file: str = "model.safetensors", rtol: float = 1e-5, atol: float = 1e-6
) -> dict:
    """Two saved runs hold the same tensors (names and values, within tolerance); returns the right's."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(left / file), load_file(right / file)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    return b


# -- fine-tuning -----------------------------------------------------------------------------------
PATTERN = "The cat sees the moon. A dog likes the sea.\n"


@pytest.fixture(scope="module")
def pattern_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sentence pair 300 times: a tiny model learns it in a few dozen steps."""
    path = tmp_path_factory.mktemp("data") / "pattern.txt"
    path.write_text(PATTERN * 300)
    return path


@pytest.fixture(scope="module")
def sentence_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,500 generated sentences (seed 4): enough blocks for runs of tens of steps with checkpoints."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(sentences(2500, seed=4)))
    return path


def finetune_args(data: Path | list[Path], out: Path, model: Path | str, *flags: object) -> list[str]:
    """`finetune DATA -o OUT -m MODEL` with blocks of 32 and the token cache beside OUT, then `flags`."""
    paths = data if isinstance(data, list) else [data]
    cache = out.parent / "cache"
    named = ["-o", str(out), "-m", str(model), "--block-size", "32", "--cache-dir", str(cache)]
    return ["finetune", *map(str, paths), *named, *map(str, flags)]


def meta(out: Path) -> dict:
    """A finished run's llmkit.json."""
    return json.loads((out / "llmkit.json").read_text())


def metrics(out: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
