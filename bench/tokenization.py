"""Tokenization: MB/s of text into llmkit's token cache on a ~200 MB corpus, peak memory, a cache-hit
rerun, against the `run_clm` way (datasets `load_dataset("text")` → `map(tokenize)` → `group_texts`).

Each side runs in a fresh subprocess so its peak RSS is its own. The corpus is the shared Tiny
Shakespeare repeated: repeated words are kind to BPE word caches, on both sides alike.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import BUILD, CORPUS, gpt2_small, save, table

TARGET_BYTES = 200 * 2**20
NUM_PROC = 2

OURS = """
import json, resource, sys, time
from transformers import AutoTokenizer
from llmkit.data import tokenize
tok = AutoTokenizer.from_pretrained(sys.argv[1])
start = time.perf_counter()
data = tokenize([sys.argv[2]], tok, num_proc=int(sys.argv[4]), cache_dir=sys.argv[3])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": data.tokens, "cache_hit": data.cache_hit,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

BASELINE = """
import json, resource, sys, time
from itertools import chain
from datasets import load_dataset
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
start = time.perf_counter()
raw = load_dataset("text", data_files={"train": sys.argv[2]}, cache_dir=sys.argv[3])["train"]
ids = raw.map(lambda b: tok(b["text"]), batched=True, num_proc=int(sys.argv[4]), remove_columns=["text"])
def group_texts(examples, block=1024):
    joined = {k: list(chain(*examples[k])) for k in examples}
    total = len(joined["input_ids"]) // block * block
    return {k: [t[i:i + block] for i in range(0, total, block)] for k, t in joined.items()}
blocks = ids.map(group_texts, batched=True, num_proc=int(sys.argv[4]))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": blocks.num_rows * 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def corpus() -> Path:
    path = BUILD / "corpus-200mb.txt"
    if not path.is_file() or path.stat().st_size < TARGET_BYTES:
        text = CORPUS.read_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for _ in range(TARGET_BYTES // len(text) + 1):
                f.write(text)
    return path


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    model, text = gpt2_small(), corpus()
    megabytes = text.stat().st_size / 2**20
    cache = BUILD / "token-cache"
    shutil.rmtree(cache, ignore_errors=True)
    ours = child(OURS, str(model), str(text), str(cache), str(NUM_PROC))
    hit = child(OURS, str(model), str(text), str(cache), str(NUM_PROC))
    base_cache = BUILD / "datasets-cache"
    shutil.rmtree(base_cache, ignore_errors=True)
    try:
        base = child(BASELINE, str(model), str(text), str(base_cache), str(NUM_PROC))
    except (subprocess.CalledProcessError, ModuleNotFoundError) as exc:
        base = {"error": str(exc)[:300]}
    rows = [("", "seconds", "MB/s", "peak RSS MB (main / largest child)")]
    for name, r in (
        ("llmkit tokenize → cache", ours),
        ("llmkit cache hit", hit),
        ("datasets.map run_clm", base),
    ):
        if "seconds" in r:
            rows.append(
                (
                    name,
                    f"{r['seconds']:.2f}",
                    f"{megabytes / r['seconds']:.1f}",
                    f"{r['peak_rss_mb']:.0f} / {r['children_peak_rss_mb']:.0f}",
                )
            )
        else:
            rows.append((name, "error", "", r.get("error", "")))
    print(table(rows))
    ratio = base["seconds"] / ours["seconds"] if "seconds" in base else None
    if ratio:
        print(
            f"llmkit is {ratio:.2f}x the run_clm way (tokens: llmkit {ours['tokens']:,}, run_clm blocks "
            f"{base['tokens']:,}: line-split text without newlines, as run_clm does)"
        )
    save(
        "tokenization",
        {
            "megabytes": megabytes,
            "num_proc": NUM_PROC,
            "llmkit": ours,
            "cache_hit": hit,
            "datasets_run_clm": base,
            "speedup": ratio,
        },
    )


if __name__ == "__main__":
    main()
