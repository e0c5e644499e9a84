"""`llmkit finetune`, `train-tokenizer` and `plot` end to end on tiny models (CPU, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PATTERN, finetune_args, metrics, run_torchrun
from transformers import AutoModelForCausalLM, AutoTokenizer


def train(cli, model: Path, data: Path, out: Path, *flags: str):
    result = cli(*finetune_args(data, out, model, *flags))
    assert result.exit_code == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, pattern_corpus: Path, tiny_model: Path
) -> tuple[Path, object]:
    from typer.testing import CliRunner

    from llmkit.cli.app import app

    out = tmp_path_factory.mktemp("runs") / "pattern-model"
    flags = [
        "--lr",
        "3e-3",
        "--max-steps",
        "60",
        "--eval-every",
        "20",
        "--log-every",
        "5",
        "--warmup-steps",
        "5",
    ]
    result = CliRunner().invoke(app, finetune_args(pattern_corpus, out, tiny_model, *flags))
    assert result.exit_code == 0, result.stderr
    return out, result


def test_learns_the_pattern_and_generates_it(trained, cli) -> None:
    out, _ = trained
    rows = metrics(out)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 3  # steps 20, 40 and the end
    assert vals[-1] < 0.3 < 5.0 < rows[0]["loss"]  # from ~log(vocab) to nearly certain
    text = cli("generate", "-m", out, "The cat sees", "--greedy", "-n", "12", "--no-stream").stdout
    assert text.startswith(" the moon. A dog likes the sea.")


def test_stdout_is_only_the_output_path(trained) -> None:
    out, result = trained
    assert result.stdout == f"{out}\n"
    assert "plan:" in result.stderr and "effective batch" in result.stderr


def test_output_files(trained) -> None:
    out, _ = trained
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "llmkit.json",
        "README.md",
        "metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob(".llmkit-tmp-*"))
    meta = json.loads((out / "llmkit.json").read_text())
    assert meta["config"]["max_steps"] == 60 and meta["total_steps"] == 60
    assert meta["metrics"]["step"] == 60 and meta["metrics"]["val_perplexity"] > 1
    assert set(meta["versions"]) == {"llmkit", "torch", "transformers", "accelerate"}
    assert len(meta["data"]["fingerprint"]) >= 16
    card = (out / "README.md").read_text()
    assert "validation perplexity" in card and f"{meta['metrics']['val_perplexity']:.3f}" in card
    for row in metrics(out):
        assert {"step", "epoch", "loss", "lr", "tokens", "tokens_per_second"} <= set(row)
        assert row["tokens"] == row["step"] * 8 * 32
    assert [r["step"] for r in metrics(out)] == list(range(5, 61, 5))


def test_plain_transformers_loads_it_with_the_same_logits(trained) -> None:
    from transformers import pipeline

    from llmkit.config import LoadConfig
    from llmkit.models import load

    out, _ = trained
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load(LoadConfig(model=str(out))).model
    ids = AutoTokenizer.from_pretrained(out)("The cat sees the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours(ids).logits)
    generator = pipeline("text-generation", model=str(out), device="cpu")
    assert generator("The cat", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("The cat")


def test_cache_hit_on_the_second_run(cli, pattern_corpus: Path, tiny_model: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    args = [
        "finetune",
        pattern_corpus,
        "-m",
        tiny_model,
        "--block-size",
        "32",
        "--max-steps",
        "2",
        "--cache-dir",
        cache,
    ]
    first = cli(*args, "-o", tmp_path / "a")
    second = cli(*args, "-o", tmp_path / "b")
    assert "cache hit" not in first.stderr and "token cache hit" in second.stderr
    meta = [json.loads((tmp_path / d / "llmkit.json").read_text()) for d in "ab"]
    assert meta[0]["data"]["fingerprint"] == meta[1]["data"]["fingerprint"]
    assert meta[1]["data"]["cache_hits"] == 1


def test_grad_accum_matches_a_bigger_batch(
    cli, pattern_corpus: Path, tiny_model_nodrop: Path, tmp_path: Path
) -> None:
    common = ["--max-steps", "6", "--log-every", "1", "--lr", "1e-3", "--val-split", "0"]
    train(cli, tiny_model_nodrop, pattern_corpus, tmp_path / "big", "--batch-size", "8", *common)
    train(
        cli,
        tiny_model_nodrop,
        pattern_corpus,
        tmp_path / "accum",
        "--batch-size",
        "2",
        "--grad-accum",
        "4",
        *common,
    )
    big, accum = metrics(tmp_path / "big"), metrics(tmp_path / "accum")
    assert [r["loss"] for r in accum] == pytest.approx([r["loss"] for r in big], rel=1e-4)
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "big" / "model.safetensors"),
        load_file(tmp_path / "accum" / "model.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(pattern_corpus: Path, tiny_model_nodrop: Path, tmp_path: Path) -> None:
    common = [
        "finetune",
        str(pattern_corpus),
        "-m",
        str(tiny_model_nodrop),
        "--block-size",
        "32",
        "--max-steps",
        "5",
        "--log-every",
        "1",
        "--lr",
        "1e-3",
        "--eval-every",
        "5",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "llmkit", *common, "-o", str(tmp_path / "one"), "--batch-size", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = run_torchrun(*common, "-o", tmp_path / "two", "--batch-size", "4", env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr
    assert two.stdout == f"{tmp_path / 'two'}\n"  # one process printed, once
    assert "× 2" in two.stderr
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["loss"] for r in m2] == pytest.approx([r["loss"] for r in m1], rel=1e-4)
    assert m2[-1]["val_loss"] == pytest.approx(m1[-1]["val_loss"], rel=1e-4)
    assert m2[-1]["tokens"] == m1[-1]["tokens"]


def test_from_scratch_with_a_trained_tokenizer(cli, pattern_corpus: Path, tmp_path: Path) -> None:
    bpe = tmp_path / "bpe"
    made = cli("train-tokenizer", pattern_corpus, "-o", bpe, "--vocab-size", "300")
    assert made.exit_code == 0, made.stderr
    assert made.stdout == f"{bpe}\n"
    tok = AutoTokenizer.from_pretrained(bpe)
    assert 257 < len(tok) <= 300 and tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok(PATTERN)["input_ids"]) == PATTERN
    count = cli("tokenize", "-m", bpe, "--count", PATTERN)  # a tokenizer directory is enough to tokenize
    assert count.stdout == f"{len(tok(PATTERN)['input_ids'])}\n"
    out = tmp_path / "scratch"
    # gpt2's architecture needs nothing from the hub (offline here): its config is transformers' default.
    train(
        cli,
        Path("gpt2"),
        pattern_corpus,
        out,
        "--from-scratch",
        "--tokenizer",
        bpe,
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--context",
        "64",
        "--max-steps",
        "40",
        "--lr",
        "5e-3",
        "--optimizer",
        "adamw",  # the bound below was set for AdamW; Muon, the from-scratch default, is tested elsewhere
        "--save-dtype",
        "bfloat16",
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (1, 32, 64)
    assert model.config.vocab_size == len(tok)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert metrics(out)[-1]["val_loss"] < 1.5
    from llmkit.config import LoadConfig
    from llmkit.models import load

    assert load(LoadConfig(model=str(out))).model.dtype == torch.float32  # upcast for the CPU
    text = cli("generate", "-m", out, "The cat", "--greedy", "-n", "8", "--no-stream")
    assert text.exit_code == 0, text.stderr


def test_output_directory_rules(cli, pattern_corpus: Path, tiny_model: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = cli(
        "finetune", pattern_corpus, "-o", foreign, "-m", tiny_model, "--block-size", "32", "--max-steps", "1"
    )
    assert refused.exit_code == 1 and "not an earlier llmkit run" in refused.stderr
    train(cli, tiny_model, pattern_corpus, foreign, "--max-steps", "1", "--overwrite")
    assert (foreign / "notes.txt").read_text() == "mine"  # --overwrite replaces model files, nothing else
    # An earlier run's model is replaced only with --overwrite (tests/test_finetune_fixes.py has more).
    again = cli(
        "finetune", pattern_corpus, "-o", foreign, "-m", tiny_model, "--block-size", "32", "--max-steps", "2"
    )
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    train(cli, tiny_model, pattern_corpus, foreign, "--max-steps", "2", "--overwrite")
    assert [r["step"] for r in metrics(foreign)] == [2]  # a fresh run starts a fresh metrics.jsonl
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli("finetune", pattern_corpus, "-o", a_file, "-m", tiny_model).exit_code == 1


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "empty"),
        ("tiny.txt", "The cat.", "fewer than one block"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl:2"),
        ("nofield.jsonl", '{"body": "The cat sees the moon."}\n', '"text"'),
    ],
)
def test_data_errors(cli, tiny_model: Path, tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    result = cli(
        "finetune",
        path,
        "-o",
        tmp_path / "out",
        "-m",
        tiny_model,
        "--block-size",
        "32",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert result.exit_code == 1, result.stderr
    assert result.stderr.startswith("Error: ") and message in result.stderr.splitlines()[0]
    assert "Traceback" not in result.stderr


def test_binary_and_missing_data(cli, tiny_model: Path, tmp_path: Path) -> None:
    blob = tmp_path / "blob.txt"
    blob.write_bytes(b"\x00\xff" * 500)
    for path in (blob, tmp_path / "missing.txt"):
        result = cli(
            "finetune", path, "-o", tmp_path / "out", "-m", tiny_model, "--cache-dir", tmp_path / "c"
        )
        assert result.exit_code == 1 and result.stderr.startswith("Error: ")


def test_plot(cli, trained, tmp_path: Path) -> None:
    out, _ = trained
    target = tmp_path / "curve.png"
    result = cli("plot", out, "-o", target)
    assert result.exit_code == 0, result.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli("plot", tmp_path).exit_code == 1


def test_compiled_model_trains_like_eager_and_keeps_parameter_names(
    cli, pattern_corpus: Path, tiny_model_nodrop: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    common = ["--max-steps", "4", "--log-every", "1", "--lr", "1e-3", "--val-split", "0", "--save-every", "2"]
    train(cli, tiny_model_nodrop, pattern_corpus, tmp_path / "eager", *common)
    counters.clear()
    train(cli, tiny_model_nodrop, pattern_corpus, tmp_path / "compiled", *common, "--compile")
    assert counters["stats"]["unique_graphs"] >= 1  # the model really was compiled
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-3)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("eager", "compiled"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)
    # Checkpoints keep the plain parameter names, so a run resumes with or without --compile.
    [state] = (tmp_path / "compiled").glob("checkpoints/step-2/model*.safetensors")
    assert not any("_orig_mod" in key for key in load_file(state))
