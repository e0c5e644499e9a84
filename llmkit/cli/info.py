"""`llmkit info`: what a model is, without loading its weights."""

from __future__ import annotations

from llmkit.cli import _output as out
from llmkit.cli._options import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    ModelOpt,
    OfflineOpt,
    check_format,
)

EXAMPLES = """\b
Examples:
  llmkit info -m gpt2
  llmkit info -m ./my-model --format json | jq .parameters
  llmkit info -m ./my-lora-adapter
"""


def info(
    model: ModelOpt = "gpt2",
    fmt: FormatOpt = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offline: OfflineOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Architecture, size, context, vocabulary, dtype and location of a model."""
    from llmkit.cli._options import load_config
    from llmkit.inspect import describe

    check_format(fmt, ("text", "json"))
    details = describe(load_config(model, device, dtype, offline, allow_pickle))
    if fmt == "json":
        out.write_json(details)
        return
    width = max(len(k) for k in details)
    for key, value in details.items():
        out.write(f"{key.replace('_', ' '):<{width}}  {_human(key, value)}\n")


def _human(key: str, value: object) -> str:
    if key in ("parameters", "adapter_parameters") and isinstance(value, int):
        return f"{value:,} ({value / 1e6:.1f}M)"
    if key == "size_on_disk" and isinstance(value, int):
        return f"{value / 2**20:.1f} MiB"
    return str(value)
