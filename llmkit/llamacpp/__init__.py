"""llama.cpp as `generate`'s engine on the CPU (`--engine llama.cpp`).

llama.cpp computes each step's logits from a GGUF file that `llmkit export` writes once per model and
precision tier (files.py); llmkit keeps everything else: its tokenizer, transformers' logits
processors, its seeds, stop strings, streaming and records (generator.py). The bindings are
llama-cpp-python, an optional source build (runtime.py says how to get it).
"""
