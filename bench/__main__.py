"""`make bench`: run every benchmark; each prints its table and writes bench/results/NAME.json."""

from __future__ import annotations

from bench import many_prompts, one_prompt, startup, tokenization

for module in (startup, one_prompt, many_prompts, tokenization):
    print(f"== {module.__name__}")
    module.main()
