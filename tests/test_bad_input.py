"""No input, however wrong, gives a traceback or a half-written result that looks complete."""

from __future__ import annotations

import errno
import io
import pathlib
from pathlib import Path

import pytest


def one_error(result, code: int = 1) -> str:
    """The contract: the exit code, one `Error:` line, optionally `Hint:` lines, and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert all(line.startswith("Hint: ") for line in lines[lines.index(errors[0]) + 1 :]), result.stderr
    return errors[0]


def commands(model: Path, path: Path, tmp: Path) -> dict[str, list]:
    """Every command that reads a file, reading `path`."""
    return {
        "generate": ["generate", "-m", model, "-i", path, "-n", "2"],
        "perplexity": ["perplexity", "-m", model, path],
        "tokenize": ["tokenize", "-m", model, "--file", path],
        "finetune": [
            "finetune",
            path,
            "-o",
            tmp / "out",
            "-m",
            model,
            "--block-size",
            "16",
            "--cache-dir",
            tmp / "cache",
        ],
        "train-tokenizer": ["train-tokenizer", path, "-o", tmp / "bpe", "--vocab-size", "300"],
    }


@pytest.fixture
def make(tmp_path: Path):
    def _make(kind: str) -> Path:
        path = tmp_path / f"input-{kind}.txt"
        if kind == "missing":
            return path
        if kind == "empty":
            path.write_text("")
        elif kind == "binary":
            path.write_bytes(bytes(range(256)) * 40)
        elif kind == "unreadable":
            path.write_text("The cat sees the moon.\n" * 50)
        elif kind == "directory":
            path = tmp_path / "no-text-here"
            path.mkdir()
            (path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        elif kind == "jsonl":
            path = tmp_path / "input.jsonl"
            path.write_text('{"prompt": "ok", "text": "ok"}\n{"prompt": "broken\n')
        return path

    return _make


def unreadable(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """Root reads anything whatever its mode, so a permission error is simulated at open()."""
    real_open, real_path_open = io.open, pathlib.Path.open

    def guarded(file, *args, **kwargs):
        if str(file) == str(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def guarded_path(self, *args, **kwargs):
        if str(self) == str(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_path_open(self, *args, **kwargs)

    monkeypatch.setattr(io, "open", guarded)
    monkeypatch.setattr("builtins.open", guarded)
    monkeypatch.setattr(pathlib.Path, "open", guarded_path)


CASES = {
    # kind: commands expected to refuse it (tokenize of an empty file is legitimately 0 tokens)
    "missing": ["generate", "perplexity", "tokenize", "finetune", "train-tokenizer"],
    "empty": ["generate", "perplexity", "finetune", "train-tokenizer"],
    "binary": ["generate", "perplexity", "tokenize", "finetune", "train-tokenizer"],
    "unreadable": ["generate", "perplexity", "tokenize", "finetune", "train-tokenizer"],
    "directory": ["generate", "perplexity", "tokenize", "finetune", "train-tokenizer"],
    "jsonl": ["generate", "finetune", "train-tokenizer"],
}


@pytest.mark.parametrize(("kind", "command"), [(k, c) for k, cs in CASES.items() for c in cs])
def test_bad_files(cli, tiny_model: Path, tmp_path: Path, make, monkeypatch, kind: str, command: str) -> None:
    path = make(kind)
    if kind == "unreadable":
        unreadable(monkeypatch, path)
    argv = commands(tiny_model, path, tmp_path)[command]
    line = one_error(cli(*argv))
    assert str(path.name) in line or kind in ("empty",) or command == "perplexity", line
    assert (
        not (tmp_path / "out" / "config.json").exists() and not (tmp_path / "bpe" / "tokenizer.json").exists()
    )


def test_empty_file_has_zero_tokens(cli, tiny_model: Path, make) -> None:
    assert cli("tokenize", "-m", tiny_model, "-c", "--file", make("empty")).stdout == "0\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["perplexity", "{f}", "--batch-size", "0"],
        ["perplexity", "{f}", "--context", "1"],
        ["finetune", "{f}", "-o", "{o}", "--batch-size", "0"],
        ["finetune", "{f}", "-o", "{o}", "--block-size", "1"],
        ["finetune", "{f}", "-o", "{o}", "--lr", "-1"],
        ["finetune", "{f}", "-o", "{o}", "--val-split", "1.5"],
        ["finetune", "{f}", "-o", "{o}", "--epochs", "0"],
        ["finetune", "{f}", "-o", "{o}", "--mixed-precision", "fp8"],
        ["finetune", "{f}", "-o", "{o}", "--lr-schedule", "exp"],
        ["finetune", "{f}", "-o", "{o}", "--block-size", "4096"],
        ["finetune", "{f}", "-o", "{o}", "--n-layer", "2"],
        ["finetune", "{f}", "-o", "{o}", "--resume", "--resume-from", "x"],
        ["train-tokenizer", "{f}", "-o", "{o}", "--vocab-size", "100"],
        ["generate", "hello", "--device", "tpu"],
        ["perplexity", "{f}", "--device", "gpu"],
        ["info", "--device", "cuda:x"],
        ["finetune", "{f}", "-o", "{o}", "--device", "tpu"],
    ],
)
def test_out_of_range_options_are_usage_errors(
    cli, tiny_model: Path, tmp_path: Path, argv: list[str]
) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The cat sees the moon. " * 100)
    argv = [a.format(f=text, o=tmp_path / "out") for a in argv]
    one_error(
        cli(argv[0], "-m", tiny_model, *argv[1:], "--cache-dir", tmp_path / "c")
        if argv[0] == "finetune"
        else cli(*argv[:1], *(["-m", tiny_model] if argv[0] != "train-tokenizer" else []), *argv[1:]),
        code=2,
    )


def test_output_paths_that_are_files(cli, tiny_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The cat sees the moon. " * 100)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_error(cli("finetune", text, "-o", a_file, "-m", tiny_model, "--cache-dir", tmp_path / "c"))
    one_error(cli("train-tokenizer", text, "-o", a_file, "--vocab-size", "300"))
    one_error(cli("plot", tmp_path, "-o", a_file / "x.png"))


def test_read_only_output_directory(cli, tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The cat sees the moon. " * 100)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_write = pathlib.Path.write_text

    def read_only(self, *args, **kwargs):
        if locked in self.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    line = one_error(
        cli("finetune", text, "-o", locked / "run", "-m", tiny_model, "--cache-dir", tmp_path / "c")
    )
    assert "cannot write" in line


def test_disk_full_during_final_save(cli, tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    from transformers import PreTrainedModel

    text = tmp_path / "t.txt"
    text.write_text("The cat sees the moon. " * 200)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "run"
    line = one_error(
        cli(
            "finetune",
            text,
            "-o",
            out,
            "-m",
            tiny_model,
            "--block-size",
            "16",
            "--max-steps",
            "2",
            "--cache-dir",
            tmp_path / "c",
        )
    )
    assert "No space left on device" in line
    assert not (out / "config.json").exists() and not (out / "llmkit.json").exists()
    assert not list(out.glob(".llmkit-tmp-*"))


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    cli, tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    from accelerate import Accelerator

    text = tmp_path / "t.txt"
    text.write_text("The cat sees the moon. " * 200)
    real_save = Accelerator.save_state
    calls = []

    def fills_up(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir) / "partial.bin").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fills_up)
    out = tmp_path / "run"
    line = one_error(
        cli(
            "finetune",
            text,
            "-o",
            out,
            "-m",
            tiny_model,
            "--block-size",
            "16",
            "--max-steps",
            "6",
            "--save-every",
            "2",
            "--cache-dir",
            tmp_path / "c",
        )
    )
    assert "could not write checkpoint" in line and "No space left on device" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    resumed = cli(
        "finetune",
        text,
        "-o",
        out,
        "-m",
        tiny_model,
        "--block-size",
        "16",
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--cache-dir",
        tmp_path / "c",
        "--resume",
    )
    assert resumed.exit_code == 0, resumed.stderr
    assert (out / "config.json").exists()


def test_disk_full_writing_generated_output(cli, tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat\n")
    import llmkit.cli.generate as generate

    def full(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(generate._Sink, "write", full)
    line = one_error(cli("generate", "-m", tiny_model, "-i", prompts, "-n", "2"))
    assert "No space left on device" in line
