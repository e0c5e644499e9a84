"""Conversation records (a `messages` list): rendered through the chat template, learnt on the
assistant turns only (their content and end-of-turn marker), packed like prompt/completion records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import finetune_args, meta
from transformers import AutoTokenizer

from llmkit.data import prepare
from llmkit.data.packing import IGNORE
from llmkit.errors import InputError
from llmkit.testing import build_tiny_family

# Zephyr's shape (<|role|> headers, the EOS ending each turn), with the BOS the template puts first
# as Llama 3's does.
ZEPHYR = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# A generation prompt ending in a space: the content's first token carries it.
PLAIN = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
TALK = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "the cat sat"},
    {"role": "assistant", "content": "on the mat"},
    {"role": "user", "content": "and the dog?"},
    {"role": "assistant", "content": "in the house"},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No BOS, ChatML."""
    return build_tiny_family(tmp_path_factory.mktemp("models") / "qwen2", "qwen2")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BOS before text, ChatML."""
    return build_tiny_family(tmp_path_factory.mktemp("models") / "llama", "llama")


def learnt(tokenizer, data) -> tuple[list[list[int]], list[str]]:
    """(each block's ids without padding, each run of learnt ids decoded) over all training blocks."""
    ids, labels, _ = data.train.arrays(range(len(data.train)))
    rows, runs = [], []
    for row_ids, row_labels in zip(ids, labels, strict=True):
        keep = row_labels != IGNORE
        assert (row_labels[keep] == row_ids[keep]).all()
        edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(int), [0]])))
        runs += [
            tokenizer.decode(row_ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)
        ]
        rows.append(row_ids.tolist())
    return rows, runs


def prepared(tokenizer, path: Path, tmp_path: Path, **options):
    options = {"block_size": 128, "val_split": 0.0, "no_cache": True, "cache_dir": tmp_path / "c", **options}
    return prepare([str(path)], tokenizer, **options)


def test_chatml_mask_is_each_assistant_turn_and_its_im_end(qwen: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    data = prepared(tokenizer, write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK}]), tmp_path)
    assert data.pairs is not None and data.pairs["messages_field"] == "messages"
    rows, runs = learnt(tokenizer, data)
    assert runs == ["on the mat<|im_end|>", "in the house<|im_end|>"]
    text = tokenizer.apply_chat_template(TALK, tokenize=False)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert rows[0][: len(whole)] == whole  # the template's text, tokenized once, no BOS added


def test_zephyr_mask_ends_with_eos_and_the_template_bos_is_not_doubled(llama: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama)
    tokenizer.chat_template = ZEPHYR
    data = prepared(tokenizer, write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK}]), tmp_path)
    rows, runs = learnt(tokenizer, data)
    eos = tokenizer.eos_token
    assert runs == [f"on the mat{eos}", f"in the house{eos}"]
    assert rows[0][0] == tokenizer.bos_token_id and rows[0][1] != tokenizer.bos_token_id


def test_bos_added_where_the_tokenizer_uses_one_and_the_template_has_none(
    llama: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama)  # ChatML: no BOS in the template
    data = prepared(tokenizer, write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK}]), tmp_path)
    rows, runs = learnt(tokenizer, data)
    assert rows[0][0] == tokenizer.bos_token_id and rows[0][1] != tokenizer.bos_token_id
    assert runs == ["on the mat<|im_end|>", "in the house<|im_end|>"]


def test_cache_key_has_the_template_and_the_field(qwen: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    path = write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK, "chat": TALK[:3]}])
    cache = {"no_cache": False, "cache_dir": tmp_path / "cache"}
    first = prepared(tokenizer, path, tmp_path, messages_field="messages", **cache)
    again = prepared(tokenizer, path, tmp_path, messages_field="messages", **cache)
    assert again.train.data.cache_hit and again.fingerprint == first.fingerprint
    other_field = prepared(tokenizer, path, tmp_path, messages_field="chat", **cache)
    assert not other_field.train.data.cache_hit and learnt(tokenizer, other_field)[1] == [
        "on the mat<|im_end|>"
    ]
    tokenizer.chat_template = ZEPHYR
    other_template = prepared(tokenizer, path, tmp_path, messages_field="messages", **cache)
    assert not other_template.train.data.cache_hit
    assert learnt(tokenizer, other_template)[1] == [
        f"on the mat{tokenizer.eos_token}",
        f"in the house{tokenizer.eos_token}",
    ]


def test_finetune_trains_on_conversations_and_saves(cli, llama: Path, tmp_path: Path) -> None:
    records = [
        {
            "messages": [
                {"role": "user", "content": f"the cat number {i}"},
                {"role": "assistant", "content": f"sat {i}"},
            ]
        }
        for i in range(24)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "run"
    result = cli(
        *finetune_args(
            data, out, llama, "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--block-size", "64"
        )
    )
    assert result.exit_code == 0, result.stderr
    assert "24 conversation records" in result.stderr
    info = meta(out)["data"]
    assert info["messages_field"] == "messages" and info["records"] == 24
    assert (out / "model.safetensors").exists() or list(out.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "hi"}, 'talk.jsonl:2: no "messages" field'),
        ({"messages": "hi"}, '"messages" must be a non-empty list'),
        ({"messages": [{"role": "robot", "content": "x"}]}, "message 1 has role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "talk.jsonl:2: no assistant message"),
        ({"messages": [{"role": "assistant", "content": 3}]}, 'message 1 "content" is int, not a string'),
        ({"prompt": "a", "completion": "b"}, "talk.jsonl:2: a prompt/completion record among conversation"),
    ],
)
def test_invalid_records_name_file_and_line(
    cli, qwen: Path, tmp_path: Path, record: dict, message: str
) -> None:
    data = write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK}, record])
    result = cli(*finetune_args(data, tmp_path / "out", qwen, "--max-steps", "1"))
    assert result.exit_code != 0
    assert message in result.stderr and result.stderr.count("Error:") == 1


def test_conversation_among_prompt_completion_records_is_refused(cli, qwen: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "completion": "b"}, {"messages": TALK}])
    result = cli(*finetune_args(data, tmp_path / "out", qwen, "--max-steps", "1"))
    assert result.exit_code != 0
    assert 'qa.jsonl:2: a conversation record ("messages") among prompt/completion records' in result.stderr


def test_no_chat_template_names_the_option(cli, tmp_path: Path) -> None:
    model = build_tiny_family(tmp_path / "plain", "qwen2", chat_template=False)
    data = write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK}])
    result = cli(*finetune_args(data, tmp_path / "out", model, "--max-steps", "1"))
    assert result.exit_code != 0
    assert "no chat template" in result.stderr and "--chat-template" in result.stderr


def test_long_conversation_is_refused_or_skipped(cli, qwen: Path, tmp_path: Path) -> None:
    long = [{"role": "user", "content": "the cat sat " * 40}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    data = write_jsonl(tmp_path / "talk.jsonl", [{"messages": short}] * 8 + [{"messages": long}])
    result = cli(*finetune_args(data, tmp_path / "out", qwen, "--max-steps", "1"))
    assert result.exit_code != 0 and "talk.jsonl:9: the record has" in result.stderr
    assert "rendered conversation" in result.stderr
    result = cli(
        *finetune_args(
            data, tmp_path / "out2", qwen, "--max-steps", "1", "--long-records", "skip", "--batch-size", "2"
        )
    )
    assert result.exit_code == 0, result.stderr
    assert meta(tmp_path / "out2")["data"]["skipped_records"] == 1


def test_llama3_mask_ends_with_eot_id(llama: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama)
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    tokenizer.chat_template = LLAMA3
    data = prepared(tokenizer, write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK}]), tmp_path)
    rows, runs = learnt(tokenizer, data)
    assert runs == ["on the mat<|eot_id|>", "in the house<|eot_id|>"]
    assert rows[0][:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|start_header_id|>")]


def test_first_content_token_learnt_when_it_carries_the_prompts_space(qwen: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    tokenizer.chat_template = PLAIN
    talk = [{"role": "user", "content": "where?"}, {"role": "assistant", "content": "the mat"}]
    assert tokenizer.tokenize("assistant: the")[-1] == "Ġthe"  # one token: the space and the word
    data = prepared(tokenizer, write_jsonl(tmp_path / "talk.jsonl", [{"messages": talk}]), tmp_path)
    assert learnt(tokenizer, data)[1] == [f" the mat{tokenizer.eos_token}"]


def test_template_that_rewrites_earlier_turns_is_refused(qwen: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last] {% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(InputError, match=r"talk.jsonl:1: the chat template renders assistant turn 3"):
        prepared(tokenizer, write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK}]), tmp_path)


def test_worker_processes_give_the_same_ids_and_mask(qwen: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    records = [{"messages": TALK[: 3 + 2 * (i % 2)]} for i in range(40)]
    path = write_jsonl(tmp_path / "talk.jsonl", records)
    one = prepared(tokenizer, path, tmp_path).train.data
    two = prepared(tokenizer, path, tmp_path, num_proc=2).train.data
    assert np.array_equal(one.array(), two.array()) and np.array_equal(one.mask(), two.mask())
    assert np.array_equal(one.record_table(), two.record_table())


def test_messages_field_option_and_its_conflict(cli, qwen: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "talk.jsonl", [{"chat": TALK, "text": "x"}] * 8)
    out = tmp_path / "out"
    flags = ("--messages-field", "chat", "--max-steps", "1", "--batch-size", "2", "--block-size", "128")
    result = cli(*finetune_args(data, out, qwen, *flags))
    assert result.exit_code == 0, result.stderr
    assert meta(out)["data"]["messages_field"] == "chat"
    result = cli(
        *finetune_args(data, tmp_path / "o2", qwen, "--messages-field", "chat", "--prompt-field", "p")
    )
    assert result.exit_code != 0 and "--messages-field and --prompt-field" in result.stderr


@pytest.mark.parametrize("name", ["chatml", "zephyr"])
def test_mask_agrees_with_transformers_generation_marks(qwen: Path, tmp_path: Path, name: str) -> None:
    """The built-in templates mark assistant content + end of turn with {% generation %}: transformers'
    own assistant mask must be ours."""
    from llmkit.templates import BUILTIN

    tokenizer = AutoTokenizer.from_pretrained(qwen)
    tokenizer.chat_template = BUILTIN[name]
    data = prepared(tokenizer, write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK}]), tmp_path)
    theirs = tokenizer.apply_chat_template(TALK, return_dict=True, return_assistant_tokens_mask=True)
    n = len(theirs["input_ids"])
    assert data.train.data.array()[:n].tolist() == theirs["input_ids"]
    assert data.train.data.mask()[:n].tolist() == theirs["assistant_masks"] and data.train.data.tokens == n


def test_template_raising_is_an_error_naming_the_line(qwen: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = write_jsonl(tmp_path / "talk.jsonl", [{"messages": TALK[1:]}, {"messages": TALK}])
    with pytest.raises(
        InputError, match=r"talk.jsonl:2: the chat template refuses .*System role not supported"
    ):
        prepared(tokenizer, path, tmp_path)


def test_val_file_of_conversations_and_of_the_other_kind(cli, qwen: Path, tmp_path: Path) -> None:
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": short}] * 8)
    val = write_jsonl(tmp_path / "val.jsonl", [{"messages": TALK}] * 2)
    flags = ("--max-steps", "1", "--batch-size", "2", "--block-size", "128")
    result = cli(*finetune_args(train, tmp_path / "out", qwen, *flags, "--val-file", val))
    assert result.exit_code == 0, result.stderr
    assert meta(tmp_path / "out")["data"]["val_records"] == 2
    pairs = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "completion": "b"}])
    result = cli(*finetune_args(train, tmp_path / "out2", qwen, *flags, "--val-file", pairs))
    assert (
        result.exit_code != 0 and "qa.jsonl:1: a prompt/completion record among conversation" in result.stderr
    )
