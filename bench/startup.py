"""Start-up: `llmkit --help` wall time, and `llmkit generate` end to end against the import floor and
against a plain transformers script that loads the same model and generates the same 8 tokens.

Cases alternate (one run of each, REPEATS times) so drift in the machine's speed hits all of them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.common import run, save, summary, table

REPEATS = 7
PLAIN = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok("The cat", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=8, do_sample=True, top_k=50, pad_token_id=tok.eos_token_id)
print(tok.decode(out[0, ids["input_ids"].shape[1]:]))
"""


def main() -> None:
    from llmkit.testing import build_tiny_model

    tiny = build_tiny_model(Path("build/bench/tiny"))
    py = sys.executable
    cases = {
        "python -c pass": [py, "-c", "pass"],
        "llmkit --help": [py, "-m", "llmkit", "--help"],
        "import torch, transformers": [py, "-c", "import torch, transformers"],
        "llmkit generate (tiny, 8 tokens)": [
            py,
            "-m",
            "llmkit",
            "generate",
            "-m",
            str(tiny),
            "The cat",
            "-n",
            "8",
            "--seed",
            "1",
        ],
        "plain transformers script (tiny, 8 tokens)": [py, "-c", PLAIN, str(tiny)],
    }
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(REPEATS):
        for name, argv in cases.items():
            start = time.perf_counter()
            run(argv)
            runs[name].append(time.perf_counter() - start)
    times = {name: summary(r) for name, r in runs.items()}
    floor = times["import torch, transformers"]["median"]
    ours = times["llmkit generate (tiny, 8 tokens)"]["median"]
    added = ours - floor
    over_plain = ours - times["plain transformers script (tiny, 8 tokens)"]["median"]
    rows = [("case", "median s", "min s", "max s")]
    rows += [(n, f"{t['median']:.3f}", f"{t['min']:.3f}", f"{t['max']:.3f}") for n, t in times.items()]
    print(table(rows))
    print(
        f"llmkit --help: {times['llmkit --help']['median']:.3f}s (target <= 0.3s); generate adds "
        f"{added:.3f}s to the torch+transformers import floor (target <= 0.5s) and "
        f"{over_plain:+.3f}s to a plain transformers script doing the same"
    )
    save(
        "startup",
        {
            "times": times,
            "help_seconds": times["llmkit --help"]["median"],
            "generate_over_import_floor_seconds": added,
            "generate_over_plain_script_seconds": over_plain,
        },
    )


if __name__ == "__main__":
    main()
