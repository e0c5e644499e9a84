"""`llmkit export` checked by llama.cpp itself, and `-m FILE.gguf` checked against the model it came from.

llama.cpp is node-llama-cpp's prebuilt CPU build (3.21.1, installed into .node/ by `make test`),
driven by tests/llama_cpp_probe.mjs. Both sides compute in float32: transformers with --dtype float32,
llama.cpp on f32 weights with a float32 KV cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.testing import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "llama_cpp_probe.mjs"
NODE_LLAMA_CPP = ROOT / ".node" / "node_modules" / "node-llama-cpp" / "dist" / "index.js"
BUILTIN = "tiny-shakespeare"

# Held out from the built-in model: tinyshakespeare is drawn from the plays, not the sonnets. Each is
# scored on its own, within the built-in model's context of 256 tokens.
SONNETS = [
    """\
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
""",
    """\
Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.
""",
]
AWKWARD = [
    "The cat sees the moon.",
    "  two leading spaces, and   three inside  ",
    "lines\n\nand a blank one\n",
    "tabs\tand\r\nCRLF",
    "Ünïcödé — café, naïve, 日本語 ✓ 🙂",
    "don't I'll we've 1234 3.14",
    "<|endoftext|>",
    "The cat.<|endoftext|>A dog.",
]


def _invoke(*args: str):
    from llmkit.cli import _output
    from llmkit.cli.app import app

    _output.settings.__init__()
    return CliRunner().invoke(app, [str(a) for a in args])


def _export(model: str | Path, out: Path, type: str, *extra: str) -> Path:
    result = _invoke("export", model, "-o", out, "--type", type, *extra)
    assert result.exit_code == 0, result.output
    return out


def probe(gguf: Path, **request) -> dict:
    """Ask llama.cpp (see tests/llama_cpp_probe.mjs for the request's keys)."""
    node = shutil.which("node")
    if node is None or not NODE_LLAMA_CPP.is_file():
        pytest.skip("node-llama-cpp is not installed: `make node` (part of `make test`) installs it")
    env = {**os.environ, "NODE_LLAMA_CPP": NODE_LLAMA_CPP.as_uri()}
    done = subprocess.run(
        [node, str(PROBE)],
        input=json.dumps({"model": str(gguf), **request}),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _hf(model: str | Path):
    """transformers' model (an adapter merged into its base, as llmkit loads it) in float32, on the CPU."""
    from llmkit.config import LoadConfig
    from llmkit.models import load

    lm = load(LoadConfig(model=str(model), device="cpu", dtype="float32"))
    return lm.model, lm.tokenizer


def _logprobs(hf, ids: list[int]):
    import torch

    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def _tensor_types(gguf: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    """The tiny model (64 wide: every matrix splits into 32-blocks) and the built-in one, exported."""
    out = tmp_path_factory.mktemp("gguf")
    files = {"tiny-f32": _export(tiny_model, out / "tiny-f32.gguf", "f32")}
    for type in ("f32", "q8_0", "q4_0"):
        files[f"builtin-{type}"] = _export(BUILTIN, out / f"builtin-{type}.gguf", type)
    return files


def test_f32_matches_transformers(exports: dict[str, Path], tiny_model: Path) -> None:
    hf, tokenizer = _hf(tiny_model)
    prompt = tokenizer("The old king finds a quiet song. The queen")["input_ids"]
    answer = probe(exports["tiny-f32"], tokenize=AWKWARD, next=prompt, greedy={"prompt": prompt, "n": 20})

    assert answer["vocab"] == len(tokenizer) and answer["context"] == hf.config.n_positions
    for text, ids in zip(AWKWARD, answer["tokenize"], strict=True):
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text
    import torch

    want = _logprobs(hf, prompt)[-1]
    got = torch.tensor(answer["next"])
    assert (got - want).abs().max().item() < 1e-3  # measured: 6e-5
    greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert answer["greedy"] == greedy[0, len(prompt) :].tolist()


def test_lora_adapter_is_merged(tiny_model: Path, tmp_path: Path, cli) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The queen sings to the moon. " * 200)
    adapter = tmp_path / "lora"
    trained = cli(
        "finetune", corpus, "-o", adapter, "-m", tiny_model, "--lora", "--max-steps", "8",
        "--block-size", "32", "--lr", "1e-2", "--no-cache",
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    out = _export(adapter, tmp_path / "lora.gguf", "f32")
    merged, tokenizer = _hf(adapter)
    prompt = tokenizer("The queen sings to the")["input_ids"]
    import torch

    got = torch.tensor(probe(out, next=prompt)["next"])
    assert (got - _logprobs(merged, prompt)[-1]).abs().max().item() < 1e-3
    base, _ = _hf(tiny_model)
    assert (got - _logprobs(base, prompt)[-1]).abs().max().item() > 0.1  # the adapter is in the file


def test_quantized_perplexity_near_f32(exports: dict[str, Path]) -> None:
    """q8_0 within 1% and q4_0 within 5% of f32's perplexity on held-out verse (the built-in model)."""
    _, tokenizer = _hf(BUILTIN)
    sequences = [tokenizer(sonnet)["input_ids"] for sonnet in SONNETS]
    perplexity = {}
    for type in ("f32", "q8_0", "q4_0"):
        scores = [s for scored in probe(exports[f"builtin-{type}"], score=sequences)["score"] for s in scored]
        perplexity[type] = math.exp(-sum(scores) / len(scores))
    # Measured: f32 69.02 (transformers: 69.02), q8_0 +0.09%, q4_0 +1.1%.
    assert perplexity["q8_0"] / perplexity["f32"] == pytest.approx(1, abs=0.01), perplexity
    assert perplexity["q4_0"] / perplexity["f32"] == pytest.approx(1, abs=0.05), perplexity
    assert perplexity["q4_0"] != perplexity["f32"]  # quantized for real
    types = _tensor_types(exports["builtin-q4_0"])
    assert types["blk.0.attn_qkv.weight"] == "Q4_0" and types["token_embd.weight"] == "Q4_0"
    assert types["output.weight"] == "Q8_0"  # llama-quantize keeps the output above 4 bits
    assert types["position_embd.weight"] == types["blk.0.attn_norm.weight"] == "F32"
    sizes = [exports[f"builtin-{t}"].stat().st_size for t in ("f32", "q8_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)


def test_builtin_greedy_text_matches_generate(exports: dict[str, Path], cli) -> None:
    _, tokenizer = _hf(BUILTIN)
    prompt = "ROMEO:"
    ids = tokenizer(prompt)["input_ids"]
    answer = probe(exports["builtin-f32"], greedy={"prompt": ids, "n": 40})
    result = cli("generate", "-m", BUILTIN, "--greedy", "--dtype", "float32", "-n", "40", prompt)
    assert result.exit_code == 0, result.output
    # generate writes the continuation (then a newline); it stops early only at end of text
    assert tokenizer.decode(answer["greedy"]).rstrip("\n") == result.stdout.rstrip("\n")


def test_gguf_as_model_round_trip(
    exports: dict[str, Path], tiny_model: Path, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "valid.txt"
    text.write_text("The cat sees the moon. A dog follows the sea.\nMy friend remembers a red apple.\n")
    scores = {}
    for model in (tiny_model, exports["tiny-f32"]):
        result = cli("perplexity", "-m", model, text, "--dtype", "float32", "--format", "json")
        assert result.exit_code == 0, result.output
        scores[model] = json.loads(result.stdout)
    assert scores[exports["tiny-f32"]] == scores[tiny_model]
    tokens = cli("tokenize", "-m", exports["tiny-f32"], AWKWARD[4])
    assert tokens.stdout == cli("tokenize", "-m", tiny_model, AWKWARD[4]).stdout


def test_gguf_context_restored(exports: dict[str, Path], cli, tmp_path: Path, monkeypatch) -> None:
    """transformers maps the context to a key GPT2Config ignores (1024 positions): llmkit keeps 256."""
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    result = cli("info", "-m", exports["builtin-q8_0"], "--format", "json")
    assert result.exit_code == 0, result.output
    details = json.loads(result.stdout)
    assert details["context"] == 256 and details["source"] == "GGUF file"
    config = json.loads((Path(details["path"]) / "config.json").read_text())
    assert config["n_positions"] == 256 and config["n_inner"] is None and config["tie_word_embeddings"]
    assert "n_ctx" not in config and "feed_forward_length" not in config
    missing = cli("info", "-m", tmp_path / "missing.gguf")
    assert missing.exit_code == 1 and "no such GGUF file" in missing.stderr


def test_fallback_to_f16_where_blocks_dont_fit(tmp_path: Path, cli) -> None:
    """48 wide: rows of 48 don't split into 32-blocks (F16, as llama.cpp's converter does); 192 do."""
    model = build_tiny_model(tmp_path / "tiny48", n_embd=48, n_positions=64)
    out = tmp_path / "tiny48.gguf"
    result = cli("export", model, "-o", out, "--type", "q8_0")
    assert result.exit_code == 0, result.output
    assert "8 tensors in f16 where q8_0 blocks don't fit their rows" in result.stderr
    types = _tensor_types(out)
    assert types["blk.0.attn_qkv.weight"] == types["token_embd.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 4 x 48
    hf, tokenizer = _hf(model)
    prompt = tokenizer("The cat sees")["input_ids"]
    import torch

    got = torch.tensor(probe(out, next=prompt)["next"])
    assert (got - _logprobs(hf, prompt)[-1]).abs().max().item() < 0.05


def test_ollama_modelfile_and_chat_template(tiny_model: Path, tmp_path: Path, cli) -> None:
    from gguf import GGUFReader

    model = tmp_path / "chat-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    out = tmp_path / "out" / "chat.gguf"
    out.parent.mkdir()
    result = cli("export", model, "-o", out, "--type", "f16", "--ollama")
    assert result.exit_code == 0, result.output
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./chat.gguf\n")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "PARAMETER num_ctx 128" in modelfile
    fields = GGUFReader(out).fields
    assert fields["tokenizer.chat_template"].contents() == template
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "chat.gguf"]


def test_failed_write_leaves_no_file(tiny_model: Path, tmp_path: Path, cli, monkeypatch) -> None:
    """A partial file never has the final name, and doesn't linger under its temporary one."""
    import gguf

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    result = cli("export", tiny_model, "-o", out, "--type", "f32")
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert list(out.parent.iterdir()) == []
    missing = cli("export", tiny_model, "-o", tmp_path / "nowhere" / "x.gguf")
    assert missing.exit_code == 1 and "no such directory" in missing.stderr
    bad_type = cli("export", tiny_model, "-o", out, "--type", "q5_k")
    assert bad_type.exit_code == 2 and "unknown --type 'q5_k'" in bad_type.stderr
