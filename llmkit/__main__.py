"""`python -m llmkit` (and `accelerate launch -m llmkit` / `torchrun -m llmkit`)."""

from llmkit.cli.app import main

if __name__ == "__main__":
    main()
