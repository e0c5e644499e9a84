"""`llmkit serve` with its engine in a child process (the default: llmkit/serve/process.py) against
the same server with the engine on a thread of the HTTP process (`LLMKIT_SERVE_ENGINE=thread`, what
it did before), on the built-in model at serve's defaults and on GPT-2 small's shape in float32.

Both servers of a model run at once and take turns, round by round, at 1, 4 and 16 clients streaming
64 sampled tokens each (bench.serve.take_turns); medians of the rounds.

    python -m bench.serve_process             # about 6 minutes on 2 cores
    python -m bench.serve_process --builtin   # the built-in model only
"""

from __future__ import annotations

import sys

from bench.common import describe_machine, gpt2_small, save, table
from bench.serve import level_rows, side_by_side

ROUNDS = 3
LEVELS = (1, 4, 16)
ENVS = {"engine process": {}, "engine thread": {"LLMKIT_SERVE_ENGINE": "thread"}}


def main() -> None:
    print(describe_machine())
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else ROUNDS
    models = {
        "tiny-shakespeare (serve's defaults)": ("tiny-shakespeare", []),
        "GPT-2 small shape, float32": (str(gpt2_small()), ["--dtype", "float32"]),
    }
    if "--builtin" in sys.argv[1:]:
        models = dict(list(models.items())[:1])
    results = {}
    rows = [("model", "engine", "1 client tok/s", "4 clients", "16 clients", "16 vs 1")]
    for label, (model, extra) in models.items():
        got = results[label] = side_by_side(model, extra, ENVS, LEVELS, rounds)
        rows += level_rows(label, got, "engine thread", LEVELS)
        print(f"{label}: done", flush=True)
    print(table(rows))
    print(f"(medians of {rounds} alternated rounds; 64 sampled tokens per request)")
    print(f"wrote {save('serve_process', {'rounds': rounds, 'results': results})}")


if __name__ == "__main__":
    main()
