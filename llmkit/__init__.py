"""llmkit: a command line for GPT-2-family language models."""

__version__ = "0.1.0"
