"""Start-up: `llmkit --help` wall time, and `llmkit generate` end to end against the import floor."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import run, save, summary, table, timed

REPEATS = 7


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
    }
    times = {name: summary(timed(lambda argv=argv: run(argv), REPEATS)) for name, argv in cases.items()}
    floor = times["import torch, transformers"]["median"]
    added = times["llmkit generate (tiny, 8 tokens)"]["median"] - floor
    rows = [("case", "median s", "min s", "max s")]
    rows += [(n, f"{t['median']:.3f}", f"{t['min']:.3f}", f"{t['max']:.3f}") for n, t in times.items()]
    print(table(rows))
    print(
        f"llmkit --help: {times['llmkit --help']['median']:.3f}s (target <= 0.3s); generate adds "
        f"{added:.3f}s to the torch+transformers import floor (target <= 0.5s)"
    )
    save(
        "startup",
        {
            "times": times,
            "help_seconds": times["llmkit --help"]["median"],
            "generate_over_import_floor_seconds": added,
        },
    )


if __name__ == "__main__":
    main()
