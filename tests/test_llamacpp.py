"""`generate --engine llama.cpp`: llama.cpp's logits, llmkit's sampling, stops, records and streaming.

The first tests run everywhere; those that decode need llama-cpp-python (an optional source build,
`make llama-cpp`) and skip without it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from llmkit.llamacpp.files import fingerprint, gguf_for, gguf_type
from llmkit.models import BUILTIN_DIR, resolve

try:
    import llama_cpp  # noqa: F401

    HAVE_BINDINGS = True
except ImportError:
    HAVE_BINDINGS = False
needs_bindings = pytest.mark.skipif(not HAVE_BINDINGS, reason="llama-cpp-python is not installed")
SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n"
)


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # One cache for the module (each tier is exported once), never the user's.
    root = tmp_path_factory.getbasetemp() / "llamacpp-cache"
    monkeypatch.setenv("LLMKIT_CACHE", str(root))


def test_each_precision_option_has_its_llama_cpp_tier() -> None:
    assert gguf_type("float32", None) == "f32"
    assert gguf_type("float16", None) == "f16"
    assert gguf_type("auto", None, native_bf16=False) == "f16"
    assert gguf_type("auto", None, native_bf16=True) == "bf16"  # llmkit's own `auto`
    assert gguf_type("auto", None) == "f16"  # the tests' CPU has no native bf16 (conftest)
    assert gguf_type("bfloat16", None) == "bf16"
    assert [gguf_type("auto", q) for q in ("f16", "int8", "int4")] == ["f16", "q8_0", "q4_0"]


def test_a_tier_is_exported_once_and_again_when_the_model_changes(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    told: list[Path] = []
    first = gguf_for(str(model), resolve(str(model)), "q8_0", on_export=told.append)
    assert first.is_file() and told == [first]
    assert gguf_for(str(model), resolve(str(model)), "q8_0", on_export=told.append) == first
    assert len(told) == 1  # cached
    before = fingerprint(resolve(str(model)))
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")
    assert fingerprint(resolve(str(model))) != before
    again = gguf_for(str(model), resolve(str(model)), "q8_0", on_export=told.append)
    assert again != first and len(told) == 2


def test_without_the_bindings_it_says_how_to_get_them(cli, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if it were not installed
    result = cli("generate", "-m", tiny_model, "hi", "-n", "3", "--engine", "llama.cpp")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --engine llama.cpp needs llama-cpp-python")
    assert "llmkit[llama-cpp]" in result.stderr and "Traceback" not in result.stderr


def test_a_family_export_does_not_write_is_refused_first(cli, tmp_path: Path, monkeypatch) -> None:
    from llmkit.testing import build_tiny_family

    model = build_tiny_family(tmp_path / "phi3", "phi3")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # the family is the first thing said, bindings or not
    result = cli("generate", "-m", model, "hi", "-n", "3", "--engine", "llama.cpp")
    assert result.exit_code == 1 and "exporting" not in result.stderr
    assert "Error: --engine llama.cpp runs the model families" in result.stderr
    assert "is a phi3" in result.stderr
    assert "--engine torch" in result.stderr


def test_a_budget_the_context_cannot_hold_is_refused_before_exporting(cli, tiny_model, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # a usage error comes first, bindings or not
    result = cli("generate", "-m", tiny_model, "hi", "-n", "5000", "--engine", "llama.cpp")
    assert result.exit_code == 2 and "leaves no room for a prompt" in result.stderr
    assert "exporting" not in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--engine", "vllm"], "unknown --engine"),
        (["--engine", "llama.cpp", "--compile"], "--compile applies to --engine torch"),
        (["--engine", "llama.cpp", "--device", "cuda"], "runs on the CPU"),
        (["--engine", "llama.cpp", "--server", "http://127.0.0.1:9"], "--engine applies to a local model"),
    ],
)
def test_options_that_do_not_go_with_the_engine_are_refused(cli, tiny_model: Path, args, says) -> None:
    result = cli("generate", "-m", tiny_model, "hi", "-n", "3", *args)
    assert result.exit_code == 2, result.stderr
    assert says in result.stderr


def test_the_wait_policy_is_given_back_only_if_llmkit_chose_it(monkeypatch) -> None:
    from llmkit import hardware

    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh CLI process, before torch starts
    monkeypatch.setattr(hardware, "_SET_HERE", {hardware.WAIT_POLICY})
    ours = {hardware.WAIT_POLICY: "PASSIVE"}
    assert hardware.spin_for_llama_cpp(ours) is True and ours == {}
    monkeypatch.setattr(hardware, "_SET_HERE", set())
    users = {hardware.WAIT_POLICY: "PASSIVE"}
    assert hardware.spin_for_llama_cpp(users) is False and users == {hardware.WAIT_POLICY: "PASSIVE"}


# -- decoding (needs the bindings) -------------------------------------------------------------------
def _records(cli, *args) -> list[dict]:
    result = cli("generate", *map(str, args), "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@needs_bindings
def test_greedy_text_at_f32_is_the_torch_engines(cli, tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat\nOnce upon a time\n\nA dog sat on\n")
    common = ["-m", tiny_model, "-i", prompts, "-n", 24, "--greedy", "--dtype", "float32"]
    torch_side = _records(cli, *common)
    llama_side = _records(cli, *common, "--engine", "llama.cpp")
    assert _untimed(llama_side) == _untimed(torch_side)
    assert all(r["completion_tokens"] == 24 or r["finish_reason"] == "eos" for r in llama_side)


@needs_bindings
def test_seeded_sampling_is_reproducible_and_draws_what_generate_draws(cli, tiny_model: Path) -> None:
    args = ["-m", tiny_model, "The cat", "-n", 20, "--dtype", "float32", "--temperature", "0.9"]
    args += ["--top-k", "40", "--top-p", "0.95", "--repetition-penalty", "1.2", "--min-new-tokens", "20"]
    one = _records(cli, *args, "--seed", 7, "--engine", "llama.cpp")
    again = _records(cli, *args, "--seed", 7, "--engine", "llama.cpp")
    assert _untimed(again) == _untimed(one)
    other = _records(cli, *args, "--seed", 8, "--engine", "llama.cpp")
    assert other[0]["completion"] != one[0]["completion"]
    # transformers' processors and torch.multinomial from the same seed: the torch engine's draws.
    torch_side = _records(cli, *args, "--seed", 7)
    assert one[0]["completion"] == torch_side[0]["completion"]
    assert one[0]["completion_tokens"] == 20 and one[0]["seed"] == 7


@needs_bindings
def test_stop_strings_streaming_and_samples(cli, tiny_model: Path) -> None:
    base = ["-m", tiny_model, "The cat", "-n", 40, "--seed", 3, "--engine", "llama.cpp"]
    [free] = _records(cli, *base)
    text = free["completion"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    [cut] = _records(cli, *base, "--stop", stop)
    assert cut["finish_reason"] == "stop" and cut["completion"] == text[: text.index(stop)]
    streamed = cli("generate", *map(str, base), "--stream", "--stop", stop)
    assert streamed.exit_code == 0 and streamed.stdout == cut["completion"] + "\n"
    samples = _records(cli, *base, "--num-samples", 3)
    assert [s["sample"] for s in samples] == [0, 1, 2]
    assert len({s["completion"] for s in samples}) > 1  # each sample draws on


def _nll_per_token(path: Path, ids: list[int], context: int) -> float:
    """Mean negative log-likelihood of ids[1:] under llama.cpp, one token fed at a time."""
    import torch

    from llmkit.llamacpp.runtime import LlamaCpp

    runtime = LlamaCpp(path, context, torch.get_num_threads())
    try:
        logits, total = runtime.start(ids[:1]), 0.0
        for token in ids[1:]:
            total -= float(torch.log_softmax(logits.double(), -1)[token])
            logits = runtime.feed([token])
    finally:
        runtime.close()
    return total / (len(ids) - 1)


@needs_bindings
@pytest.mark.skipif(
    not (BUILTIN_DIR / "tiny-shakespeare" / "config.json").is_file(), reason="no built-in model"
)
def test_each_tier_costs_at_most_its_stated_perplexity() -> None:
    """On the built-in model: f32 is the torch model's perplexity; f16, q8_0 and q4_0 within 1%, 2%
    and 8% of it (measured: see the README's table)."""
    import torch

    from llmkit.config import LoadConfig
    from llmkit.models import load

    lm = load(LoadConfig(model="tiny-shakespeare", dtype="float32"))
    ids = lm.tokenizer(SHAKESPEARE)["input_ids"][: lm.context]
    with torch.inference_mode():
        loss = float(lm.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    reference = math.exp(loss)
    source = resolve("tiny-shakespeare")
    got = {
        kind: math.exp(_nll_per_token(gguf_for("tiny-shakespeare", source, kind), ids, lm.context))
        for kind in ("f32", "f16", "q8_0", "q4_0")
    }
    assert got["f32"] == pytest.approx(reference, rel=1e-4)
    for kind, tolerance in (("f16", 0.01), ("q8_0", 0.02), ("q4_0", 0.08)):
        assert abs(got[kind] / reference - 1) <= tolerance, (kind, got, reference)
