"""`make bench`: run every benchmark; each prints its table and writes bench/results/NAME.json."""

from __future__ import annotations

from bench import many_prompts, startup, tokenization

for module in (startup, many_prompts, tokenization):
    print(f"== {module.__name__}")
    module.main()
