"""What a new user meets in a first hour (issue 16): seeds, refused combinations, honest -v, info."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.serving import Server


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def srv(tiny_model: Path):
    server = Server("-m", tiny_model)
    yield server
    server.stop()


# -- generate --server -----------------------------------------------------------------------------
def test_server_gives_every_prompt_of_a_file_its_own_seed(srv: Server, cli, tmp_path: Path) -> None:
    # The same prompt three times: with one seed for all of them, all three came back the same.
    prompts = tmp_path / "same.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": "The cat"}) + "\n" for i in "abc"))
    args = ["--server", srv.url, "-i", prompts, "-f", "jsonl", "--seed", "1", "-s", "2", "-n", "8"]
    result = cli("generate", *args, "-b", "1")
    assert result.exit_code == 0, result.stderr
    rows = records(result.stdout)
    assert [(r["id"], r["sample"]) for r in rows] == [(i, s) for i in "abc" for s in (0, 1)]
    assert len({r["completion"] for r in rows}) == 6  # every sample of the run drew its own
    # Prompt k (from 0) carries seed 1 + k * 2, reported in its records; alone it gives the same text.
    assert [r["seed"] for r in rows] == [1, 1, 3, 3, 5, 5]
    alone = cli(
        "generate", "--server", srv.url, "The cat", "-f", "jsonl", "--seed", "3", "-s", "2", "-n", "8"
    )
    assert [r["completion"] for r in records(alone.stdout)] == [r["completion"] for r in rows[2:4]]
    # Requests in flight together: still in input order, the same seeds.
    batched = records(cli("generate", *args).stdout)
    assert [(r["id"], r["seed"]) for r in batched] == [(r["id"], r["seed"]) for r in rows]
    assert len({r["completion"] for r in batched}) == 6


def test_greedy_runs_report_no_seed(srv: Server, cli, tiny_model: Path) -> None:
    flags = ["The cat", "--greedy", "-n", "4", "-f", "jsonl"]
    local = cli("-v", "generate", "-m", tiny_model, *flags)
    assert local.exit_code == 0, local.stderr
    assert records(local.stdout)[0]["seed"] is None
    assert "seed" not in local.stderr
    remote = cli("generate", "--server", srv.url, *flags)
    assert records(remote.stdout)[0]["seed"] is None
    sampled = cli("-v", "generate", "-m", tiny_model, "The cat", "-n", "4", "--seed", "7", "-f", "jsonl")
    assert records(sampled.stdout)[0]["seed"] == 7 and "seed 7" in sampled.stderr


def test_server_refuses_a_model_it_does_not_serve(srv: Server, cli, tiny_model: Path, monkeypatch) -> None:
    other = cli("generate", "--server", srv.url, "-m", "tiny-shakespeare", "hi", "-n", "2")
    assert other.exit_code == 2
    assert f"serves {tiny_model}" in other.stderr and "drop -m" in other.stderr
    same = cli("generate", "--server", srv.url, "-m", tiny_model, "hi", "-n", "2", "--greedy")
    assert same.exit_code == 0, same.stderr
    # Set in the environment for local runs: used by neither side, and said so.
    monkeypatch.setenv("LLMKIT_MODEL", "tiny-shakespeare")
    from_env = cli("generate", "--server", srv.url, "hi", "-n", "2", "--greedy")
    assert from_env.exit_code == 0, from_env.stderr
    assert from_env.stdout == same.stdout
    assert "LLMKIT_MODEL=tiny-shakespeare is not used" in from_env.stderr


# -- generate, locally -----------------------------------------------------------------------------
def test_max_new_tokens_and_max_length_exclude_each_other(cli, tiny_model: Path) -> None:
    both = cli("generate", "-m", tiny_model, "The cat", "-n", "8", "--max-length", "6")
    assert both.exit_code == 2 and "exclude each other" in both.stderr
    alone = cli("generate", "-m", tiny_model, "The cat", "--max-length", "6", "--greedy", "-f", "jsonl")
    assert alone.exit_code == 0, alone.stderr
    assert records(alone.stdout)[0]["completion_tokens"] <= 4


def test_verbose_says_what_runs_and_shows_no_loading_bar(cli, tiny_model: Path) -> None:
    int8 = cli("-v", "generate", "-m", tiny_model, "The cat", "-n", "2", "--quantize", "int8")
    assert int8.exit_code == 0, int8.stderr
    assert "int8 weights in every linear layer" in int8.stderr
    assert "asked for" not in int8.stderr and "Loading weights" not in int8.stderr
    plain = cli("-v", "generate", "-m", tiny_model, "The cat", "-n", "2")
    assert "float32 (" in plain.stderr and "Loading weights" not in plain.stderr


def test_compile_says_it_is_compiling_on_stderr_only(cli, tiny_model: Path) -> None:
    # One new token: there is no decoding step to compile, so this stays fast.
    args = ["generate", "-m", tiny_model, "The cat", "-n", "1", "--greedy", "--compile", "--no-stream"]
    loud = cli(*args)
    assert loud.exit_code == 0, loud.stderr
    assert "compiling…" in loud.stderr and "compiling" not in loud.stdout
    assert "compiling" not in cli("-q", *args).stderr


def test_offline_hint_offers_the_built_in_model(cli) -> None:
    result = cli("generate", "The cat")  # -m gpt2, not in this test's empty cache
    assert result.exit_code == 1
    assert "-m tiny-shakespeare" in result.stderr


# -- tokenize, info --------------------------------------------------------------------------------
def test_tokenize_json_has_ids_and_tokens(cli, tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "The cat sees the sea."
    data = json.loads(cli("tokenize", "-m", tiny_model, "-f", "json", text).stdout)
    assert data == {
        "count": len(tok(text)["input_ids"]),
        "ids": tok(text)["input_ids"],
        "tokens": tok.tokenize(text),
    }


def test_count_of_a_file_of_many_pieces_equals_the_tokenizer(cli, tiny_model: Path, tmp_path: Path) -> None:
    from llmkit.testing import sentences
    from llmkit.tokens import SMALL_CHUNK_CHARS

    text = "".join(s + ("\n" if i % 7 else "\n\n  ") for i, s in enumerate(sentences(12_000)))
    assert len(text) > 2 * SMALL_CHUNK_CHARS  # counted piece by piece, not whole
    path = tmp_path / "big.txt"
    path.write_text(text, newline="")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    expected = len(tok(text)["input_ids"])
    assert cli("tokenize", "-m", tiny_model, "--count", "--file", path).stdout == f"{expected}\n"
    assert (
        json.loads(cli("tokenize", "-m", tiny_model, "-f", "json", "--file", path).stdout)["count"]
        == expected
    )


def test_info_reads_a_pickle_only_model_without_allow_pickle(cli, tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    result = cli("info", "-m", pickled, "-f", "json")
    assert result.exit_code == 0, result.stderr
    details = json.loads(result.stdout)
    expected = json.loads(cli("info", "-m", tiny_model, "-f", "json").stdout)["parameters"]
    assert details["parameters"] == expected
    assert "pickle" in details["stored_dtype"]
    assert cli("generate", "-m", pickled, "The cat").exit_code == 1  # loading them still needs the flag


# -- threads ---------------------------------------------------------------------------------------
def threads_seen(*argv: str, env: dict[str, str] | None = None) -> str:
    """What torch ran with in a real `llmkit ARGV` process: its thread count and OpenMP wait policy."""
    code = (
        "import atexit, os, sys\n"
        "atexit.register(lambda: sys.stderr.write(\n"
        "    f\"SEEN threads={sys.modules['torch'].get_num_threads()} \"\n"
        "    f\"policy={os.environ.get('OMP_WAIT_POLICY')}\\n\"))\n"
        "from llmkit.cli.app import main\n"
        f"sys.argv = ['llmkit', *{list(argv)!r}]\n"
        "main()\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**base, **(env or {})}
    )
    assert done.returncode == 0, done.stderr
    return next(line for line in done.stderr.splitlines() if line.startswith("SEEN"))


def test_threads_flag_and_passive_waiting(tiny_model: Path) -> None:
    plain = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    )
    cores = int(plain.stdout)  # torch's own default, whatever the machine
    assert threads_seen("--threads", "1", "info", "-m", str(tiny_model)) == "SEEN threads=1 policy=PASSIVE"
    assert threads_seen("info", "-m", str(tiny_model)) == f"SEEN threads={cores} policy=PASSIVE"
    chosen = threads_seen(
        "info", "-m", str(tiny_model), env={"OMP_WAIT_POLICY": "ACTIVE", "LLMKIT_THREADS": "1"}
    )
    assert chosen == "SEEN threads=1 policy=ACTIVE"  # the user's policy stands; the env var sets threads


def test_threads_must_be_positive(cli, tiny_model: Path) -> None:
    result = cli("--threads", "0", "info", "-m", tiny_model)
    assert result.exit_code == 2 and "--threads must be at least 1" in result.stderr
