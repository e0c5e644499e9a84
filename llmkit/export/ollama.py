"""An ollama Modelfile beside an exported GGUF: `ollama create NAME -f Modelfile` then runs it."""

from __future__ import annotations

from pathlib import Path

# ollama templates are Go templates, not Jinja: ChatML is the one chat format written out here.
CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")


def modelfile(gguf_path: Path, *, context: int, eos: str | None, chat_template: str | None) -> str:
    """FROM the file (relative, so the pair can move together), the template, the stops, the context."""
    lines = [f"FROM ./{gguf_path.name}"]
    stops: list[str] = []
    if chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{CHATML}"""')
        stops += CHATML_STOPS
    elif chat_template:
        lines.append("# The chat template is in the GGUF (tokenizer.chat_template): ollama reads it there.")
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')  # a plain language model: the prompt is continued
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    # Learned position embeddings end at the model's context: ollama's default window is larger.
    lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"
