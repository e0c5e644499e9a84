"""`llmkit serve` with the engine choosing its thread count per batch size (llmkit/serve/threads.py)
against the same server pinned to torch's threads (`LLMKIT_SERVE_THREADS=<cores>`, what it did
before), on the built-in model at serve's defaults and on GPT-2 small's shape in float32.

Both servers of a model run at once and take turns, round by round, at 1, 4 and 16 clients streaming
64 sampled tokens each, so drift in the machine hits them alike; medians of the rounds. The chosen
counts are read from `/health` at the end.

    python -m bench.serve_threads            # about 5 minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench.common import describe_machine, gpt2_small, save, table
from bench.serve import level_rows, side_by_side

ROUNDS = 3
LEVELS = (1, 4, 16)


def compare(model: str, extra: list[str], threads: int) -> dict[str, Any]:
    envs = {
        "chosen per batch size": {},
        f"pinned to {threads} threads": {"LLMKIT_SERVE_THREADS": str(threads)},
    }
    return side_by_side(model, extra, envs, LEVELS, ROUNDS)


def main() -> None:
    import torch

    print(describe_machine())
    threads = torch.get_num_threads()
    models = {
        "tiny-shakespeare (serve's defaults)": ("tiny-shakespeare", []),
        "GPT-2 small shape, float32": (str(gpt2_small()), ["--dtype", "float32"]),
    }
    if "--builtin" in sys.argv[1:]:
        models = dict(list(models.items())[:1])
    results = {}
    rows = [("model", "server", "1 client tok/s", "4 clients", "16 clients", "16 vs 1", "chosen")]
    for label, (model, extra) in models.items():
        got = results[label] = compare(model, extra, threads)
        chosen = got["threads_chosen"]
        rows += level_rows(
            label, got, f"pinned to {threads} threads", LEVELS, lambda n, c=chosen: json.dumps(c[n])
        )
        print(f"{label}: done", flush=True)
    print(table(rows))
    print(f"(medians of {ROUNDS} alternated rounds; 64 sampled tokens per request)")
    print(f"wrote {save('serve_threads', {'rounds': ROUNDS, 'results': results})}")


if __name__ == "__main__":
    main()
