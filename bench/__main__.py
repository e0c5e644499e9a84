"""`make bench`: run every benchmark; each prints its table and writes bench/results/NAME.json.

`gpu` runs only where CUDA is available (it says so and skips elsewhere).
"""

from __future__ import annotations

from bench import (
    finetune,
    gpu,
    many_prompts,
    one_prompt,
    runtimes,
    serve,
    serve_threads,
    startup,
    tokenization,
)

MODULES = (startup, one_prompt, many_prompts, tokenization, finetune, serve, serve_threads, runtimes, gpu)
for module in MODULES:
    print(f"== {module.__name__}")
    module.main()
