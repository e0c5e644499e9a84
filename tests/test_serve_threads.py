"""The serving engine's thread count per batch size: measured, then fixed, and really applied."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from llmkit.serve.sampling import SamplingParams
from llmkit.serve.threads import ThreadTuner, bucket


def test_batch_sizes_share_a_choice_by_power_of_two() -> None:
    assert [bucket(n) for n in (1, 2, 3, 4, 7, 8, 15, 16)] == [1, 2, 2, 3, 3, 4, 4, 5]


def test_the_tuner_alternates_then_keeps_the_faster_count_for_good() -> None:
    tuner = ThreadTuner(4, trials=3)
    seen = []
    for _ in range(6):
        threads = tuner.choose(1)
        seen.append(threads)
        tuner.record(1, threads, 0.010 if threads == 1 else 0.020)
    assert sorted(seen) == [1, 1, 1, 4, 4, 4] and seen[:2] in ([4, 1], [1, 4])
    assert tuner.choose(1) == 1 and tuner.choices() == {"1": 1}
    tuner.record(1, 1, 99.0)  # once chosen, later times change nothing
    assert tuner.choose(1) == 1
    # Another batch size measures for itself, and can come out the other way.
    for _ in range(6):
        threads = tuner.choose(12)
        tuner.record(12, threads, 0.030 if threads == 1 else 0.015)
    assert tuner.choose(9) == 4 and tuner.choices() == {"1": 1, "8-15": 4}


def test_one_core_leaves_nothing_to_choose() -> None:
    tuner = ThreadTuner(1)
    assert tuner.candidates == (1,) and tuner.choose(16) == 1
    tuner.record(16, 1, 0.01)
    assert tuner.choices() == {"16-31": 1}


def test_decoding_steps_run_at_the_tuners_thread_count(tiny_model: Path, monkeypatch) -> None:
    from llmkit.config import LoadConfig
    from llmkit.models import load
    from llmkit.serve.engine import Engine

    class Scripted(ThreadTuner):
        """Asks for 2 threads, then 1, then 2 …; keeps what it was told."""

        def __init__(self) -> None:
            super().__init__(2, trials=1000)
            self.asked: list[int] = []
            self.recorded: list[tuple[int, int, float]] = []

        def choose(self, rows: int) -> int:
            self.asked.append(rows)
            return 2 if len(self.asked) % 2 else 1

        def record(self, rows: int, threads: int, seconds: float) -> None:
            self.recorded.append((rows, threads, seconds))

    tuner = Scripted()
    engine = Engine(load(LoadConfig(model=str(tiny_model))), max_batch=4, tuner=tuner)
    real, used = engine.model, []

    def model(**kwargs):
        used.append((kwargs["input_ids"].shape[1], torch.get_num_threads()))
        return real(**kwargs)

    monkeypatch.setattr(engine, "model", model)
    done = threading.Event()
    engine.start()
    try:
        params = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0)
        seq = engine.sequence([5, 6, 7], params, lambda c: done.set() if c.finish_reason else None)
        engine.submit([seq])
        assert done.wait(60)
    finally:
        engine.stop()
    prefill, *steps = used
    assert prefill == (3, 2)  # prompts are prefilled on every thread
    # The prefill's step decodes too (on every thread, untimed); then each step asks the tuner.
    decode_threads = [threads for _, threads in steps[1:]]
    assert len(decode_threads) == len(tuner.asked) == len(tuner.recorded) == 6
    assert decode_threads == [2 if k % 2 == 0 else 1 for k in range(6)]
    assert [(r, t) for r, t, _ in tuner.recorded] == [(1, t) for t in decode_threads]
    assert all(seconds > 0 for _, _, seconds in tuner.recorded)


def test_the_chosen_counts_are_reported_and_leave_greedy_text_alone(tiny_model: Path) -> None:
    from llmkit.config import LoadConfig
    from llmkit.models import load
    from llmkit.serve.engine import Engine

    def tokens(tuner: ThreadTuner) -> tuple[list[int], dict]:
        engine = Engine(load(LoadConfig(model=str(tiny_model))), max_batch=4, tuner=tuner)
        got, done = [], threading.Event()

        def deliver(chunk) -> None:
            got.extend(t.id for t in chunk.tokens)
            if chunk.finish_reason:
                done.set()

        engine.start()
        try:
            params = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)
            engine.submit([engine.sequence([5, 6, 7], params, deliver)])
            assert done.wait(60)
        finally:
            engine.stop()
        return got, engine.stats()["threads"]

    tuned, choices = tokens(ThreadTuner(2, trials=3))
    single, _ = tokens(ThreadTuner(1))
    assert tuned == single
    assert set(choices) == {"1"} and choices["1"] in (1, 2)


def test_the_environment_can_pin_the_count() -> None:
    import pytest

    from llmkit.errors import UsageError
    from llmkit.serve.threads import for_engine

    assert for_engine(2, {}).candidates == (1, 2)
    assert for_engine(2, {"LLMKIT_SERVE_THREADS": "auto"}).candidates == (1, 2)
    pinned = for_engine(2, {"LLMKIT_SERVE_THREADS": "2"})
    assert pinned.candidates == (2,) and pinned.choose(1) == 2 and pinned.choose(16) == 2
    with pytest.raises(UsageError, match="LLMKIT_SERVE_THREADS"):
        for_engine(2, {"LLMKIT_SERVE_THREADS": "many"})


def test_sizes_whose_answer_follows_from_others_are_not_measured() -> None:
    tuner = ThreadTuner(2, trials=2)
    for _ in range(4):  # 4-7 rows: two threads measured faster
        threads = tuner.choose(5)
        tuner.record(5, threads, 0.01 if threads == 2 else 0.02)
    assert tuner.choose(9) == 2 and tuner.choose(16) == 2  # more rows: every thread, unmeasured
    assert tuner.choices() == {"4-7": 2, "8-15": 2, "16-31": 2}
    for _ in range(4):  # one row: one thread measured faster
        threads = tuner.choose(1)
        tuner.record(1, threads, 0.01 if threads == 1 else 0.02)
    assert tuner.choices()["1"] == 1
    # 2-3 rows lie between a size that chose one thread and one that chose two: every thread.
    assert tuner.choose(2) == 2 and tuner.choices()["2-3"] == 2
    fresh = ThreadTuner(2, trials=2)
    fresh.record(1, fresh.choose(1), 0.01)
    assert fresh.choose(3) in (1, 2) and "2-3" not in fresh.choices()  # nothing above it known: measured
    one_core_down = ThreadTuner(2, trials=2)
    for _ in range(4):  # 16 rows chose one thread: fewer rows take one too
        threads = one_core_down.choose(16)
        one_core_down.record(16, threads, 0.01 if threads == 1 else 0.02)
    assert one_core_down.choose(1) == 1 and one_core_down.choose(6) == 1
