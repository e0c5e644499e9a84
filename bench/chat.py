"""`llmkit chat`'s KV cache across turns (GPT-2 small's shape, CPU, float32): the time of turn N when
the cache of turn N-1 is carried over (only the new message and the template's markers are encoded)
against re-encoding the whole conversation each turn, as a chat without the cache would. Reported per
turn: the time to the reply's first token (what the cache saves: encoding the prompt) and the whole
turn (that plus decoding the reply, the same work both ways).

The template ends every turn with EOS (as ChatML ends it with <|im_end|>), so turn N's prompt starts
with turn N-1's prompt and reply. Replies are greedy and exactly REPLY_TOKENS long, so both ways do
the same decoding work and must write the same text (checked). The two ways alternate, conversation
by conversation, so drift in the machine's speed hits both.
"""

from __future__ import annotations

import os
import random
import statistics

from bench.common import WORDS, describe_machine, gpt2_small, save, table

TURNS = 8
MESSAGE_WORDS = 40  # about 50 tokens a message
REPLY_TOKENS = 8
REPEATS = 2
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)


def messages() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(MESSAGE_WORDS)) + "?" for _ in range(TURNS)]


def main() -> None:
    from llmkit.chat import Chat, LocalChat
    from llmkit.config import GenerateConfig, LoadConfig
    from llmkit.models import load

    print(describe_machine())
    load_before = os.getloadavg()[0]
    print(f"load average (1 min) at the start: {load_before:.2f}")
    lm = load(LoadConfig(model=str(gpt2_small()), dtype="float32"))
    lm.tokenizer.chat_template = TEMPLATE
    cfg = GenerateConfig(
        max_new_tokens=REPLY_TOKENS, min_new_tokens=REPLY_TOKENS, greedy=True, repetition_penalty=1.3
    )
    ways = {"reuse": LocalChat(lm, cfg), "re-encode": LocalChat(lm, cfg, reuse_cache=False)}
    LocalChat(lm, cfg).complete([{"role": "user", "content": "warm up"}], lambda _: None)
    seconds: dict[str, list[list[float]]] = {way: [[] for _ in range(TURNS)] for way in ways}
    first: dict[str, list[list[float]]] = {way: [[] for _ in range(TURNS)] for way in ways}
    texts: dict[str, list[str]] = {}
    prompt_tokens, reused_tokens = [0] * TURNS, [0] * TURNS
    for _ in range(REPEATS):
        for way, backend in ways.items():
            conversation = Chat(backend, system="Answer in one short paragraph.")
            replies = []
            for n, message in enumerate(messages()):
                turn = conversation.send(message, lambda _: None)
                seconds[way][n].append(turn.seconds)
                first[way][n].append(turn.first_token_seconds or 0.0)
                replies.append(turn.text)
                if way == "reuse":
                    prompt_tokens[n], reused_tokens[n] = turn.prompt_tokens, turn.reused_tokens
            texts[way] = replies
            backend._cache, backend._cached_ids = None, []  # the next conversation starts cold
    same = texts["reuse"] == texts["re-encode"]
    med = statistics.median
    rows = [
        (
            "turn",
            "prompt",
            "cached",
            "1st token: reuse",
            "re-encode",
            "ratio",
            "turn: reuse",
            "re-encode",
            "ratio",
        )
    ]
    results = []
    for n in range(TURNS):
        r1, f1 = med(first["reuse"][n]), med(first["re-encode"][n])
        rt, ft = med(seconds["reuse"][n]), med(seconds["re-encode"][n])
        rows.append(
            (
                str(n + 1),
                str(prompt_tokens[n]),
                str(reused_tokens[n]),
                f"{r1:.3f}s",
                f"{f1:.3f}s",
                f"{f1 / r1:.2f}x",
                f"{rt:.3f}s",
                f"{ft:.3f}s",
                f"{ft / rt:.2f}x",
            )
        )
        results.append(
            {
                "turn": n + 1,
                "prompt_tokens": prompt_tokens[n],
                "reused_tokens": reused_tokens[n],
                "first_token_s": {"reuse": first["reuse"][n], "re_encode": first["re-encode"][n]},
                "turn_s": {"reuse": seconds["reuse"][n], "re_encode": seconds["re-encode"][n]},
                "first_token_speedup": round(f1 / r1, 3),
                "turn_speedup": round(ft / rt, 3),
            }
        )
    print(table(rows))
    print(f"same replies both ways: {'yes' if same else 'NO'}")
    total = {way: sum(med(s) for s in seconds[way]) for way in ways}
    print(
        f"whole conversation ({TURNS} turns, {REPLY_TOKENS} tokens a reply): reuse {total['reuse']:.2f}s, "
        f"re-encode {total['re-encode']:.2f}s ({total['re-encode'] / total['reuse']:.2f}x)"
    )
    path = save(
        "chat",
        {
            "model": "GPT-2 small's shape (124M, random weights), float32",
            "load_average_at_start": round(load_before, 2),
            "turns": TURNS,
            "reply_tokens": REPLY_TOKENS,
            "repeats": REPEATS,
            "same_replies": same,
            "per_turn": results,
            "whole_conversation_s": {way: round(t, 3) for way, t in total.items()},
        },
    )
    print(f"wrote {path}")
    if not same:
        raise SystemExit("the replies differ: the cache changed the result")


if __name__ == "__main__":
    main()
