"""`llmkit chat`: the REPL through a real pseudo-terminal, piped conversations, the KV cache across
turns, --server, a full context and a model without a chat template."""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from serving import Server, with_chat_template

# Greedy with a repetition penalty: the tiny random model then writes varied text rather than one
# token over and over, so a wrong logit anywhere shows up as a different reply.
GREEDY = ("--greedy", "--repetition-penalty", "2")
# A template that ends every turn with EOS, as ChatML ends it with <|im_end|>: turn N+1's prompt then
# starts with turn N's prompt and reply, and the cache carries all of it.
EOS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The cat sees the moon."},
    {"role": "assistant", "content": "A dog likes the sea."},
    {"role": "user", "content": "The old king?"},
]


@pytest.fixture(scope="module")
def chat_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_chat_template(tiny_model, tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def eos_chat_model(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    out = tmp_path_factory.mktemp("chat") / "tiny-eos-chat"
    shutil.copytree(chat_model, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": EOS_TEMPLATE}))
    return out


def jsonl(messages: list[dict[str, str]]) -> str:
    return "".join(json.dumps(m) + "\n" for m in messages)


def transformers_reply(model_dir: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """Plain transformers: greedy generate on apply_chat_template's ids, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=2.0,
            pad_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


# -- the REPL on a real terminal -------------------------------------------------------------------
class Terminal:
    """`llmkit chat` on a pseudo-terminal that is its controlling terminal: Ctrl-C is a real SIGINT."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        self.fd, self.seen = master, b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmkit", "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        )
        os.close(slave)

    def read_until(self, text: str, timeout: float = 60) -> str:
        """Everything up to and including `text`, waiting at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {text!r} within {timeout}s; the terminal shows:\n{self.seen!r}")
            try:
                self.seen += os.read(self.fd, 4096)
            except OSError:  # the other end closed: the program has exited
                raise AssertionError(f"exited before {text!r}; the terminal shows:\n{self.seen!r}") from None
        end = self.seen.index(text.encode()) + len(text)
        got, self.seen = self.seen[:end], self.seen[end:]
        return got.decode("utf-8", errors="replace")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.fd)


def test_repl_streams_cancels_with_ctrl_c_and_goes_on(chat_model: Path, tmp_path: Path) -> None:
    # 0.1 s a token: a 40-token reply takes 4 s, time to see it stream and press Ctrl-C in the middle.
    term = Terminal("-m", str(chat_model), "-n", "40", *GREEDY, env={"LLMKIT_TEST_STEP_DELAY": "0.1"})
    try:
        assert "/help" in term.read_until(">>> ")
        term.type("The cat sees the moon.\n")
        term.read_until("The cat sees the moon.\r\n")  # the terminal's echo
        # Streamed: text arrives while the reply is still being written.
        select.select([term.fd], [], [], 30)
        time.sleep(0.3)
        pressed = time.monotonic()
        term.type("\x03")
        partial = term.read_until("(reply cancelled")
        assert time.monotonic() - pressed < 2.5, "Ctrl-C did not stop the reply"
        streamed = partial.split("(reply cancelled")[0].replace("^C", "")
        assert streamed.strip(), "nothing was streamed before Ctrl-C"
        term.read_until(">>> ")

        term.type("/system Answer briefly.\n")
        term.read_until("(system message set)")
        term.read_until(">>> ")
        term.type("A dog \\\n")  # a trailing backslash continues the message on the next line
        term.read_until("... ")
        term.type("likes the sea.\n")
        assert "reply cut at --max-new-tokens 40" in term.read_until(">>> ")
        saved = tmp_path / "chat.jsonl"
        term.type(f"/save {saved}\n")
        term.read_until("(saved 3 message(s)")
        term.read_until(">>> ")
        term.type("/reset\n")
        term.read_until("(conversation cleared)")
        term.read_until(">>> ")
        term.type(f"/save {tmp_path / 'after-reset.jsonl'}\n")
        term.read_until(">>> ")
        term.type("/exit\n")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    messages = [json.loads(line) for line in saved.read_text().splitlines()]
    # The cancelled turn left nothing behind: the system message, the second message, its reply.
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "Answer briefly."
    assert messages[1]["content"] == "A dog \nlikes the sea."
    expected = transformers_reply(chat_model, messages[:2], 40)
    assert messages[2]["content"] == expected
    assert [json.loads(line) for line in (tmp_path / "after-reset.jsonl").read_text().splitlines()] == [
        {"role": "system", "content": "Answer briefly."}
    ]


# -- piped input -----------------------------------------------------------------------------------
def test_piped_conversation_gets_transformers_greedy_reply(cli, chat_model: Path) -> None:
    result = cli("chat", "-m", chat_model, "-n", "20", *GREEDY, input=jsonl(CONVERSATION))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == transformers_reply(chat_model, CONVERSATION, 20) + "\n"
    assert result.stderr == ""  # off a terminal, nothing to say

    plain = cli("chat", "-m", chat_model, "-n", "20", *GREEDY, "--system", "Be brief.", input="The cat?\n")
    assert plain.exit_code == 0, plain.stderr
    one_turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat?"}]
    assert plain.stdout == transformers_reply(chat_model, one_turn, 20) + "\n"


def test_default_reply_length_fits_a_small_context(cli, chat_model: Path) -> None:
    """The 256-token default is not the user's choice: a 128-token model replies in up to 32."""
    result = cli("chat", "-m", chat_model, *GREEDY, input=jsonl(CONVERSATION))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == transformers_reply(chat_model, CONVERSATION, 32) + "\n"
    asked = cli("chat", "-m", chat_model, "-n", "256", *GREEDY, input=jsonl(CONVERSATION))
    assert asked.exit_code == 2
    assert "leaves no room for a prompt" in asked.stderr


def test_broken_conversation_is_refused_before_loading(cli, chat_model: Path) -> None:
    result = cli("chat", "-m", chat_model, input='{"role": "user", "content": "Hi"}\n{"role": "user"}\n')
    assert result.exit_code == 1
    assert result.stderr.startswith('Error: stdin line 2: a message needs a "role" and a "content"')


def test_a_full_context_is_said_and_drop_oldest_drops(cli, chat_model: Path) -> None:
    long = [{"role": "system", "content": "Be brief."}]
    for k in range(6):
        long += [
            {"role": "user", "content": f"The cat sees the moon {k}."},
            {"role": "assistant", "content": "A dog likes the sea."},
        ]
    long.append({"role": "user", "content": "The old king?"})
    full = cli("chat", "-m", chat_model, "-n", "20", *GREEDY, input=jsonl(long))
    assert full.exit_code == 1
    assert full.stderr.startswith("Error: the conversation is full: its ")
    assert "exceed the model's context of 128 tokens" in full.stderr and "--drop-oldest" in full.stderr

    dropped = cli("chat", "-m", chat_model, "-n", "20", *GREEDY, "--drop-oldest", input=jsonl(long))
    assert dropped.exit_code == 0, dropped.stderr
    gone = int(dropped.stderr.split("dropped the ")[1].split()[0])
    assert gone % 2 == 0 and 0 < gone < len(long) - 2
    kept = [long[0], *long[1 + gone :]]  # the system message stays; whole exchanges go, oldest first
    assert dropped.stdout == transformers_reply(chat_model, kept, 20) + "\n"


def test_a_model_without_a_chat_template_is_one_error(cli, tiny_model: Path) -> None:
    result = cli("chat", "-m", tiny_model, input="Hello\n")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"Error: {tiny_model}: this model's tokenizer has no chat template"
    assert lines[1].startswith("Hint: pass --chat-template chatml") and len(lines) == 2


# -- the KV cache across turns ---------------------------------------------------------------------
@pytest.mark.parametrize("template", ["eos", "plain"])
def test_reusing_the_cache_gives_the_replies_of_re_encoding(
    template: str, chat_model: Path, eos_chat_model: Path
) -> None:
    from llmkit.chat import Chat, LocalChat
    from llmkit.config import GenerateConfig, LoadConfig
    from llmkit.models import load

    lm = load(LoadConfig(model=str(eos_chat_model if template == "eos" else chat_model), dtype="float32"))
    cfg = GenerateConfig(max_new_tokens=12, greedy=True, repetition_penalty=2.0)
    reused = Chat(LocalChat(lm, cfg), system="Be brief.")
    fresh = Chat(LocalChat(lm, cfg, reuse_cache=False), system="Be brief.")
    for n, message in enumerate(["The cat.", "A dog?", "The sea."]):
        if n == 2:
            reused.reset()  # a shorter conversation: the cache is cut back to what still matches
            fresh.reset()
        a, b = reused.send(message, lambda _: None), fresh.send(message, lambda _: None)
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
        assert b.reused_tokens == 0
        if n == 0:
            first_prompt, first_reply = a.prompt_tokens, a.completion_tokens
            assert a.reused_tokens == 0
        elif n == 1 and template == "eos":
            # At most what the last turn computed (its prompt, its reply but the last token); less
            # where the reply's text doesn't encode back to the same ids (a random model's broken UTF-8).
            assert first_prompt <= a.reused_tokens <= first_prompt + first_reply - 1
        else:
            assert 0 < a.reused_tokens < a.prompt_tokens
    assert reused.messages == fresh.messages


# -- a running server ------------------------------------------------------------------------------
def test_server_chat_is_the_local_chat_without_torch(cli, chat_model: Path) -> None:
    local = cli("chat", "-m", chat_model, "-n", "20", *GREEDY, input=jsonl(CONVERSATION))
    assert local.exit_code == 0, local.stderr
    server = Server("-m", chat_model)
    try:
        code = (
            "import sys\n"
            f"sys.argv = ['llmkit', 'chat', '--server', {server.url!r}, '-n', '20', *{list(GREEDY)!r}]\n"
            "from llmkit.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
        )
        remote = subprocess.run(
            [sys.executable, "-c", code],
            input=jsonl(CONVERSATION).encode(),
            capture_output=True,  # bytes: text mode would turn a generated "\r" into "\n"
            timeout=60,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    finally:
        server.stop()
    assert b"TORCH False" in remote.stderr, remote.stderr.decode()
    assert remote.stdout.decode() == local.stdout


def test_chat_help_stays_light() -> None:
    code = (
        "import sys\nsys.argv = ['llmkit', 'chat', '--help']\nfrom llmkit.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "--drop-oldest" in result.stdout and "Examples:" in result.stdout
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
