"""lm-evaluation-harness scores a multiple-choice task through `llmkit serve` as its own `hf` model does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serving import Server

QUESTIONS = [
    ("The cat sees the", ["moon.", "sea.", "green hill."], 0),
    ("A dog likes", ["the sea.", "a red apple.", "her brother."], 1),
    ("My friend remembers", ["a quiet song.", "the moon."], 0),
    ("The old king waits for", ["the queen.", "a small bird.", "the river.", "a dog."], 2),
]


def write_task(where: Path) -> Path:
    data = where / "mc.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    (where / "llmkit_mc.yaml").write_text(
        "task: llmkit_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return where


def loglikelihoods(model: str, model_args: dict, tasks: Path) -> list[list[float]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["llmkit_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        batch_size=1,
    )
    samples = sorted(results["samples"]["llmkit_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


@pytest.mark.slow
def test_lm_eval_local_completions_matches_hf(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = write_task(tmp_path)
    server = Server("-m", tiny_model)
    try:
        served = loglikelihoods(
            "local-completions",
            {
                "base_url": f"{server.url}/v1/completions",
                "model": str(tiny_model),
                "tokenizer": str(tiny_model),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "num_concurrent": 1,
                "max_retries": 1,
            },
            tasks,
        )
    finally:
        assert server.stop() == 143
    local = loglikelihoods("hf", {"pretrained": str(tiny_model), "device": "cpu", "dtype": "float32"}, tasks)
    assert [len(x) for x in served] == [len(c) for _, c, _ in QUESTIONS]
    for got, want in zip(served, local, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    assert all(v < 0 for row in served for v in row)  # real scores, not zeros
