"""Busy CPUs: llmkit's OpenMP threads when another process keeps a core busy.

torch runs every operator on all cores by default, and its OpenMP threads spin at each barrier while
they wait for the slowest of them. When another process holds one of those cores, the thread on it
runs only part of the time and the others wait for it: the whole operator slows to the pace of the
descheduled thread. This measures, with and without a competing busy loop (one process spinning in
pure Python, as any CPU-bound neighbour would):

- default: torch's threads (one per core), OpenMP's default wait policy;
- OMP_WAIT_POLICY=PASSIVE: the same threads, sleeping instead of spinning while they wait;
- OMP_NUM_THREADS=1: one thread, nothing to wait for (what `llmkit --threads 1` sets);
- GOMP_SPINCOUNT=10000 / 100000: libgomp's bounded spin (spin that many rounds, then sleep).

Workloads, in one worker process per variant (the environment applies when torch starts), timed
after loading: greedy decoding of 32 tokens with the built-in model at `--dtype auto`, perplexity
of 12 KB of the corpus, and 3 AdamW training steps (batch 4 × 128, float32). Variants alternate
measurement by measurement, busy and quiet interleaved, so drift in the machine hits all alike. On
a shared machine "quiet" means only what the other tenants do: compare ratios inside one run.

    python -m bench.busy_cpu            # a few minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import describe_machine, save, table

REPEATS = 3
VARIANTS = {
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
}
# One worker per variant, started once (the environment must be there when torch starts), then
# measuring each time it reads a line: start-up and loading are not timed, and not repeated.
WORKER = r"""
import json, sys, time
import torch
from llmkit import scoring
from llmkit.config import GenerateConfig, LoadConfig, PerplexityConfig
from llmkit.generation import Generator, Prompt
from llmkit.models import load
lm = load(LoadConfig(model="tiny-shakespeare"))
gen = Generator(lm, GenerateConfig(max_new_tokens=32, min_new_tokens=32, greedy=True))
text = open(sys.argv[1], encoding="utf-8").read()[:12_000]
ids = lm.tokenizer(text)["input_ids"]
model = load(LoadConfig(model="tiny-shakespeare", dtype="float32")).model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
batch = torch.tensor(ids[: 4 * 128]).view(4, 128)
list(gen.run([Prompt(1, "ROMEO:")]))  # warm-up
print("ready", flush=True)
for _ in sys.stdin:
    start = time.perf_counter()
    list(gen.run([Prompt(1, "ROMEO:")]))
    decode = 32 / (time.perf_counter() - start)
    start = time.perf_counter()
    scoring.perplexity(lm, [(ids, text)], PerplexityConfig())
    ppl = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    train = time.perf_counter() - start
    print(json.dumps({"decode_tok_s": decode, "perplexity_s": ppl, "train_3_steps_s": train,
                      "threads": torch.get_num_threads(), "dtype": str(lm.dtype)}), flush=True)
"""


class Worker:
    def __init__(self, env: dict[str, str], corpus: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, corpus],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def measure(self) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(60)


def main() -> None:
    from bench.common import CORPUS, corpus_text

    print(describe_machine())
    print(f"load average before: {os.getloadavg()}")
    corpus = str(CORPUS)
    if not CORPUS.is_file():
        corpus = "/tmp/llmkit-busy-cpu-corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(corpus_text()[:100_000])
    workers = {name: Worker(env, corpus) for name, env in VARIANTS.items()}
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        for repeat in range(REPEATS):
            for busy in (True, False) if repeat % 2 == 0 else (False, True):
                spinner = None
                if busy:
                    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    time.sleep(0.5)
                try:
                    for name, worker in workers.items():
                        runs.setdefault((name, "busy" if busy else "quiet"), []).append(worker.measure())
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
            print(f"round {repeat + 1}/{REPEATS} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    med = {
        key: {m: statistics.median(r[m] for r in rs) for m in rs[0] if m != "dtype"}
        for key, rs in runs.items()
    }
    base = med[("default", "quiet")]
    rows = [("variant", "neighbour", "decode tok/s", "perplexity s", "3 train steps s", "vs default quiet")]
    for (name, cond), m in med.items():
        ratio = (
            f"decode {m['decode_tok_s'] / base['decode_tok_s']:.2f}x, "
            f"ppl {base['perplexity_s'] / m['perplexity_s']:.2f}x, "
            f"train {base['train_3_steps_s'] / m['train_3_steps_s']:.2f}x"
        )
        rows.append(
            (
                name,
                cond,
                f"{m['decode_tok_s']:.1f}",
                f"{m['perplexity_s']:.2f}",
                f"{m['train_3_steps_s']:.2f}",
                ratio,
            )
        )
    print(table(rows))
    print(
        "(medians of",
        REPEATS,
        "runs; speed ratios, higher is faster; dtype",
        runs[("default", "quiet")][0]["dtype"],
        ")",
    )
    path = save(
        "busy_cpu",
        {
            "repeats": REPEATS,
            "medians": {f"{name} / {cond}": m for (name, cond), m in med.items()},
            "runs": {f"{name} / {cond}": rs for (name, cond), rs in runs.items()},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
