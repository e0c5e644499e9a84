"""llmkit against llama.cpp on the same model: GPT-2 small's shape (random weights, built here), CPU,
batch 1, the same number of threads. The yardstick for decoding work, so both sides at their best.

- decode: 128 greedy tokens (llmkit: `generate --greedy` at float32, at its defaults — `--dtype auto`,
  bf16 on a CPU that computes it natively — and with `--quantize int8`; llama.cpp: `llama-bench`'s
  tg128 on `llmkit export` files at f32, f16, q8_0 and q4_0).
- the same decode through the CLI, one process per call as a user runs it, with both engines:
  `llmkit -v generate … --greedy` at each tier, `--engine torch` and `--engine llama.cpp` (when
  llama-cpp-python is installed); its reported tokens/s (prefill and first token included).
  In-process llmkit runs with OpenMP's spinning threads; the CLI's torch engine waits passively.
- prompt processing: a 512-token prompt (llmkit: the forward pass that yields the first new token;
  llama.cpp: pp512).

llama.cpp is built here for this CPU (`GGML_NATIVE`): the llama-cpp-python sdist on PyPI vendors its
full source; `llama-bench` alone is built once into bench/.cache/ (about 10 minutes on 2 cores;
`python -m bench.runtimes --build` does only that). node-llama-cpp's prebuilt binaries (what
`make test` installs, generic x86-64 builds) are timed too, decode and prompt the same way.
Runs alternate (every contender once per round) so drift in the machine's speed hits all of them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from bench.common import BUILD, describe_machine, gpt2_small, save, table

NEW_TOKENS = 128
PROMPT_TOKENS = 512
REPEATS = 3
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built
CACHE = Path(__file__).resolve().parent / ".cache"
ROOT = Path(__file__).resolve().parent.parent
NODE_LLAMA_CPP = ROOT / ".node" / "node_modules" / "node-llama-cpp" / "dist" / "index.js"

# Decode and prompt timings through node-llama-cpp: one JSON line per call. Run from a file (in the
# cache): node-llama-cpp tests its binary in a child process that `node -e` can't start.
NODE_SCRIPT = """
const { getLlama, LlamaLogLevel } = await import(process.env.NODE_LLAMA_CPP);
const [path, threads, newTokens, promptTokens] = process.argv.slice(2);
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: path, gpuLayers: 0 });
const context = await model.createContext({ contextSize: 1024, batchSize: 512, threads: Number(threads) });
const prompt = Array.from({ length: Number(promptTokens) }, (_, i) => 100 + (i % 1000));
let sequence = context.getSequence();
let start = performance.now();
await sequence.evaluateWithoutGeneratingNewTokens(prompt);
const promptSeconds = (performance.now() - start) / 1000;
sequence.dispose();
sequence = context.getSequence();
let generated = 0;
start = performance.now();
for await (const token of sequence.evaluate([prompt[0]], { temperature: 0 })) {
  if (++generated >= Number(newTokens)) break;
}
const decodeSeconds = (performance.now() - start) / 1000;
await context.dispose(); await model.dispose(); await llama.dispose();
console.log(JSON.stringify({ promptSeconds, decodeSeconds }));
"""


def llama_bench(build: bool = True) -> Path | None:
    """The native `llama-bench`, built from the llama-cpp-python sdist if it isn't yet (None: can't)."""
    root = CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    binary = root / "build" / "bin" / "llama-bench"
    if binary.is_file() or not build:
        return binary if binary.is_file() else None
    if shutil.which("cmake") is None:
        print("cmake not found: no native llama.cpp build")
        return None
    print(f"building llama-bench from llama-cpp-python {LLAMA_CPP_PYTHON}'s llama.cpp (once; ~10 min)")
    sdist = CACHE / "sdist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            "-d",
            str(sdist),
        ],
        check=True,
    )
    archive = next(sdist.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    source = sdist / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not source.is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(sdist, filter="data")
    options = {
        "CMAKE_BUILD_TYPE": "Release",
        "GGML_NATIVE": "ON",
        "BUILD_SHARED_LIBS": "OFF",
        "LLAMA_BUILD_TESTS": "OFF",
        "LLAMA_BUILD_EXAMPLES": "OFF",
        "LLAMA_BUILD_SERVER": "OFF",
        "LLAMA_CURL": "OFF",
    }
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(root / "build"), *(f"-D{k}={v}" for k, v in options.items())],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    jobs = str(os.cpu_count() or 2)
    subprocess.run(
        ["cmake", "--build", str(root / "build"), "--target", "llama-bench", "-j", jobs],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return binary


def gguf_files(model: Path) -> dict[str, Path]:
    """The model exported once per type with `llmkit export`."""
    from llmkit.export import export

    out = BUILD / "runtimes"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for type in GGUF_TYPES:
        path = out / f"gpt2-small-shape-{type}.gguf"
        if not path.is_file():
            export(str(model), path, type=type)
        files[type] = path
    return files


def llmkit_contenders(model: Path) -> dict[str, Any]:
    """name -> (decode seconds, prompt seconds, prompt tokens) callable, for llmkit's three tiers."""
    from llmkit.config import GenerateConfig, LoadConfig
    from llmkit.generation import Generator, Prompt
    from llmkit.models import load
    from llmkit.products import one_row_head

    loads = {
        "float32, torch's LM head": LoadConfig(model=str(model), dtype="float32"),
        "float32": LoadConfig(model=str(model), dtype="float32"),
        "defaults": LoadConfig(model=str(model)),
        "--quantize f16": LoadConfig(model=str(model), quantize="f16"),
        "--quantize int8": LoadConfig(model=str(model), quantize="int8"),
        "--quantize int4": LoadConfig(model=str(model), quantize="int4"),
    }
    decode = GenerateConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, greedy=True)
    first = GenerateConfig(max_new_tokens=1, min_new_tokens=1, greedy=True)
    contenders = {}
    for name, cfg in loads.items():
        lm = load(cfg)
        if not name.endswith("torch's LM head"):
            one_row_head(lm.model, lm.device)  # as `llmkit generate` does (products.py)
        if name == "defaults":
            name = f"defaults ({str(lm.dtype).removeprefix('torch.')})"
        ids = list(range(100, 100 + PROMPT_TOKENS))
        long_prompt = lm.tokenizer.decode(ids)
        prompt_tokens = len(lm.tokenizer(long_prompt)["input_ids"])
        gen_decode, gen_first = Generator(lm, decode), Generator(lm, first)

        def run(gen_decode=gen_decode, gen_first=gen_first, long_prompt=long_prompt, n=prompt_tokens):
            start = time.perf_counter()
            next(gen_decode.run([Prompt(1, "the king")]))
            decode_s = time.perf_counter() - start
            start = time.perf_counter()
            next(gen_first.run([Prompt(1, long_prompt)]))
            return decode_s, time.perf_counter() - start, n

        contenders[f"llmkit {name}"] = run
    return contenders


CLI_TIERS = {
    "float32": ["--dtype", "float32"],
    "defaults": [],
    "--quantize int8": ["--quantize", "int8"],
    "--quantize int4": ["--quantize", "int4"],
}


def cli_contender(model: Path, options: list[str], cache: Path):
    """`llmkit -v generate` as a user runs it (its own process: llmkit's thread settings, the engine's
    wait policy): decode seconds from the tokens/s it reports; no prompt timing (NaN)."""
    argv = [str(Path(sys.executable).parent / "llmkit"), "-v", "generate", "-m", str(model), "the king"]
    argv += ["-n", str(NEW_TOKENS), "--min-new-tokens", str(NEW_TOKENS), "--greedy", *options]

    def run() -> tuple[float, float, int]:
        done = subprocess.run(
            argv, capture_output=True, text=True, check=True, env={**os.environ, "LLMKIT_CACHE": str(cache)}
        )
        rate = float(re.search(r"\(([\d.]+) tokens/s", done.stderr).group(1))  # type: ignore[union-attr]
        return NEW_TOKENS / rate, math.nan, PROMPT_TOKENS

    return run


def native_contender(binary: Path, path: Path, threads: int):
    def run() -> tuple[float, float, int]:
        done = subprocess.run(
            [
                str(binary),
                "-m",
                str(path),
                "-p",
                str(PROMPT_TOKENS),
                "-n",
                str(NEW_TOKENS),
                "-t",
                str(threads),
                "-r",
                "1",
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        tests = {(t["n_prompt"], t["n_gen"]): t for t in json.loads(done.stdout)}
        decode = tests[(0, NEW_TOKENS)]["avg_ns"] / 1e9
        prompt = tests[(PROMPT_TOKENS, 0)]["avg_ns"] / 1e9
        return decode, prompt, PROMPT_TOKENS

    return run


def node_contender(path: Path, threads: int):
    script = CACHE / "node_llama_cpp_bench.mjs"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(NODE_SCRIPT)

    def run() -> tuple[float, float, int]:
        done = subprocess.run(
            ["node", str(script), str(path), str(threads), str(NEW_TOKENS), str(PROMPT_TOKENS)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "NODE_LLAMA_CPP": NODE_LLAMA_CPP.as_uri()},
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["decodeSeconds"], result["promptSeconds"], PROMPT_TOKENS

    return run


def main(build: bool = True) -> None:
    import torch

    print(describe_machine())
    threads = torch.get_num_threads()
    model = gpt2_small()
    files = gguf_files(model)
    contenders = llmkit_contenders(model)
    engines = [("torch", [])]
    try:
        import llama_cpp  # noqa: F401

        engines.append(("llama.cpp", ["--engine", "llama.cpp"]))
    except ImportError:
        print("llama-cpp-python not installed: `generate --engine llama.cpp` is not measured")
    for engine, flag in engines:
        for tier, options in CLI_TIERS.items():
            contenders[f"llmkit generate --engine {engine} {tier}"] = cli_contender(
                model, [*flag, *options], CACHE / "llmkit-cache"
            )
    binary = llama_bench(build=build)
    if binary is None:
        print("llama.cpp native build: not available, not measured")
    else:
        for type, path in files.items():
            contenders[f"llama.cpp native {type}"] = native_contender(binary, path, threads)
    if shutil.which("node") and NODE_LLAMA_CPP.is_file():
        for type, path in files.items():
            contenders[f"node-llama-cpp 3.21.1 {type}"] = node_contender(path, threads)
    else:
        print("node-llama-cpp not installed (make node): its prebuilt figures are not measured")
    for name, run in contenders.items():
        if name.startswith("llmkit"):
            run()  # warm-up, and the GGUF export (llama-bench warms up itself; node-llama-cpp starts afresh)
    decode: dict[str, list[float]] = {name: [] for name in contenders}
    prompt: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(REPEATS):
        for name, run in contenders.items():
            decode_s, prompt_s, n = run()
            decode[name].append(NEW_TOKENS / decode_s)
            prompt[name].append(n / prompt_s)
    med_decode = {k: statistics.median(v) for k, v in decode.items()}
    med_prompt = {k: statistics.median(v) for k, v in prompt.items()}
    base = "llmkit float32"
    sizes = {f"llama.cpp native {t}": p.stat().st_size for t, p in files.items()}
    sizes |= {f"node-llama-cpp 3.21.1 {t}": p.stat().st_size for t, p in files.items()}
    print(f"threads: {threads}; decode {NEW_TOKENS} greedy tokens, prompt {PROMPT_TOKENS} tokens")
    print(
        table(
            [("", "decode tok/s", "min-max", f"vs {base}", "prompt tok/s", f"vs {base}", "file MB")]
            + [
                (
                    k,
                    f"{med_decode[k]:.1f}",
                    f"{min(decode[k]):.0f}-{max(decode[k]):.0f}",
                    f"{med_decode[k] / med_decode[base]:.2f}x",
                    "—" if math.isnan(med_prompt[k]) else f"{med_prompt[k]:.0f}",
                    "" if math.isnan(med_prompt[k]) else f"{med_prompt[k] / med_prompt[base]:.2f}x",
                    f"{sizes[k] / 1e6:.0f}" if k in sizes else "",
                )
                for k in contenders
            ]
        )
    )
    save(
        "runtimes",
        {
            "threads": threads,
            "new_tokens": NEW_TOKENS,
            "prompt_tokens": PROMPT_TOKENS,
            "llama_cpp_python_sdist": LLAMA_CPP_PYTHON,
            "native_built": binary is not None,
            "decode_tokens_per_s": decode,
            "prompt_tokens_per_s": prompt,
            "median_decode": med_decode,
            "median_prompt": med_prompt,
            "file_bytes": sizes,
        },
    )


if __name__ == "__main__":
    if "--build" in sys.argv[1:]:
        print(llama_bench() or "no build")
    else:
        main(build="--no-build" not in sys.argv[1:])
