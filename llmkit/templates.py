"""Chat templates by name or file (`--chat-template chatml|zephyr|FILE.jinja`), and putting one on a model.

The built-ins render as the real ones do:

- chatml: `<|im_start|>role\\n...<|im_end|>\\n` per message, `<|im_start|>assistant\\n` as the generation
  prompt; `<|im_start|>` and `<|im_end|>` are added as special tokens where the vocabulary lacks them,
  and `<|im_end|>` ends a turn.
- zephyr: `<|role|>\\n...EOS\\n` per message, `<|assistant|>\\n` as the generation prompt; the role
  markers stay plain text (as in Zephyr's own tokenizer), the tokenizer's EOS ends a turn, so it adds
  no tokens.

The assistant's content and its end-of-turn token sit inside `{% generation %}` blocks, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly what a reply should learn
(the newline after the end of turn is the template's, not learnt: the model stops at the token).

A FILE.jinja is checked by rendering a small conversation; the `<|...|>` markers it writes literally
and the vocabulary lacks are added as special tokens (a marker split into pieces can't be a stop), and
its end of turn is the first of the common end-of-turn markers it uses, else EOS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import InputError, UsageError

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
ZEPHYR = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
BUILTIN = {"chatml": CHATML, "zephyr": ZEPHYR}
TEMPLATE_HINT = "use chatml, zephyr, or the path of a .jinja file"
# The end-of-turn markers a FILE.jinja may use (as llmkit.chat knows them), in order of preference.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_PROBE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hello?"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Bye."},
]


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    """chatml, zephyr, or the file's path."""
    text: str
    special_tokens: tuple[str, ...]
    """Tokens the template needs as single tokens; added where the vocabulary lacks them."""
    end_of_turn: str | None
    """The token that ends a reply; None: the tokenizer's EOS."""


def resolve_template(spec: str) -> ChatTemplate:
    """The template `spec` names: a built-in, or a .jinja file (read and checked here)."""
    if spec in BUILTIN:
        tokens = ("<|im_start|>", "<|im_end|>") if spec == "chatml" else ()
        return ChatTemplate(spec, BUILTIN[spec], tokens, "<|im_end|>" if spec == "chatml" else None)
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--chat-template {spec}: no such template or file", TEMPLATE_HINT)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--chat-template {spec}: cannot read it ({exc})", TEMPLATE_HINT) from None
    check_renders(text, spec)
    markers = tuple(dict.fromkeys(_MARKER.findall(text)))
    end = next((m for m in _END_OF_TURN if m in text), None)
    return ChatTemplate(str(path), text, markers, end)


def check_renders(text: str, label: str) -> None:
    """Refuse a template that isn't jinja, or that fails on (or renders nothing for) a plain conversation."""
    from transformers.utils.chat_template_utils import render_jinja_template

    hint = "a chat template is jinja over `messages` (and add_generation_prompt); see transformers' docs"
    try:
        rendered, _ = render_jinja_template(
            conversations=[_PROBE], chat_template=text, add_generation_prompt=True, eos_token="</s>"
        )
    except Exception as exc:  # jinja2's TemplateSyntaxError, UndefinedError, the template's raise_exception
        raise UsageError(f"--chat-template {label}: not a usable chat template ({exc})", hint) from None
    if not rendered or "Hello?" not in rendered[0]:
        raise UsageError(f"--chat-template {label}: it does not render the messages' content", hint)


def apply_template(tokenizer: Any, model: Any, template: ChatTemplate) -> list[str]:
    """Put `template` on the tokenizer (replacing its own), add the tokens it needs, size the model's
    embeddings to match, and make its end of turn stop generation. Returns the tokens added."""
    tokenizer.chat_template = template.text
    vocab = tokenizer.get_vocab()
    added = [t for t in template.special_tokens if t not in vocab]
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # New rows start at the mean of the old ones (transformers' mean_resizing), not at random:
        # an untrained marker then scores like an average token instead of wildly.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if model is not None:
        stop_on_end_of_turn(tokenizer, model, template)
    return added


def stop_on_end_of_turn(tokenizer: Any, model: Any, template: ChatTemplate) -> None:
    """generation_config's EOS becomes a list: the original EOS and the template's end of turn."""
    gc = model.generation_config
    eos = gc.eos_token_id if gc.eos_token_id is not None else tokenizer.eos_token_id
    ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    if template.end_of_turn is not None:
        end = tokenizer.convert_tokens_to_ids(template.end_of_turn)
        if end is not None and end != tokenizer.unk_token_id and end not in ids:
            ids.append(end)
    gc.eos_token_id = ids if len(ids) != 1 else ids[0]
