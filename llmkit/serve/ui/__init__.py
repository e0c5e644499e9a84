"""The playground `llmkit serve` shows at /: one static page (playground.html), served as is."""

from __future__ import annotations

from importlib.resources import files

# The page talks to its own server only and shows model output as text: the policy makes that a rule
# the browser enforces, should a bug ever let text through as markup.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page() -> str:
    return files(__name__).joinpath("playground.html").read_text(encoding="utf-8")
