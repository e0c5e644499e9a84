"""`finetune --lora` (PEFT adapters on a frozen model), and adapter directories wherever -m is taken."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PATTERN, assert_same_weights, finetune_args, metrics, run_torchrun
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkit.models import BUILTIN_DIR

# Few steps at a rate high enough for a random tiny model to learn something through rank-16 adapters.
TRAIN = ["--block-size", "32", "--max-steps", "30", "--lr", "3e-3", "--log-every", "5", "--eval-every", "15"]
TARGETS = ("c_attn", "c_proj", "c_fc")
PROMPT = "The cat sees the"
ADAPTER = "adapter_model.safetensors"


def invoke(*args: object):
    """The CLI in-process, for module fixtures (set up before the per-test environment is)."""
    from typer.testing import CliRunner

    from llmkit.cli import _output
    from llmkit.cli.app import app

    _output.settings.__init__()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("LLMKIT_CPU_BF16", "0")  # float32 on every machine, as in the tests
        result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def finetune(corpus: Path, model: Path, out: Path, *flags: str):
    return invoke(*finetune_args(corpus, out, model, *flags))


@pytest.fixture(scope="module")
def adapter(
    tmp_path_factory: pytest.TempPathFactory, pattern_corpus: Path, tiny_model: Path
) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("runs") / "lora"
    return out, finetune(pattern_corpus, tiny_model, out, "--lora", *TRAIN, "--sample-every", "30")


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, pattern_corpus: Path, tiny_model: Path) -> Path:
    """The same run as `adapter`, saved merged."""
    out = tmp_path_factory.mktemp("runs") / "merged"
    finetune(pattern_corpus, tiny_model, out, "--lora", *TRAIN, "--sample-every", "30", "--merge")
    return out


def train(cli, corpus: Path, model: Path, out: Path, *flags: str):
    """finetune through the `cli` fixture, with the block size and token cache every run here uses."""
    return cli(*finetune_args(corpus, out, model, *flags))


def peft_model(base: Path | str, adapter_dir: Path):
    """The adapter as PEFT's own loader sees it, on the base model as plain transformers loads it."""
    from peft import PeftModel

    with warnings.catch_warnings():  # PEFT asks transformers 5 a deprecated question; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir).eval()


def logits(model, model_dir: Path, text: str = PROMPT) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted_layers(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(in, out) features of every layer the default targets adapt; GPT-2's Conv1D weight is (in, out)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
    }


def error_line(result) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("Error: ")
    assert all(line.startswith("Hint: ") for line in lines[1:]), result.stderr
    return lines[0]


# -- training ----------------------------------------------------------------------------------------
def test_trains_only_the_adapters_and_lowers_the_loss(cli, adapter, tiny_model: Path) -> None:
    out, result = adapter
    layers = adapted_layers(tiny_model)
    assert len(layers) == 8  # 2 blocks × (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    expected = sum(16 * (n_in + n_out) for n_in, n_out in layers.values())  # A is r×in, B is out×r
    assert f"({expected:,} trainable," in result.stderr
    assert "gradient checkpointing" in result.stderr  # on by default with --lora
    rows = metrics(out)
    # The frozen random head of the tiny model keeps its logits small, so the loss falls only so far
    # (5.68 → 5.02 here); greedy decoding shows what was learned.
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert rows[-1]["val_loss"] < next(r for r in rows if "val_loss" in r)["val_loss"]
    greedy = ("generate", PROMPT, "--greedy", "-n", "8", "--no-stream")
    assert cli(*greedy, "-m", out).stdout.startswith(" moon. A dog likes the sea")
    assert not cli(*greedy, "-m", tiny_model).stdout.startswith(" moon.")
    # The checkpoint holds the whole model: the base weights in it are the untouched originals.
    newest = max(out.glob("checkpoints/step-*"), key=lambda p: int(p.name.removeprefix("step-")))
    [state] = newest.glob("model*.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    saved = load_file(state)
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in saved.items()}
    assert len(base.keys() & frozen.keys()) >= len(base) - 1  # the tied head may be stored either way
    for name in base.keys() & frozen.keys():
        assert torch.equal(frozen[name], base[name]), name
    assert sum("lora_" in k for k in saved) == 2 * len(layers)
    assert all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # B starts at zero: it trained


def test_out_is_an_adapter_directory(adapter, tiny_model: Path) -> None:
    out, result = adapter
    assert result.stdout == f"{out}\n"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "llmkit.json",
        "README.md",
    ):
        assert (out / name).is_file(), name
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert not list(out.glob(".llmkit-tmp-*"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model.resolve())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    assert set(config["target_modules"]) == set(TARGETS)
    weights = load_file(out / "adapter_model.safetensors")
    assert len(weights) == 16 and all(".lora_A." in k or ".lora_B." in k for k in weights)
    meta = json.loads((out / "llmkit.json").read_text())
    assert meta["config"]["lora"] is True and meta["config"]["lora_targets"] == "c_attn,c_proj,c_fc"
    assert meta["adapter_parameters"] == sum(t.numel() for t in weights.values())
    assert meta["parameters"] == sum(t.numel() for t in load_file(tiny_model / "model.safetensors").values())
    assert "peft" in meta["versions"]
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "A LoRA adapter for" in card and "r 16, alpha 32" in card
    assert "sample at step 30:" in result.stderr  # sampling mid-run works on the adapted model


def test_peft_loader_gives_the_logits_llmkit_gives(adapter, tiny_model: Path) -> None:
    from llmkit.config import LoadConfig
    from llmkit.models import load

    out, _ = adapter
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = logits(peft_model(base, out), out)
    ours = logits(load(LoadConfig(model=str(out), device="cpu")).model, out)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)  # merged at load: rounding apart
    untouched = logits(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), out)
    assert (untouched - plain).abs().max() > 1e-2  # the adapter does change the model


def test_conv1d_layers_get_the_update_the_right_way_round(adapter, tiny_model: Path) -> None:
    # GPT-2's Conv1D computes x @ W + b with W (in, out); LoRA's update is scaling · B·A with A (r, in)
    # and B (out, r). A transposed update would still fit the square attn.c_proj, silently wrongly.
    from llmkit.config import LoadConfig
    from llmkit.models import load

    out, _ = adapter
    scaling = 32 / 16
    adapter_weights = load_file(out / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    merged = dict(load(LoadConfig(model=str(out), device="cpu")).model.named_modules())
    adapted = peft_model(tiny_model, out)
    x = torch.randn(3, 5, base.config.n_embd * 4, generator=torch.Generator().manual_seed(0))
    for name, layer in base.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        a = adapter_weights[f"base_model.model.{name}.lora_A.weight"]
        b = adapter_weights[f"base_model.model.{name}.lora_B.weight"]
        by_hand = layer.weight + scaling * (b @ a).T
        torch.testing.assert_close(merged[name].weight, by_hand, rtol=0, atol=1e-6)
        inputs = x[..., : layer.weight.shape[0]]
        with torch.no_grad():
            expected = inputs @ layer.weight + layer.bias + scaling * (inputs @ a.T @ b.T)
            got = adapted.get_submodule(f"base_model.model.{name}")(inputs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_merge_writes_a_full_model_with_the_adapters_logits(adapter, merged: Path, tiny_model: Path) -> None:
    out, _ = adapter
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    text = PATTERN * 2
    torch.testing.assert_close(
        logits(plain, merged, text), logits(peft_model(tiny_model, out), out, text), rtol=0, atol=1e-5
    )
    assert "library_name: transformers" in (merged / "README.md").read_text()


# -- adapters as -m ----------------------------------------------------------------------------------
def test_generate_and_perplexity_take_an_adapter(cli, adapter, tiny_model: Path, tmp_path: Path) -> None:
    out, _ = adapter
    result = cli(
        "generate", "-m", out, PROMPT, "--greedy", "-n", "10", "--min-new-tokens", "10", "--no-stream"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # nothing from PEFT
    model, tok = peft_model(tiny_model, out), AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(
            **ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id
        )
    assert result.stdout == tok.decode(plain[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) + "\n"
    text = tmp_path / "text.txt"
    text.write_text(PATTERN * 2)
    scored = cli("perplexity", "-m", out, text, "--format", "json")
    assert scored.exit_code == 0, scored.stderr
    ids = tok(PATTERN * 2, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nll = float(model(input_ids=ids, labels=ids).loss)
    assert json.loads(scored.stdout)["nll"] == pytest.approx(nll, rel=1e-5)


def test_serve_takes_an_adapter(adapter, tiny_model: Path) -> None:
    from serving import Server

    out, _ = adapter
    model, tok = peft_model(tiny_model, out), AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(
            **ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id
        )
    server = Server("-m", out)
    try:
        status, body = server.post(
            "/v1/completions",
            {"model": "m", "prompt": PROMPT, "max_tokens": 8, "min_tokens": 8, "temperature": 0},
        )
        _, models = server.get("/v1/models")
    finally:
        assert server.stop() in (0, 143)
    assert status == 200, body
    assert body["choices"][0]["text"] == tok.decode(plain[0, ids["input_ids"].shape[1] :])
    assert models["data"][0]["id"] == str(out)


def test_info_and_tokenize_take_an_adapter(cli, adapter, tiny_model: Path) -> None:
    out, _ = adapter
    result = cli("info", "-m", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    details = json.loads(result.stdout)
    weights = load_file(out / "adapter_model.safetensors")
    assert details["adapter"] == "LoRA" and details["base_model"] == str(tiny_model.resolve())
    assert (details["lora_r"], details["lora_alpha"]) == (16, 32)
    assert details["lora_targets"] == "c_attn, c_fc, c_proj"
    assert details["adapter_parameters"] == sum(t.numel() for t in weights.values())
    base = json.loads(cli("info", "-m", tiny_model, "--format", "json").stdout)
    assert details["parameters"] == base["parameters"] and details["layers"] == 2
    assert details["path"] == str(out) and details["base_path"] == str(tiny_model.resolve())
    assert "adapter" not in base
    text = cli("info", "-m", out).stdout
    assert "adapter parameters" in text and "lora r" in text and "base model" in text
    count = cli("tokenize", "-m", out, "--count", PATTERN)
    assert count.exit_code == 0, count.stderr
    assert count.stdout == cli("tokenize", "-m", tiny_model, "--count", PATTERN).stdout


def test_finetune_starts_from_an_adapter(cli, adapter, pattern_corpus: Path, tmp_path: Path) -> None:
    out, _ = adapter
    adapter_val = metrics(out)[-1]["val_loss"]
    # A step too small to move anything: validation measures the starting point, base + adapter.
    full = tmp_path / "full"
    result = train(cli, pattern_corpus, out, full, "--max-steps", "1", "--lr", "1e-12")
    assert result.exit_code == 0, result.stderr
    assert metrics(full)[-1]["val_loss"] == pytest.approx(adapter_val, rel=1e-4)
    assert (full / "config.json").is_file()
    # An adapter on an adapter: its base is the first adapter, which resolves to its own base again.
    stacked = tmp_path / "stacked"
    result = train(cli, pattern_corpus, out, stacked, "--lora", "--max-steps", "1", "--lr", "1e-12")
    assert result.exit_code == 0, result.stderr
    assert metrics(stacked)[-1]["val_loss"] == pytest.approx(adapter_val, rel=1e-4)
    config = json.loads((stacked / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out)
    generated = cli("generate", "-m", stacked, PROMPT, "--greedy", "-n", "6", "--no-stream")
    assert generated.exit_code == 0, generated.stderr
    assert generated.stdout == cli("generate", "-m", out, PROMPT, "--greedy", "-n", "6", "--no-stream").stdout


def test_adapter_names_a_hub_base_by_its_id(
    cli, pattern_corpus: Path, tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    from test_models import hub_cache

    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    hub_cache(hf_home, "someone/tiny-gpt2", tiny_model)
    out = tmp_path / "hub-lora"
    result = train(
        cli, pattern_corpus, Path("someone/tiny-gpt2"), out, "--lora", "--max-steps", "2", "--lr", "3e-3"
    )
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someone/tiny-gpt2"  # not the snapshot folder
    details = json.loads(cli("info", "-m", out, "--format", "json", "--offline").stdout)
    assert details["base_model"] == "someone/tiny-gpt2" and "snapshots" in details["base_path"]


@pytest.mark.skipif(
    not (BUILTIN_DIR / "tiny-shakespeare" / "config.json").is_file(),
    reason="the built-in model is not built",
)
def test_adapter_names_a_builtin_base_by_its_name(cli, pattern_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "builtin-lora"
    result = train(cli, pattern_corpus, Path("tiny-shakespeare"), out, "--lora", "--max-steps", "2")
    assert result.exit_code == 0, result.stderr
    assert (
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-shakespeare"
    )
    generated = cli("generate", "-m", out, "ROMEO:", "--greedy", "-n", "5", "--no-stream")
    assert generated.exit_code == 0, generated.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"base_model_name_or_path": "/nowhere/base"}, "is a LoRA adapter for /nowhere/base: "),
        ({"base_model_name_or_path": None}, "names no base model"),
        ({"peft_type": "PREFIX_TUNING"}, "LoRA adapters only"),
    ],
)
def test_broken_adapter_directories(cli, adapter, tmp_path: Path, edit: dict, message: str) -> None:
    out, _ = adapter
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    result = cli("generate", "-m", broken, PROMPT, "-n", "3")
    assert result.exit_code == 1
    assert message in error_line(result)


def test_adapter_without_weights(cli, adapter, tmp_path: Path) -> None:
    out, _ = adapter
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "adapter_model.safetensors").unlink()
    result = cli("info", "-m", bare)
    assert result.exit_code == 1 and "has no adapter weights" in error_line(result)


# -- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-r", "8"], "--lora-r needs --lora"),
        (["--lora-dropout", "0"], "--lora-dropout needs --lora"),
        (["--merge"], "--merge needs --lora"),
        (["--lora", "--from-scratch"], "--lora cannot be combined with --from-scratch"),
        (["--lora", "--lora-r", "0"], "--lora-r must be at least 1"),
        (["--lora", "--lora-alpha", "0"], "--lora-alpha must be positive"),
        (["--lora", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        (["--lora", "--lora-targets", " , "], "--lora-targets names no layer"),
        (["--lora", "--lora-targets", "c_attn,q_proj"], "no linear layer named 'q_proj'"),
        (["--lora", "--lora-targets", "ln_1"], "no linear layer named 'ln_1'"),
        (["--lora", "--lora-targets", "lm_head"], "shares its weight with the input embeddings"),
    ],
)
def test_bad_lora_options_exit_2(
    cli, pattern_corpus: Path, tiny_model: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    result = train(cli, pattern_corpus, tiny_model, tmp_path / "out", "--max-steps", "1", *flags)
    assert result.exit_code == 2, result.stderr
    assert message in error_line(result)
    assert result.stderr.count("Error:") == 1
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_lora_defaults_are_resolved_into_the_config() -> None:
    from llmkit.config import TrainConfig

    cfg = TrainConfig(data=["x"], output="out", lora=True, lora_targets=" c_attn , attn.c_proj,")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32.0, 0.05)
    assert cfg.lora_targets == "c_attn,attn.c_proj"  # one spelling, so a resume compares equal
    assert cfg.peak_lr == 2e-4
    assert TrainConfig(data=["x"], output="out", lora=True, lora_r=4).lora_alpha == 8.0
    plain = TrainConfig(data=["x"], output="out")
    assert (plain.lora_r, plain.lora_targets, plain.peak_lr) == (None, None, 5e-5)
    # LoRA is picked to save memory: gradient checkpointing is on unless told otherwise.
    assert cfg.gradient_checkpointing is True and plain.gradient_checkpointing is False
    assert (
        TrainConfig(data=["x"], output="out", lora=True, gradient_checkpointing=False).gradient_checkpointing
        is False
    )


def test_gradient_checkpointing_trains_the_adapters_the_same(
    cli, pattern_corpus: Path, tiny_model_nodrop: Path, tmp_path: Path
) -> None:
    # If checkpointed blocks passed no gradient back (reentrant checkpointing behind frozen embeddings),
    # the adapters would stay where they started: B at zero.
    common = ["--lora", "--lora-dropout", "0", "--max-steps", "6", "--lr", "3e-3"]
    for name, extra in (("plain", ["--no-gradient-checkpointing"]), ("checkpointed", [])):
        result = train(cli, pattern_corpus, tiny_model_nodrop, tmp_path / name, *common, *extra)
        assert result.exit_code == 0, result.stderr
    checkpointed = assert_same_weights(tmp_path / "plain", tmp_path / "checkpointed", ADAPTER)
    assert all(t.abs().max() > 0 for k, t in checkpointed.items() if "lora_B" in k)


def test_help_does_not_import_peft() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['llmkit', 'finetune', '--help']\n"
        "from llmkit.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('HEAVY', sorted(m for m in ('peft', 'torch', 'transformers') if m in sys.modules), code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY [] 0" in result.stdout, result.stdout + result.stderr
    assert "--lora-targets" in result.stdout


# -- resume ------------------------------------------------------------------------------------------
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmkit", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "LLMKIT_CPU_BF16": "0", **ONE_THREAD, **env},
        timeout=240,
    )


def test_resume_is_bit_exact(tiny_model: Path, pattern_corpus: Path, tmp_path: Path) -> None:
    common = ["--lora", "--block-size", "32", "--batch-size", "4", "--max-steps", "20", "--log-every", "1"]
    common += ["--save-every", "5", "--lr", "3e-3", "--cache-dir", str(tmp_path / "cache")]

    def args(out: Path, *extra: str) -> list[str]:
        return ["finetune", str(pattern_corpus), "-o", str(out), "-m", str(tiny_model), *common, *extra]

    ref, out = tmp_path / "ref", tmp_path / "run"
    done = run(args(ref))
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr  # nothing from PEFT or transformers on the user's terminal
    generated = run(["generate", "-m", str(ref), PROMPT, "-n", "3", "--seed", "1"])
    assert generated.returncode == 0 and generated.stderr == "", generated.stderr
    killed = run(args(out), LLMKIT_FAULT="checkpoint-write@15")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    refused = run([*args(out, "--lora-r", "8"), "--resume"])
    assert refused.returncode == 2, refused.stderr
    assert "cannot resume" in refused.stderr and "lora-r: 16 → 8" in refused.stderr
    resumed = run([*args(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 10/20" in resumed.stderr
    left, right = load_file(ref / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(ref)]


@pytest.mark.slow
def test_two_processes_train_the_adapters_like_one(
    cli, pattern_corpus: Path, tiny_model_nodrop: Path, tmp_path: Path
) -> None:
    common = ["--lora", "--lora-dropout", "0", "--max-steps", "4", "--lr", "3e-3", "--block-size", "32"]
    one, two = tmp_path / "one", tmp_path / "two"
    result = train(cli, pattern_corpus, tiny_model_nodrop, one, *common[:-2], "--batch-size", "4")
    assert result.exit_code == 0, result.stderr
    done = run_torchrun(
        "finetune", pattern_corpus, "-o", two, "-m", tiny_model_nodrop, *common, "--batch-size", "2",
        "--cache-dir", tmp_path / "cache2", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_weights(one, two, ADAPTER)
    model = peft_model(tiny_model_nodrop, two)  # PEFT's own loader takes the 2-process adapter
    assert torch.isfinite(logits(model, tiny_model_nodrop)).all()


def test_bf16_autocast_trains_fp32_adapters(
    cli, pattern_corpus: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bf16"
    result = train(cli, pattern_corpus, tiny_model, out, "--lora", "--mixed-precision", "bf16", *TRAIN[2:])
    assert result.exit_code == 0, result.stderr
    assert "precision bf16" in result.stderr
    saved = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # the master weights stay fp32
    rows = [r for r in metrics(out) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3


@pytest.mark.slow
def test_compile_trains_the_adapters_the_same(
    cli, pattern_corpus: Path, tiny_model_nodrop: Path, tmp_path: Path
) -> None:
    common = ["--lora", "--lora-dropout", "0", "--max-steps", "3", "--lr", "3e-3"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = train(cli, pattern_corpus, tiny_model_nodrop, tmp_path / name, *common, *extra)
        assert result.exit_code == 0, result.stderr
    assert_same_weights(tmp_path / "eager", tmp_path / "compiled", ADAPTER, rtol=1e-4, atol=1e-5)
