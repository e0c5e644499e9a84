"""`llmkit generate` against plain transformers, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer


def plain_greedy(model_dir: Path, prompt: str, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id
    )
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_greedy_equals_plain_generate(cli, tiny_model: Path) -> None:
    prompt = "The cat sees the"
    result = cli(
        "generate", "-m", tiny_model, prompt, "--greedy", "-n", "12", "--min-new-tokens", "12", "--no-stream"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == plain_greedy(tiny_model, prompt, 12) + "\n"


def test_temperature_zero_is_greedy(cli, tiny_model: Path) -> None:
    a = cli("generate", "-m", tiny_model, "A dog", "-t", "0", "-n", "8", "--format", "jsonl")
    b = cli("generate", "-m", tiny_model, "A dog", "--greedy", "-n", "8", "--format", "jsonl")
    assert records(a.stdout)[0]["completion"] == records(b.stdout)[0]["completion"]


def test_seeded_sampling_is_reproducible_and_seed_matters(cli, tiny_model: Path) -> None:
    args = ["generate", "-m", tiny_model, "The queen", "-n", "20", "--min-new-tokens", "20", "--top-k", "0"]
    first = cli(*args, "--seed", "7", "-s", "3", "--no-stream")
    again = cli(*args, "--seed", "7", "-s", "3", "--no-stream")
    other = cli(*args, "--seed", "8", "-s", "3", "--no-stream")
    assert first.exit_code == 0, first.stderr
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout
    assert len(set(first.stdout.splitlines())) > 1  # samples differ from each other


def test_streamed_text_equals_unstreamed(cli, tiny_model: Path) -> None:
    args = ["generate", "-m", tiny_model, "My friend", "-n", "30", "--seed", "3"]
    streamed = cli(*args, "--stream")
    plain = cli(*args, "--no-stream")
    assert streamed.exit_code == 0, streamed.stderr
    assert streamed.stdout == plain.stdout


def test_jsonl_record_fields(cli, tiny_model: Path) -> None:
    result = cli(
        "generate", "-m", tiny_model, "The river", "-n", "5", "--seed", "11", "-s", "2", "--format", "jsonl"
    )
    rows = records(result.stdout)
    assert [r["sample"] for r in rows] == [0, 1]
    for row in rows:
        assert set(row) == {
            "id",
            "prompt",
            "sample",
            "completion",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
            "seed",
            "seconds",
        }
        assert row["prompt"] == "The river" and row["seed"] == 11
        assert row["finish_reason"] in {"eos", "length"}
        if row["finish_reason"] == "length":
            assert row["completion_tokens"] == 5


def test_unseeded_run_reports_a_seed_that_reproduces_it(cli, tiny_model: Path) -> None:
    first = records(cli("generate", "-m", tiny_model, "The moon", "-n", "15", "-f", "jsonl").stdout)[0]
    again = records(
        cli(
            "generate", "-m", tiny_model, "The moon", "-n", "15", "-f", "jsonl", "--seed", str(first["seed"])
        ).stdout
    )[0]
    assert again["completion"] == first["completion"]


def test_multi_token_stop_string_stops_and_is_cut(cli, tiny_model: Path) -> None:
    # Seeded sampling: the same tokens up to the stop, and varied enough to pick a fresh stop string.
    base = [
        "generate",
        "-m",
        tiny_model,
        "The old king",
        "--seed",
        "5",
        "-n",
        "40",
        "--min-new-tokens",
        "40",
        "-f",
        "jsonl",
    ]
    full = records(cli(*base).stdout)[0]["completion"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    # A multi-token stop string from the middle of the greedy continuation, first seen there.
    ids = tok(full, add_special_tokens=False)["input_ids"]
    candidates = [full[s : s + 6] for s in (len(tok.decode(ids[:k])) for k in range(5, 30))]
    stop = next(
        c
        for c in candidates
        if len(c) == 6
        and c.isprintable()
        and "\ufffd" not in c
        and ("The old king" + full).find(c) > 12 + 5
        and len(tok(c, add_special_tokens=False)["input_ids"]) > 1
    )
    cut = full.index(stop)
    row = records(cli(*base, "--stop", stop).stdout)[0]
    assert row["finish_reason"] == "stop"
    assert row["completion"] == full[:cut]
    assert row["completion_tokens"] < 40  # decoding stopped, it was not merely trimmed afterwards
    kept = records(cli(*base, "--stop", stop, "--keep-stop").stdout)[0]
    assert kept["completion"] == full[:cut] + stop
    streamed = cli(
        "generate",
        "-m",
        tiny_model,
        "The old king",
        "--seed",
        "5",
        "-n",
        "40",
        "--min-new-tokens",
        "40",
        "--stop",
        stop,
        "--stream",
    )
    assert streamed.stdout == full[:cut] + "\n"


def test_input_text_file_keeps_order_and_line_ids(cli, tiny_model: Path, tmp_path: Path) -> None:
    prompts = ["The cat", "", "A small bird sings to the green hill and", "My friend", "The sea"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    result = cli(
        "generate", "-m", tiny_model, "-i", path, "--greedy", "-n", "6", "-f", "jsonl", "--batch-size", "2"
    )
    assert result.exit_code == 0, result.stderr
    rows = records(result.stdout)
    assert [r["id"] for r in rows] == [1, 3, 4, 5]  # blank lines are skipped, line numbers kept
    assert [r["prompt"] for r in rows] == [p for p in prompts if p]


def test_input_jsonl_keeps_ids(cli, tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "The cat"}\n{"prompt": "A dog"}\n{"id": 9, "prompt": "The"}\n')
    rows = records(cli("generate", "-m", tiny_model, "-i", path, "-n", "4", "-f", "jsonl").stdout)
    assert [(r["id"], r["prompt"]) for r in rows] == [("a", "The cat"), (2, "A dog"), (9, "The")]


def test_batched_greedy_equals_one_at_a_time(cli, tiny_model: Path, tmp_path: Path) -> None:
    prompts = [
        "The cat",
        "A small bird waits for the quiet song and the",
        "My",
        "The old king remembers",
        "Ünïcödé café",
        "The river finds her brother. The queen likes",
    ]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(prompts))
    batched = records(
        cli(
            "generate",
            "-m",
            tiny_model,
            "-i",
            path,
            "--greedy",
            "-n",
            "10",
            "--batch-size",
            "4",
            "-f",
            "jsonl",
        ).stdout
    )
    single = [
        records(cli("generate", "-m", tiny_model, p, "--greedy", "-n", "10", "-f", "jsonl").stdout)[0]
        for p in prompts
    ]
    assert [r["completion"] for r in batched] == [r["completion"] for r in single]


def test_text_mode_echo_and_separator(cli, tiny_model: Path) -> None:
    result = cli(
        "generate",
        "-m",
        tiny_model,
        "The cat",
        "--seed",
        "1",
        "-n",
        "5",
        "-s",
        "2",
        "--echo",
        "--separator",
        "\\n---\\n",
        "--no-stream",
    )
    parts = result.stdout.split("\n---\n")
    assert parts[-1] == "" and len(parts) == 3
    assert all(p.startswith("The cat") for p in parts[:2])


def test_max_length_counts_the_prompt(cli, tiny_model: Path) -> None:
    row = records(
        cli(
            "generate",
            "-m",
            tiny_model,
            "The old king sees the moon",
            "--max-length",
            "12",
            "--min-new-tokens",
            "1",
            "--greedy",
            "-f",
            "jsonl",
        ).stdout
    )[0]
    assert row["prompt_tokens"] + row["completion_tokens"] <= 12
    if row["finish_reason"] == "length":
        assert row["prompt_tokens"] + row["completion_tokens"] == 12


def test_long_prompt_is_truncated_with_a_warning_or_refused(cli, tiny_model: Path) -> None:
    long_prompt = "The cat sees the moon. " * 60  # far beyond the 128-token context
    ok = cli("generate", "-m", tiny_model, long_prompt, "-n", "8", "-f", "jsonl")
    assert ok.exit_code == 0
    assert "Warning:" in ok.stderr and "kept the last 120" in ok.stderr
    assert records(ok.stdout)[0]["prompt_tokens"] == 120
    refused = cli("generate", "-m", tiny_model, long_prompt, "-n", "8", "--truncate", "error")
    assert refused.exit_code == 1
    assert refused.stderr.startswith("Error: prompt 1 has")


def test_empty_prompt_samples_unconditionally(cli, tiny_model: Path) -> None:
    result = cli(
        "generate", "-m", tiny_model, "-", "-n", "5", "--min-new-tokens", "5", "-f", "jsonl", input=""
    )
    row = records(result.stdout)[0]
    assert row["prompt_tokens"] == 1 and row["completion_tokens"] == 5


def test_stdin_is_one_prompt(cli, tiny_model: Path) -> None:
    piped = cli("generate", "-m", tiny_model, "--greedy", "-n", "5", "-f", "jsonl", input="The cat\nsees")
    assert records(piped.stdout)[0]["prompt"] == "The cat\nsees"


def test_sampling_filters_are_applied(cli, tiny_model: Path) -> None:
    # top-k 1 is greedy whatever the seed: proof that the logits processor chain is in effect.
    greedy = records(cli("generate", "-m", tiny_model, "A dog", "--greedy", "-n", "12", "-f", "jsonl").stdout)
    for seed in ("1", "2"):
        topk1 = records(
            cli(
                "generate",
                "-m",
                tiny_model,
                "A dog",
                "--top-k",
                "1",
                "--seed",
                seed,
                "-n",
                "12",
                "-f",
                "jsonl",
            ).stdout
        )
        assert topk1[0]["completion"] == greedy[0]["completion"]
    for flags in (
        ["--top-p", "0.5"],
        ["--min-p", "0.1"],
        ["--typical-p", "0.9"],
        ["--repetition-penalty", "1.3"],
        ["--no-repeat-ngram-size", "2"],
    ):
        result = cli("generate", "-m", tiny_model, "A dog", "--seed", "1", "-n", "8", *flags)
        assert result.exit_code == 0, (flags, result.stderr)


@pytest.mark.parametrize(
    "flags",
    [
        ["-t", "-1"],
        ["--top-p", "0"],
        ["--top-p", "1.5"],
        ["--top-k", "-1"],
        ["-n", "0"],
        ["--batch-size", "0"],
        ["-s", "0"],
        ["-s", "2", "--greedy"],
        ["--format", "xml"],
        ["--truncate", "right"],
        ["-n", "500"],
        ["--max-length", "4096"],
    ],
)
def test_out_of_range_flags_are_usage_errors(cli, tiny_model: Path, flags: list[str]) -> None:
    result = cli("generate", "-m", tiny_model, "The cat", *flags)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr + result.stdout


def test_no_prompt_and_a_terminal_is_a_usage_error(cli, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setattr("llmkit.cli._inputs.stdin_is_terminal", lambda: True)
    result = cli("generate", "-m", tiny_model)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: no prompt given")


def test_prompt_and_input_together_are_refused(cli, tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("x\n")
    result = cli("generate", "-m", tiny_model, "hello", "-i", tmp_path / "p.txt")
    assert result.exit_code == 2


def test_bad_jsonl_line_is_reported_with_its_number(cli, tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    result = cli("generate", "-m", tiny_model, "-i", path, "-n", "2")
    assert result.exit_code == 1
    assert f"{path}:2: invalid JSON" in result.stderr


def test_stdout_has_only_generated_text(cli, tiny_model: Path) -> None:
    result = cli("-v", "generate", "-m", tiny_model, "The cat", "--greedy", "-n", "5", "--no-stream")
    assert result.stdout == plain_greedy(tiny_model, "The cat", 5) + "\n"
    assert "tokens/s" in result.stderr and "tokens/s" not in result.stdout
    assert "\x1b[" not in result.stdout


def test_generation_config_uses_transformers_processors(tiny_model: Path) -> None:
    from transformers import StopStringCriteria

    from llmkit.config import GenerateConfig, LoadConfig
    from llmkit.generation import GeneratedOnly, Generator
    from llmkit.models import load

    gen = Generator(
        load(LoadConfig(model=str(tiny_model))),
        GenerateConfig(temperature=0.7, top_p=0.9, min_p=0.05, stop=["\n\n"], seed=1),
    )
    config = gen.generation_config(10)
    assert config.do_sample and config.temperature == 0.7 and config.top_p == 0.9 and config.min_p == 0.05
    [criterion] = gen._stopping_criteria(7)
    assert isinstance(criterion, GeneratedOnly) and criterion.prompt_width == 7
    assert isinstance(criterion.inner, StopStringCriteria)  # transformers' own matcher, on generated ids


def test_stop_string_spanning_prompt_and_completion_is_not_a_stop(cli, tiny_model: Path) -> None:
    prompt = "The old king"
    base = ["generate", "-m", tiny_model, prompt, "--seed", "5", "-n", "20", "-f", "jsonl"]
    full = records(cli(*base).stdout)[0]
    text = full["completion"]
    # The prompt's tail plus the first generated characters, found nowhere in the generated text alone.
    spans = [prompt[-k:] + text[:j] for k in (1, 2, 3) for j in (1, 2, 3)]
    stop = next(s for s in spans if s not in text and "\ufffd" not in s)
    row = records(cli(*base, "--stop", stop).stdout)[0]
    assert row == {**full, "seconds": row["seconds"]}  # no stop: the same completion, tokens and reason
    streamed = cli(
        "generate", "-m", tiny_model, prompt, "--seed", "5", "-n", "20", "--stop", stop, "--stream"
    )
    assert streamed.stdout == text + "\n"


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_stop_matches_generated_text_only(cli, seed: int) -> None:
    # The case: a prompt ending in a newline, --stop '\n\n'. A first generated "\n" must not stop.
    prompt = "ROMEO:\nI will go.\n"
    base = ["generate", "-m", "tiny-shakespeare", "--seed", str(seed), "-n", "40", "-f", "jsonl"]
    full = records(cli(*base, input=prompt).stdout)[0]["completion"]
    row = records(cli(*base, "--stop", "\\n\\n", input=prompt).stdout)[0]
    if "\n\n" in full:
        assert row["finish_reason"] == "stop" and row["completion"] == full[: full.index("\n\n")]
    else:
        assert row["completion"] == full and row["finish_reason"] != "stop"


def test_resume_output_continues_where_it_stopped(cli, tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"The cat number {i}\n" for i in range(10)))
    base = [
        "generate",
        "-m",
        tiny_model,
        "-i",
        prompts,
        "--greedy",
        "-n",
        "6",
        "-f",
        "jsonl",
        "--batch-size",
        "3",
    ]
    reference = cli(*base).stdout
    lines = reference.splitlines(keepends=True)
    partial = tmp_path / "out.jsonl"
    partial.write_text("".join(lines[:4]) + lines[4][:20])  # killed mid-line
    result = cli(*base, "--resume-output", partial)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "skipping 4 prompt(s)" in result.stderr

    def essence(text: str) -> list[tuple]:
        return [(r["id"], r["prompt"], r["completion"]) for r in records(text)]

    assert essence(partial.read_text()) == essence(reference)
    again = cli(*base, "--resume-output", partial)  # nothing left to do
    assert essence(partial.read_text()) == essence(reference) and "skipping 10" in again.stderr


def test_resume_output_drops_a_prompt_with_missing_samples(cli, tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "A dog"}) + "\n" for i in range(4)))
    out = tmp_path / "out.jsonl"
    full = records(
        cli(
            "generate", "-m", tiny_model, "-i", prompts, "-s", "2", "--seed", "1", "-n", "3", "-f", "jsonl"
        ).stdout
    )
    out.write_text("".join(json.dumps(r) + "\n" for r in full[:5]))  # p2 has one sample of two
    result = cli(
        "generate",
        "-m",
        tiny_model,
        "-i",
        prompts,
        "-s",
        "2",
        "--seed",
        "1",
        "-n",
        "3",
        "-f",
        "jsonl",
        "--resume-output",
        out,
    )
    assert result.exit_code == 0, result.stderr
    rows = records(out.read_text())
    assert sorted((r["id"], r["sample"]) for r in rows) == [(f"p{i}", s) for i in range(4) for s in (0, 1)]
    assert rows[:4] == full[:4]


def test_resume_output_needs_jsonl_and_input(cli, tiny_model: Path, tmp_path: Path) -> None:
    assert cli("generate", "-m", tiny_model, "hi", "--resume-output", tmp_path / "o.jsonl").exit_code == 2
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    assert cli("generate", "-m", tiny_model, "-i", prompts, "--resume-output", tmp_path / "o").exit_code == 2
    bad = cli("generate", "-m", tiny_model, "-i", prompts, "-f", "jsonl", "--resume-output", tmp_path)
    assert bad.exit_code == 1 and "is a directory" in bad.stderr


def test_compiled_static_cache_decoding_gives_the_same_greedy_text(
    cli, tiny_model: Path, tmp_path: Path
) -> None:
    # Prompts of different lengths, one per call: the compiled step must survive new cache shapes.
    path = tmp_path / "p.txt"
    path.write_text("The cat\nA small bird waits for the quiet song and the\nMy\n")
    args = ["generate", "-m", tiny_model, "-i", path, "--greedy", "-n", "10", "-b", "1", "-f", "jsonl"]
    from torch._dynamo.utils import counters

    eager = records(cli(*args).stdout)
    counters.clear()
    compiled = records(cli(*args, "--compile").stdout)
    assert counters["stats"]["unique_graphs"] >= 1  # the decoding step really was compiled
    assert [r["completion"] for r in compiled] == [r["completion"] for r in eager]
    assert all(r["completion_tokens"] == 10 for r in compiled)
