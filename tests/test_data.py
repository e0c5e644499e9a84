"""Fine-tuning data: the ids in the cache must equal plain transformers tokenization, document by document."""

from __future__ import annotations

import builtins
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmkit import data
from llmkit.errors import InputError, UsageError
from llmkit.testing import sentences

TEXT_A = "\n".join(sentences(12, seed=1)) + "\n\nA second paragraph: café, naïve, 日本語 🙂.\n"
TEXT_B = "# Notes\n\n" + "\n".join(sentences(9, seed=2)) + "\n  indented line\n\tand a tab\n"
RECORDS = ["The cat sees the moon.", "Two\nlines 🙂", "  leading spaces and trailing  "]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut plain text into many pieces and batches, so streaming is really exercised."""
    monkeypatch.setattr("llmkit.data.sources.PIECE_CHARS", 48)
    monkeypatch.setattr("llmkit.data.cache.BATCH_CHARS", 150)


def reference(tokenizer, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def jsonl(path: Path, records: list[object], field: str = "text") -> Path:
    lines = [
        json.dumps({field: r, "id": i}) if isinstance(r, str) else json.dumps(r)
        for i, r in enumerate(records)
    ]
    return write(path, "\n".join(lines) + "\n")


def ids_of(token_data: data.TokenData) -> list[int]:
    return token_data.array().tolist()


# -- What the ids are ------------------------------------------------------------------------------


def test_text_files_tokenize_like_whole_documents(tmp_path, tokenizer, cache, small_pieces):
    a = write(tmp_path / "a.txt", TEXT_A)
    b = write(tmp_path / "b.md", TEXT_B)
    result = data.tokenize([str(a), str(b)], tokenizer, cache_dir=cache)
    assert ids_of(result) == reference(tokenizer, [TEXT_A, TEXT_B])
    size = a.stat().st_size + b.stat().st_size
    assert (result.documents, result.bytes, result.invalid_bytes) == (2, size, 0)
    assert result.dtype == "uint16" and not result.cache_hit
    assert result.path.stat().st_size == 2 * result.tokens


def test_jsonl_records_are_documents(tmp_path, tokenizer, cache):
    path = jsonl(tmp_path / "d.jsonl", [*RECORDS, ""], field="body")
    path.write_text(path.read_text() + "\n   \n" + json.dumps({"body": "esc\\u00e9 \u00e9"}) + "\n")
    result = data.tokenize([path], tokenizer, text_field="body", cache_dir=cache)
    # blank lines and empty texts are not documents
    assert ids_of(result) == reference(tokenizer, [*RECORDS, "esc\\u00e9 \u00e9"])
    assert result.documents == 4


def test_directory_is_searched_recursively_in_sorted_order(tmp_path, tokenizer, cache):
    root = tmp_path / "corpus"
    write(root / "b.txt", "bee text\n")
    write(root / "a.md", "ay text\n")
    write(root / "sub" / "c.rst", "see text\n")
    jsonl(root / "sub" / "d.jsonl", ["dee one", "dee two"])
    write(root / "empty.txt", "")  # skipped inside a directory
    write(root / "model.bin", b"\x00\x01binary")  # not a text extension
    write(root / "notes.csv", "x,y\n")
    result = data.tokenize([root], tokenizer, cache_dir=cache)
    expected = ["ay text\n", "bee text\n", "see text\n", "dee one", "dee two"]
    assert ids_of(result) == reference(tokenizer, expected)
    assert list(data.read_documents([root])) == expected

    only_md = data.tokenize([root], tokenizer, glob="*.md", cache_dir=cache)
    assert ids_of(only_md) == reference(tokenizer, ["ay text\n"])
    assert list(data.read_documents([root], glob=["sub/*.rst", "*.csv"])) == ["x,y\n", "see text\n"]


def test_stdin_is_a_document(tmp_path, tokenizer, cache, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT_A.encode())))
    result = data.tokenize(["-"], tokenizer, cache_dir=cache)
    assert ids_of(result) == reference(tokenizer, [TEXT_A])
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json"]  # the spooled copy is gone
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT_A.encode())))
    assert "".join(data.read_documents("-")) == TEXT_A


def test_read_documents_counts(tmp_path, monkeypatch):
    monkeypatch.setattr("llmkit.data.sources.PIECE_CHARS", 40)
    a = write(tmp_path / "a.txt", TEXT_A)
    b = jsonl(tmp_path / "b.jsonl", RECORDS)
    stats = data.ReadStats()
    texts = list(data.read_documents([str(a), str(b)], stats=stats))
    assert "".join(texts[:-3]) == TEXT_A and len(texts) > 4  # a plain-text file comes in pieces
    assert texts[-3:] == RECORDS
    assert (stats.documents, stats.bytes) == (4, a.stat().st_size + b.stat().st_size)


def test_a_byte_order_mark_is_not_text(tmp_path, tokenizer, cache):
    a = write(tmp_path / "a.txt", b"\xef\xbb\xbfhello\n")
    b = write(tmp_path / "b.jsonl", b'\xef\xbb\xbf{"text": "hi"}\n')
    result = data.tokenize([a, b], tokenizer, cache_dir=cache)
    assert ids_of(result) == reference(tokenizer, ["hello\n", "hi"])


# -- Blocks and the validation split -----------------------------------------------------------------


def test_packing_drops_the_tail_and_yields_exact_blocks(tmp_path, tokenizer, cache):
    a = write(tmp_path / "a.txt", TEXT_A)
    ref = reference(tokenizer, [TEXT_A])
    block = 16
    assert len(ref) % block  # there is a tail to drop
    prepared = data.prepare([a], tokenizer, block_size=block, val_split=0, cache_dir=cache)
    assert prepared.val is None
    assert len(prepared.train) == len(ref) // block
    for i in range(len(prepared.train)):
        assert prepared.train[i].dtype == np.int64
        assert prepared.train[i].tolist() == ref[i * block : (i + 1) * block]
    with pytest.raises(IndexError):
        prepared.train[len(prepared.train)]
    batch = prepared.train.batch([2, 0])
    assert batch.shape == (2, block) and batch[1].tolist() == ref[:block]

    collated = data.collate([prepared.train[0], prepared.train[1]])
    assert collated["input_ids"].dtype.is_floating_point is False
    assert collated["input_ids"].tolist() == [ref[:block], ref[block : 2 * block]]
    assert collated["labels"].tolist() == collated["input_ids"].tolist()


def test_blocks_pickle_without_their_ids(tmp_path, tokenizer, cache):
    a = write(tmp_path / "a.txt", TEXT_A * 4)
    blocks = data.prepare([a], tokenizer, block_size=8, val_split=0, cache_dir=cache).train
    blocks[0]  # maps the file
    copy = pickle.loads(pickle.dumps(blocks))
    assert blocks._ids is not None and copy._ids is None  # a worker maps the file itself
    assert copy[3].tolist() == blocks[3].tolist()


def test_val_split_is_deterministic_and_holds_out_at_least_one(tmp_path, tokenizer, cache):
    a = write(tmp_path / "a.txt", TEXT_A)
    first = data.prepare([a], tokenizer, block_size=8, val_split=0.2, seed=3, cache_dir=cache)
    again = data.prepare([a], tokenizer, block_size=8, val_split=0.2, seed=3, cache_dir=cache)
    n = first.train.data.blocks(8)
    assert first.val is not None and len(first.val) == round(n * 0.2)
    assert first.val.indices.tolist() == again.val.indices.tolist()
    assert sorted([*first.train.indices, *first.val.indices]) == list(range(n))
    assert first.val[0].tolist() == first.train.data.array()[first.val.indices[0] * 8 :][:8].tolist()

    other = data.split_blocks(100, 0.2, seed=4)[1]
    assert other.tolist() != data.split_blocks(100, 0.2, seed=3)[1].tolist()
    assert len(data.split_blocks(10, 0.001, seed=0)[1]) == 1  # at least one
    assert len(data.split_blocks(2, 0.9, seed=0)[1]) == 1  # never all
    assert len(data.split_blocks(1, 0.5, seed=0)[1]) == 0  # one block: nothing to hold out
    assert len(data.split_blocks(10, 0, seed=0)[1]) == 0

    one_block = data.prepare([a], tokenizer, block_size=n * 8, val_split=0.5, cache_dir=cache)
    assert one_block.val is None and len(one_block.train) == 1
    stats = again.stats()
    assert stats["train_blocks"] + stats["val_blocks"] == n and stats["cache_hits"] == 1
    json.dumps(stats)


def test_val_file(tmp_path, tokenizer, cache):
    train = write(tmp_path / "train.txt", TEXT_A)
    val = write(tmp_path / "val.txt", TEXT_B)
    prepared = data.prepare(
        [train], tokenizer, block_size=8, val_file=str(val), val_split=0.5, cache_dir=cache
    )
    train_ref, val_ref = reference(tokenizer, [TEXT_A]), reference(tokenizer, [TEXT_B])
    assert len(prepared.train) == len(train_ref) // 8  # val_split is unused
    assert [prepared.val[i].tolist() for i in range(len(prepared.val))] == [
        val_ref[i * 8 : (i + 1) * 8] for i in range(len(val_ref) // 8)
    ]
    alone = data.prepare([train], tokenizer, block_size=8, cache_dir=cache)
    assert prepared.fingerprint != alone.fingerprint == alone.train.data.fingerprint
    assert prepared.stats()["val_file"] and prepared.stats()["documents"] == 2

    tiny = write(tmp_path / "tiny.txt", "Hi.")
    with pytest.raises(InputError, match=r"validation data .*tiny\.txt has \d+ tokens"):
        data.prepare([train], tokenizer, block_size=8, val_file=str(tiny), cache_dir=cache)


# -- Processes, progress and the cache ---------------------------------------------------------------


def test_num_proc_gives_identical_ids(tmp_path, tokenizer, small_pieces):
    a = write(tmp_path / "a.txt", TEXT_A)
    b = jsonl(tmp_path / "b.jsonl", RECORDS * 5)
    c = write(tmp_path / "c.md", TEXT_B)
    one = data.tokenize([a, b, c], tokenizer, num_proc=1, no_cache=True)
    two = data.tokenize([a, b, c], tokenizer, num_proc=2, no_cache=True)
    assert ids_of(one) == ids_of(two) == reference(tokenizer, [TEXT_A, *RECORDS * 5, TEXT_B])
    assert one.fingerprint == two.fingerprint and one.documents == two.documents == 17


def test_progress_reports_bytes(tmp_path, tokenizer, cache, small_pieces):
    a = write(tmp_path / "a.txt", TEXT_A)
    calls: list[tuple[int, int]] = []
    data.tokenize([a], tokenizer, cache_dir=cache, on_progress=lambda *call: calls.append(call))
    size = a.stat().st_size
    assert calls[0] == (0, size) and calls[-1] == (size, size) and len(calls) >= 3
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    calls.clear()
    assert data.tokenize([a], tokenizer, cache_dir=cache, on_progress=lambda *c: calls.append(c)).cache_hit
    assert calls == []


def test_cache_is_keyed_by_content_and_tokenizer(tmp_path, tiny_model, tokenizer, cache):
    from transformers import AutoTokenizer

    a = write(tmp_path / "a.txt", TEXT_A)
    first = data.tokenize([a], tokenizer, cache_dir=cache)
    second = data.tokenize([a], tokenizer, cache_dir=cache)
    assert not first.cache_hit and second.cache_hit
    assert (second.path, second.fingerprint, second.tokens, second.documents) == (
        first.path,
        first.fingerprint,
        first.tokens,
        first.documents,
    )
    assert ids_of(second) == ids_of(first)

    moved = tmp_path / "elsewhere" / "renamed.md"
    moved.parent.mkdir()
    a.rename(moved)
    assert data.tokenize([moved], tokenizer, cache_dir=cache).cache_hit  # paths are not in the key
    assert not data.tokenize([moved], tokenizer, cache_dir=cache, errors="strict").cache_hit
    assert data.tokenize([moved], tokenizer, cache_dir=cache, text_field="body").cache_hit  # no JSONL

    write(moved, TEXT_A + "one more line\n")
    changed = data.tokenize([moved], tokenizer, cache_dir=cache)
    assert not changed.cache_hit and changed.fingerprint != first.fingerprint

    other = AutoTokenizer.from_pretrained(tiny_model)
    other.add_tokens(["moonlight"])
    assert not data.tokenize([moved], other, cache_dir=cache).cache_hit

    records = jsonl(tmp_path / "r.jsonl", RECORDS)
    twice = data.tokenize([records, records], tokenizer, cache_dir=cache)
    assert data.tokenize([records], tokenizer, cache_dir=cache).fingerprint != twice.fingerprint


def test_jsonl_text_field_is_part_of_the_key(tmp_path, tokenizer, cache):
    path = write(tmp_path / "r.jsonl", '{"text": "one", "body": "two"}\n')
    by_text = data.tokenize([path], tokenizer, cache_dir=cache)
    by_body = data.tokenize([path], tokenizer, cache_dir=cache, text_field="body")
    assert by_text.fingerprint != by_body.fingerprint and not by_body.cache_hit
    assert ids_of(by_body) == reference(tokenizer, ["two"])


def test_a_half_written_cache_is_not_used(tmp_path, tokenizer, cache):
    a = write(tmp_path / "a.txt", TEXT_A)
    first = data.tokenize([a], tokenizer, cache_dir=cache)
    sidecar = first.path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    assert meta["tokens"] == first.tokens and meta["fingerprint"] == first.fingerprint
    assert meta["dtype"] == "uint16" and meta["documents"] == 1 and meta["invalid_bytes"] == 0

    sidecar.unlink()  # the ids were written, the sidecar never was
    again = data.tokenize([a], tokenizer, cache_dir=cache)
    assert not again.cache_hit and sidecar.exists()

    first.path.write_bytes(first.path.read_bytes()[:-2])  # a short file
    assert not data.tokenize([a], tokenizer, cache_dir=cache).cache_hit
    sidecar.write_text("{not json")
    assert not data.tokenize([a], tokenizer, cache_dir=cache).cache_hit
    assert data.tokenize([a], tokenizer, cache_dir=cache).cache_hit
    assert sorted(p.name for p in cache.iterdir()) == [first.path.name, sidecar.name]  # no temp files


def test_no_cache_leaves_nothing_behind(tmp_path, tokenizer, cache):
    a = write(tmp_path / "a.txt", TEXT_A)
    data.tokenize([a], tokenizer, cache_dir=cache)
    prepared = data.prepare([a], tokenizer, block_size=8, cache_dir=cache, no_cache=True)
    assert prepared.cache_hits == 0 and prepared.train.data.temporary
    assert ids_of(prepared.train.data) == reference(tokenizer, [TEXT_A])
    path = prepared.train.data.path
    assert path.parent != cache and path.parent.parent == cache
    prepared.close()
    assert not path.exists() and not path.parent.exists()

    with pytest.raises(InputError):
        data.prepare([a], tokenizer, block_size=10_000, cache_dir=cache, no_cache=True)
    assert len(list(cache.iterdir())) == 2  # just the cached entry from the first call


def test_token_dtype():
    assert data.token_dtype(400) == "uint16"
    assert data.token_dtype(50257) == "uint16"
    assert data.token_dtype(65535) == "uint16"
    assert data.token_dtype(65536) == "uint32"
    assert data.token_dtype(100277) == "uint32"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMKIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert data.default_cache_dir() == Path.home() / ".cache" / "llmkit" / "tokens"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "llmkit" / "tokens"
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "mine"))
    assert data.default_cache_dir() == tmp_path / "mine" / "tokens"


# -- Encoding -----------------------------------------------------------------------------------------


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tokenizer, cache):
    raw = b"caf\xe9 ok\nand \xff\xfe here\n"
    a = write(tmp_path / "a.txt", raw)
    result = data.tokenize([a], tokenizer, cache_dir=cache)
    assert result.invalid_bytes == 3
    assert ids_of(result) == reference(tokenizer, [raw.decode("utf-8", "replace")])
    b = write(tmp_path / "b.jsonl", b'{"text": "ok"}\n{"text": "bad \xc3"}\n')
    both = data.prepare([a, b], tokenizer, block_size=4, cache_dir=cache)
    assert both.invalid_bytes == 4 and both.stats()["invalid_bytes"] == 4
    assert data.prepare([a, b], tokenizer, block_size=4, cache_dir=cache).invalid_bytes == 4  # from the cache


def test_strict_errors_name_the_byte_offset(tmp_path, tokenizer, cache, monkeypatch):
    monkeypatch.setattr("llmkit.data.sources.PIECE_CHARS", 16)  # the bad byte is far past the first read
    raw = ("é" * 30 + "x" * 7).encode() + b"\xff tail\n"
    a = write(tmp_path / "a.txt", raw)
    with pytest.raises(InputError, match=r"a\.txt: invalid UTF-8 at byte 67$"):
        data.tokenize([a], tokenizer, cache_dir=cache, errors="strict")
    across = write(tmp_path / "across.txt", "x" * 15 + "€ and more €\n")  # valid, cut between reads
    strict = data.tokenize([across], tokenizer, cache_dir=cache, errors="strict")
    assert ids_of(strict) == reference(tokenizer, ["x" * 15 + "€ and more €\n"])
    split = write(tmp_path / "split.txt", b"y" * 15 + b"\xe2\x82" + b"z\n")  # a sequence cut short
    with pytest.raises(InputError, match=r"split\.txt: invalid UTF-8 at byte 15$"):
        data.tokenize([split], tokenizer, cache_dir=cache, errors="strict")
    b = write(tmp_path / "b.jsonl", b'{"text": "ok"}\n{"text": "bad \xc3"}\n')
    with pytest.raises(InputError, match=r"b\.jsonl:2: invalid UTF-8 at byte 29$") as info:
        data.tokenize([b], tokenizer, cache_dir=cache, errors="strict")
    assert "UTF-8" in info.value.hint
    assert not list(cache.glob("*.tmp"))


def test_lone_surrogates_in_json(tmp_path, tokenizer, cache):
    path = write(tmp_path / "s.jsonl", '{"text": "a\\ud800b"}\n')
    assert data.tokenize([path], tokenizer, cache_dir=cache).invalid_bytes == 3
    with pytest.raises(InputError, match=r"s\.jsonl:1: .*lone surrogate"):
        data.tokenize([path], tokenizer, cache_dir=cache, errors="strict")


# -- Errors -------------------------------------------------------------------------------------------


def test_too_little_data_says_how_much(tmp_path, tokenizer, cache):
    a = write(tmp_path / "a.txt", "The cat sees the moon.")
    tokens = len(reference(tokenizer, ["The cat sees the moon."]))
    with pytest.raises(InputError, match=f"has {tokens} tokens, fewer than one block of 64") as info:
        data.prepare([a], tokenizer, block_size=64, cache_dir=cache)
    assert "--block-size" in info.value.hint


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", r"empty\.txt is empty"),
        ("blob.txt", b"text\x00\x01\x02 more", r"blob\.txt looks like a binary file"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON"),
        ("missing.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n', r'missing\.jsonl:3: no "text" field'),
        ("number.jsonl", b'{"text": 7}\n', r'number\.jsonl:1: "text" is int, not a string'),
        ("list.jsonl", b'["text"]\n', r"list\.jsonl:1: expected a JSON object"),
        ("blank.jsonl", b"\n  \n", r"blank\.jsonl: no JSON records"),
        ("none.jsonl", b'{"text": ""}\n', r"no text in .*none\.jsonl"),
    ],
)
def test_bad_inputs_raise_input_errors(tmp_path, tokenizer, cache, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(InputError, match=message) as info:
        data.prepare([path], tokenizer, block_size=4, cache_dir=cache)
    assert info.value.hint
    assert not list(cache.glob("*.tmp")) and not list(cache.glob("*.bin"))


def test_missing_paths_and_empty_directories(tmp_path, tokenizer, cache):
    with pytest.raises(InputError, match=r"nope\.txt: no such file or directory"):
        data.prepare([str(tmp_path / "nope.txt")], tokenizer, block_size=4, cache_dir=cache)
    write(tmp_path / "dir" / "data.csv", "a,b\n")
    write(tmp_path / "dir" / "empty.txt", "")
    with pytest.raises(InputError, match=r"dir: no text files matching \*\.txt \*\.md") as info:
        data.prepare([str(tmp_path / "dir")], tokenizer, block_size=4, cache_dir=cache)
    assert "glob" in info.value.hint
    with pytest.raises(InputError, match="no such file"):
        list(data.read_documents([str(tmp_path / "nope.txt")]))
    with pytest.raises(UsageError, match="no data"):
        data.prepare([], tokenizer, block_size=4, cache_dir=cache)


def test_unreadable_file(tmp_path, tokenizer, cache, monkeypatch):
    locked = write(tmp_path / "locked.txt", TEXT_A)
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):  # chmod does not stop root, so refuse here
        if str(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(InputError, match=r"locked\.txt: permission denied") as info:
        data.prepare([locked], tokenizer, block_size=4, cache_dir=cache)
    assert "permissions" in info.value.hint


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": 0}, "--block-size"),
        ({"val_split": 1.0}, "--val-split"),
        ({"val_split": -0.1}, "--val-split"),
        ({"errors": "ignore"}, "errors mode"),
        ({"num_proc": 0}, "--num-proc"),
        ({"text_field": ""}, "text field"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, tokenizer, cache, options, message):
    a = write(tmp_path / "a.txt", TEXT_A)
    with pytest.raises(UsageError, match=message):
        data.prepare([a], tokenizer, **{"block_size": 4, **options}, cache_dir=cache)


def test_import_is_cheap():
    heavy = "{'numpy', 'torch', 'transformers', 'tokenizers'}"
    code = f"import sys, llmkit.data; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
