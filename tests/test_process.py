"""Real subprocesses: start-up imports, pipes that close early, Ctrl-C, and no terminal attached."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_llmkit, run_torchrun

HEAVY = ("torch", "transformers", "accelerate")


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["perplexity", "-h"], ["--version"]])
def test_help_does_not_import_heavy_libraries(argv: list[str]) -> None:
    code = (
        "import sys\n"
        f"sys.argv = ['llmkit', *{argv!r}]\n"
        "from llmkit.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY [] 0" in result.stdout, result.stdout + result.stderr


def test_version_and_short_help() -> None:
    from llmkit import __version__

    assert run_llmkit("--version").stdout == f"llmkit {__version__}\n"
    assert "Usage:" in run_llmkit("-h").stdout
    help_text = run_llmkit("generate", "--help").stdout
    assert "Examples:" in help_text and "--max-new-tokens" in help_text


def test_closed_pipe_exits_quietly(tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sees\n" * 200)
    err = tmp_path / "err.txt"
    cmd = (
        f"{sys.executable} -m llmkit generate -m {tiny_model} -i {prompts} -n 8 --batch-size 2 "
        f"-f jsonl 2>{err} | head -1"
    )
    result = subprocess.run(
        ["bash", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.stdout.count("\n") == 1
    stderr = err.read_text()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


def test_ctrl_c_exits_130_without_traceback(tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The old king remembers\n" * 500)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmkit",
            "generate",
            "-m",
            str(tiny_model),
            "-i",
            str(prompts),
            "-n",
            "60",
            "--batch-size",
            "1",
            "-f",
            "jsonl",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # generation is under way
    assert first.startswith("{")
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert "--resume-output FILE" in stderr  # how to make the next run resumable
    assert all(line.startswith("{") and line.endswith("}") for line in rest.splitlines())  # whole lines only


def test_no_prompt_with_a_terminal_on_stdin_is_a_usage_error_not_a_hang(tiny_model: Path) -> None:
    master, slave = pty.openpty()
    try:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "llmkit", "generate", "-m", str(tiny_model)],
            stdin=slave,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    finally:
        os.close(master)
        os.close(slave)
    assert result.returncode == 2
    assert result.stderr.startswith("Error: no prompt given")
    assert time.monotonic() - started < 60


def test_piped_output_is_plain_and_talk_goes_to_stderr(tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat\nA dog\n")
    result = run_llmkit("generate", "-m", tiny_model, "-i", prompts, "-n", "5", "--seed", "1")
    assert result.returncode == 0
    assert "\x1b" not in result.stdout and "\x1b" not in result.stderr
    assert result.stderr == ""  # nothing to say: no progress bar, no summary off a terminal
    assert len(result.stdout.splitlines()) >= 2


def test_errors_have_no_traceback_unless_debug(tmp_path: Path) -> None:
    plain = run_llmkit("info", "-m", tmp_path)
    assert plain.returncode == 1
    assert plain.stderr.startswith("Error: ") and "Traceback" not in plain.stderr
    debug = run_llmkit("--debug", "info", "-m", tmp_path)
    assert "Traceback" in debug.stderr
    env_debug = run_llmkit("info", "-m", tmp_path, env={"LLMKIT_DEBUG": "1"})
    assert "Traceback" in env_debug.stderr


def test_bad_option_is_exit_2(tiny_model: Path) -> None:
    result = run_llmkit("generate", "-m", tiny_model, "--no-such-flag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_ctrl_c_then_resume_output_completes_the_file(tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"The old king {i}\n" for i in range(300)))
    out = tmp_path / "out.jsonl"
    argv = [
        sys.executable,
        "-m",
        "llmkit",
        "generate",
        "-m",
        str(tiny_model),
        "-i",
        str(prompts),
        "-n",
        "20",
        "--greedy",
        "--batch-size",
        "1",
        "-f",
        "jsonl",
        "--resume-output",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.read_text().count("\n") < 5) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert f"written to {out} by this run; the same command again continues" in stderr
    text = out.read_text()
    assert text.endswith("\n") and 5 <= text.count("\n") < 300  # only whole lines, and not all of them
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == list(range(1, 301))


def test_two_processes_split_prompts_and_write_one_ordered_output(tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"The {'old ' * (i % 4)}king {i}\n" for i in range(23)))
    common = [
        "generate",
        "-m",
        str(tiny_model),
        "-i",
        str(prompts),
        "--greedy",
        "-n",
        "8",
        "-f",
        "jsonl",
        "--batch-size",
        "3",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "llmkit", *common], capture_output=True, text=True, env=env, timeout=120
    )
    two = run_torchrun(*common)
    assert two.returncode == 0, two.stderr

    def essence(text: str) -> list[tuple]:
        return [(r["id"], r["completion"]) for r in map(json.loads, text.splitlines())]

    assert essence(two.stdout) == essence(one.stdout)
    assert len(essence(two.stdout)) == 23
