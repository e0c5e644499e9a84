"""LoRA by architecture: with no --lora-targets, the layers PEFT adapts for the model type (all-linear for
a type PEFT doesn't list), on tiny local Llama, Qwen2 and Phi-3 models; PEFT's own loader agrees."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import finetune_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkit.testing import build_tiny_family

PROMPT = "The cat sees the"
TRAIN = ["--max-steps", "4", "--lr", "3e-3", "--log-every", "2", "--val-split", "0"]
# What PEFT 0.21 adapts per type (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING); Phi-3 isn't listed.
EXPECTED = {
    "llama": ({"q_proj", "v_proj"}, "q_proj, v_proj (PEFT's default for llama)"),
    "qwen2": ({"q_proj", "v_proj"}, "q_proj, v_proj (PEFT's default for qwen2)"),
    "phi3": (
        {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
        "o_proj, qkv_proj, gate_up_proj, down_proj (all-linear: PEFT has no default for phi3)",
    ),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def family(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, build_tiny_family(
        tmp_path_factory.mktemp("families") / request.param, request.param
    )


def peft_model(base: Path, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():  # PEFT asks transformers 5 a deprecated question; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def test_default_targets_train_and_peft_loads_the_adapter_alike(
    cli, family, pattern_corpus: Path, tmp_path: Path
) -> None:
    from llmkit.config import LoadConfig
    from llmkit.models import load

    name, base = family
    out = tmp_path / "adapter"
    result = cli(*finetune_args(pattern_corpus, out, base, "--lora", *TRAIN))
    assert result.exit_code == 0, result.stderr
    layers, words = EXPECTED[name]
    assert f"; LoRA on {words}" in " ".join(result.stderr.split())  # the plan line says what was chosen
    assert set(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == layers
    saved = json.loads((out / "llmkit.json").read_text())["config"]["lora_targets"]
    assert set(saved.split(",")) == layers  # the saved config says what ran

    plain = peft_model(base, out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ours = load(LoadConfig(model=str(out), device="cpu")).model
    with torch.no_grad():
        expected_logits = plain(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected_logits, rtol=0, atol=1e-5)
        untouched = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
        greedy = plain.generate(
            input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id
        )
    assert (untouched - expected_logits).abs().max() > 1e-3  # the adapter changes the model
    generated = cli(
        "generate", "-m", out, PROMPT, "--greedy", "-n", "8", "--min-new-tokens", "8", "--no-stream"
    )
    assert generated.exit_code == 0, generated.stderr
    assert generated.stdout == tok.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True) + "\n"

    # perplexity and info take the adapter directory as -m like a model.
    text = tmp_path / "t.txt"
    text.write_text(PROMPT + " moon. A dog likes the sea.")
    scored = tok(text.read_text(), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = plain(input_ids=scored).logits[0, :-1]
    nll = float(torch.nn.functional.cross_entropy(logits, scored[0, 1:]))
    ppl = cli("perplexity", "-m", out, text, "--format", "json")
    assert ppl.exit_code == 0, ppl.stderr
    assert json.loads(ppl.stdout)["nll"] == pytest.approx(nll, rel=1e-5)
    info = cli("info", "-m", out, "--format", "json")
    assert info.exit_code == 0, info.stderr
    facts = json.loads(info.stdout)
    assert (facts["adapter"], facts["model_type"], facts["base_path"]) == ("LoRA", name, str(base))
    assert set(facts["lora_targets"].split(", ")) == layers
    assert facts["adapter_parameters"] == sum(p.numel() for n, p in plain.named_parameters() if "lora_" in n)


def test_all_linear_adapts_every_block_layer_but_the_head(
    cli, tiny_model: Path, pattern_corpus: Path, tmp_path
):
    out = tmp_path / "adapter"
    result = cli(
        *finetune_args(pattern_corpus, out, tiny_model, "--lora", "--lora-targets", "all-linear", *TRAIN)
    )
    assert result.exit_code == 0, result.stderr
    assert "LoRA on c_attn, c_proj, c_fc (all-linear)" in " ".join(result.stderr.split())
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"} and config["fan_in_fan_out"] is True
    default = cli(*finetune_args(pattern_corpus, tmp_path / "default", tiny_model, "--lora", *TRAIN))
    assert "LoRA on c_attn, c_proj, c_fc (GPT-2's attention and MLP)" in " ".join(default.stderr.split())
    mixed = cli(
        *finetune_args(
            pattern_corpus, tmp_path / "mixed", tiny_model, "--lora", "--lora-targets", "all-linear,c_fc"
        )
    )
    assert mixed.exit_code == 2 and "all-linear stands alone" in mixed.stderr
