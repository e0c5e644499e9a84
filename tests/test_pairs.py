"""Prompt/completion records: the mode rule, packing, the loss on completions only, refusals, resume."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, finetune_args, meta
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkit.data import prepare
from llmkit.data.packing import IGNORE, pack


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sums(pairs) -> list[dict]:
    return [{"prompt": f"Q: {a}+{b}=", "completion": f" {a + b}"} for a, b in pairs]


ALL_SUMS = [(a, b) for a in range(10) for b in range(10)]
HELD_OUT = random.Random(0).sample(ALL_SUMS, 10)


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "qa.jsonl", sums(ALL_SUMS))


def finetune(cli, data: Path | list[Path], out: Path, model: Path, *flags: str):
    return cli(
        *finetune_args(data, out, model, "--batch-size", "4", "--max-steps", "4", "--lr", "1e-3", *flags)
    )


def test_learns_completions_and_answers_held_out_prompts(cli, tiny_model: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sums(p for p in ALL_SUMS if p not in HELD_OUT))
    out = tmp_path / "adder"
    result = cli(
        "finetune", train, "-o", out, "-m", tiny_model, "--block-size", "64", "--batch-size", "8",
        # 150 steps got 8/10 on a Xeon with AMX and 10/10 on an EPYC: training's arithmetic differs
        # by CPU, so train to where both (and seed 1) get 10/10, leaving the 9/10 bar slack.
        "--max-steps", "250", "--lr", "4e-3", "--warmup-steps", "10", "--dropout", "0",
        "--val-split", "0", "--no-cache", "--save-every", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "90 prompt/completion records" in result.stderr and "padding" in result.stderr
    prompts = write_jsonl(tmp_path / "held-out.jsonl", [{"prompt": r["prompt"]} for r in sums(HELD_OUT)])
    answers = cli(
        "generate", "-m", out, "-i", prompts, "-b", "1", "--max-new-tokens", "3", "--temperature", "0"
    )
    assert answers.exit_code == 0, answers.stderr
    expected = [r["completion"] for r in sums(HELD_OUT)]
    right = sum(got == want for got, want in zip(answers.stdout.splitlines(), expected, strict=True))
    assert right >= 9, f"{right}/10 held-out sums right"


def test_labels_ignore_prompts_and_padding(qa: Path, tiny_model: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = prepare([str(qa)], tokenizer, block_size=32, val_split=0, cache_dir=tmp_path)
    ids, labels, positions = data.train.arrays(range(len(data.train)))
    eos = tokenizer.eos_token_id
    for row in range(len(ids)):
        starts = [*np.flatnonzero(positions[row] == 0).tolist(), 32]  # each record's positions start at 0
        for start, end in itertools.pairwise(starts):
            text = tokenizer.decode(ids[row, start:end])
            if not text.startswith("Q: "):
                assert (labels[row, start:] == IGNORE).all() and end == 32  # the padding, at the end
                continue
            prompt = start + len(tokenizer(text.split("=")[0] + "=")["input_ids"])
            assert (labels[row, start:prompt] == IGNORE).all()
            assert (labels[row, prompt:end] == ids[row, prompt:end]).all() and ids[row, end - 1] == eos
    learnt = int((labels != IGNORE).sum())
    assert learnt == data.stats()["learnt_tokens"] == data.train.targets(range(len(data.train)))


def test_prompt_tokens_contribute_nothing_to_the_gradient(qa: Path, tiny_model_nodrop: Path, tmp_path: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_nodrop)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_nodrop)
    data = prepare([str(qa)], tokenizer, block_size=32, val_split=0, cache_dir=tmp_path)
    ids, labels, positions = (torch.from_numpy(a) for a in data.train.arrays([0, 1]))
    output = model(input_ids=ids, labels=labels, position_ids=positions, use_cache=False)
    output.logits.retain_grad()
    output.loss.backward()
    grad = output.logits.grad.abs().sum(-1)  # per position: how much its prediction moves the loss
    predicts_prompt = labels[:, 1:] == IGNORE
    assert (grad[:, :-1][predicts_prompt] == 0).all() and (grad[:, -1] == 0).all()
    assert (grad[:, :-1][~predicts_prompt] > 0).all()

    # Each record sees only itself: alone, from position 0, its logits are the same as packed.
    first = int(torch.nonzero(positions[0, 1:] == 0)[0]) + 1  # where the second record starts
    second = ids[0, first:][: int(torch.nonzero(ids[0, first:] == tokenizer.eos_token_id)[0]) + 1]
    with torch.no_grad():
        alone = model(input_ids=second[None]).logits[0]
    torch.testing.assert_close(output.logits[0, first : first + len(second)].detach(), alone)


def test_packing_keeps_records_whole_with_little_padding(qa: Path, tiny_model: Path, tmp_path: Path) -> None:
    lengths = np.array([5, 4, 3, 3, 2, 2, 1, 8, 6])
    members, bounds = pack(lengths, 8)
    blocks = [sorted(members[bounds[b] : bounds[b + 1]].tolist()) for b in range(len(bounds) - 1)]
    assert sorted(r for b in blocks for r in b) == list(range(9))
    assert all(lengths[b].sum() <= 8 for b in blocks)
    assert len(blocks) == math.ceil(lengths.sum() / 8) == 5  # best-fit decreasing: no block wasted here
    assert (pack(lengths, 8)[0] == members).all()  # deterministic

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = prepare([str(qa)], tokenizer, block_size=32, val_split=0.1, cache_dir=tmp_path)
    stats = data.stats()
    assert stats["records"] == stats["documents"] == 100 and stats["skipped_records"] == 0
    assert data.val is not None and len(data.train) + len(data.val) == data.train.packing.blocks
    seen = []
    for blocks in (data.train, data.val):
        for i in range(len(blocks)):
            text = tokenizer.decode(blocks[i])
            seen += [r for r in text.split("<|endoftext|>") if r]  # the padding (id 0) is EOS here
    assert sorted(seen) == sorted(r["prompt"] + r["completion"] for r in sums(ALL_SUMS))
    real = sum(len(tokenizer(r["prompt"])["input_ids"] + tokenizer(r["completion"])["input_ids"]) + 1
               for r in sums(ALL_SUMS))  # fmt: skip
    blocks = data.train.packing.blocks
    assert stats["padding"] == pytest.approx(1 - real / (blocks * 32), abs=1e-6)
    assert stats["padding"] < 0.2


def test_mode_rule_and_cache_keys(tmp_path: Path, tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    both = write_jsonl(
        tmp_path / "both.jsonl", [{"text": "The cat.", "prompt": "Q:", "completion": " A"}] * 3
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q:", "completion": " A"}] * 3)

    def run(path: Path, **options):
        return prepare([str(path)], tokenizer, block_size=8, val_split=0, cache_dir=tmp_path, **options)

    detected, text = run(pairs), run(both)
    assert detected.pairs is not None and text.pairs is None  # a "text" field wins when not told
    chosen = run(both, prompt_field="prompt")  # naming a field chooses pairs
    assert chosen.pairs is not None and chosen.stats()["completion_field"] == "completion"
    assert len({detected.fingerprint, text.fingerprint, chosen.fingerprint}) == 3  # no cache collision


def test_mixing_text_and_pairs_is_refused(cli, qa: Path, tiny_model: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("The cat sees the moon.\n" * 20)
    result = finetune(cli, [notes, qa], tmp_path / "out", tiny_model)
    assert result.exit_code == 1
    assert "notes.txt is not JSONL" in result.stderr and "can't be mixed" in result.stderr


def test_long_record_is_refused_or_skipped(cli, tiny_model: Path, tmp_path: Path) -> None:
    records = sums(ALL_SUMS[:40])
    records.insert(6, {"prompt": "Q: " + "the cat sees the moon " * 10 + "=", "completion": " 5"})
    data = write_jsonl(tmp_path / "long.jsonl", records)
    refused = finetune(cli, data, tmp_path / "refused", tiny_model)
    assert refused.exit_code == 1
    error = refused.stderr
    assert "long.jsonl:7: the record has" in error and "more than a block of 32" in error
    assert "--block-size" in error and "--long-records skip" in error
    skipped = finetune(cli, data, tmp_path / "skipped", tiny_model, "--long-records", "skip")
    assert skipped.exit_code == 0, skipped.stderr
    assert "1 record(s) longer than a block of 32 were skipped" in skipped.stderr
    stats = meta(tmp_path / "skipped")["data"]
    assert stats["records"] == 40 and stats["skipped_records"] == 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Q: 1+1="}, 'bad.jsonl:3: no "completion" field'),
        ({"prompt": "Q: 1+1=", "completion": 2}, 'bad.jsonl:3: "completion" is int, not a string'),
        ({"prompt": "", "completion": " 2"}, 'bad.jsonl:3: "prompt" is empty'),
    ],
)
def test_bad_records_name_file_and_line(cli, tiny_model: Path, tmp_path: Path, record, message) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [*sums([(1, 2), (3, 4)]), record])
    result = finetune(cli, data, tmp_path / "out", tiny_model, "--prompt-field", "prompt")
    assert result.exit_code == 1
    assert message in result.stderr and result.stderr.startswith("Error:")


def test_val_loss_is_over_completion_tokens(cli, qa: Path, tiny_model_nodrop: Path, tmp_path: Path) -> None:
    val = write_jsonl(tmp_path / "val.jsonl", sums(HELD_OUT))
    out = tmp_path / "out"
    result = finetune(cli, qa, out, tiny_model_nodrop, "--val-file", val)
    assert result.exit_code == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    total, count = 0.0, 0
    with torch.no_grad():
        for record in sums(HELD_OUT):  # each record alone; only its completion and EOS are scored
            prompt = tokenizer(record["prompt"])["input_ids"]
            target = tokenizer(record["completion"])["input_ids"] + [tokenizer.eos_token_id]
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum"))
            count += len(target)
    assert meta(out)["metrics"]["val_loss"] == pytest.approx(total / count, rel=1e-5)


def test_accumulation_weighs_every_completion_token_alike(cli, qa: Path, tiny_model_nodrop: Path, tmp_path):
    one, split = tmp_path / "one", tmp_path / "split"
    assert finetune(cli, qa, one, tiny_model_nodrop, "--batch-size", "4").exit_code == 0
    result = finetune(cli, qa, split, tiny_model_nodrop, "--batch-size", "1", "--grad-accum", "4")
    assert result.exit_code == 0, result.stderr
    assert_same_weights(one, split)
    assert meta(one)["metrics"]["loss"] == pytest.approx(meta(split)["metrics"]["loss"], rel=1e-5)


def test_resume_is_bit_exact(cli, qa: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = ("--max-steps", "8", "--save-every", "4", "--keep", "3")
    assert finetune(cli, qa, out, tiny_model, *flags).exit_code == 0
    whole = load_file(out / "model.safetensors")
    shutil.rmtree(out / "checkpoints" / "step-8")
    result = finetune(cli, qa, out, tiny_model, *flags, "--resume")
    assert result.exit_code == 0, result.stderr
    assert "resuming from" in result.stderr and "at step 4/8" in result.stderr
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


@pytest.mark.slow
def test_two_processes_weigh_every_completion_token_alike(
    cli, qa: Path, tiny_model_nodrop: Path, tmp_path: Path
) -> None:
    from conftest import run_torchrun

    one, two = tmp_path / "one", tmp_path / "two"
    assert finetune(cli, qa, one, tiny_model_nodrop, "--batch-size", "4").exit_code == 0
    flags = ["--block-size", "32", "--batch-size", "2", "--max-steps", "4", "--lr", "1e-3"]
    done = run_torchrun(
        "finetune",
        qa,
        "-o",
        two,
        "-m",
        tiny_model_nodrop,
        *flags,
        "--cache-dir",
        tmp_path / "cache2",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert_same_weights(one, two)
    assert meta(one)["metrics"]["loss"] == pytest.approx(meta(two)["metrics"]["loss"], rel=1e-5)


def test_lora_learns_from_pairs(cli, qa: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    result = finetune(
        cli, qa, out, tiny_model, "--lora", "--max-steps", "6", "--log-every", "1", "--val-split", "0.2"
    )
    assert result.exit_code == 0, result.stderr
    assert (out / "adapter_config.json").is_file()
    assert meta(out)["data"]["records"] == len(ALL_SUMS)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0]
