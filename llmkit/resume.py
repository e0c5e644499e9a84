"""What may differ between a run and the checkpoint it resumes from."""

from __future__ import annotations

from typing import Any

from llmkit.errors import UsageError

# Settings that change nothing about the weights a run produces: allowed to differ with --force.
SAFE = {
    "eval_every",
    "sample_every",
    "sample_prompt",
    "sample_tokens",
    "log_every",
    "save_every",
    "keep",
    "keep_best",
    "report_to",
    "num_proc",
    "cache_dir",
    "no_cache",
    "device",
    "max_bad_steps",
    "gradient_checkpointing",
    "compile",
    "offline",
    "allow_pickle",
    "overwrite",
    "save_dtype",
    "merge",  # how OUT is written at the end (adapter or merged model), not what is trained
}
# Not settings of the run at all (where it is, how it was started); the data is compared by fingerprint.
IGNORED = {"output", "resume", "resume_from", "force", "data", "val_file"}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(unsafe, safe) differences, each as 'name: saved → current'."""
    from dataclasses import MISSING, fields

    from llmkit.config import TrainConfig

    # A setting added after the checkpoint was written counts as its default there.
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    saved = {**defaults, **saved}
    unsafe, safe = [], []
    for key in sorted(set(saved) | set(current)):
        if key in IGNORED or saved.get(key) == current.get(key):
            continue
        line = f"{key.replace('_', '-')}: {saved.get(key)!r} → {current.get(key)!r}"
        (safe if key in SAFE else unsafe).append(line)
    return unsafe, safe


def check(
    saved_state: dict[str, Any], current_config: dict[str, Any], fingerprint: str, processes: int, force: bool
) -> list[str]:
    """Raise on differences that would make the resumed run a different run; return the tolerated ones."""
    unsafe, safe = differences(saved_state["config"], current_config)
    if saved_state["fingerprint"] != fingerprint:
        unsafe.insert(0, "the training data (its content fingerprint differs)")
    if saved_state["processes"] != processes:
        unsafe.append(f"processes: {saved_state['processes']} → {processes}")
    if unsafe:
        raise UsageError(
            "cannot resume: this run differs from the checkpoint in " + "; ".join(unsafe),
            "resume with the settings and data of the original run, or start a new run",
        )
    if safe and not force:
        raise UsageError(
            "this run differs from the checkpoint in " + "; ".join(safe),
            "these can safely change: pass --force to resume with them",
        )
    return safe
