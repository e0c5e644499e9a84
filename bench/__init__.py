"""Benchmarks: each script compares llmkit with the baseline a user would otherwise run, in one process."""
