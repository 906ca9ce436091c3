"""Fit a run's schedule to a wall-clock budget: measure this machine's seconds per step, then size `steps`.

The cosine schedule needs its length up front, so a time budget is turned into a step count once, before
training starts (a throwaway trainer times copy steps, agent steps, an evaluation and a checkpoint); the
run itself is then an ordinary run of that many steps, reproducible with `--steps N` anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import torch

from model_worker.training.retrieval import retrieval_for
from model_worker.training.trainer import Trainer, TrainSettings, evaluate, held_out_batches

COPY_SAMPLES = 6
AGENT_SAMPLES = 24  # a multiple of full_every, so full- and short-form batches are both in the mean
WARMUP_SAMPLES = 3  # first steps (allocator, kernel compilation, the first chunk) left out of the means
SAFETY = 0.93  # share of the remaining budget planned for: step times vary, and the export comes after


def _seconds_per_step(trainer: Trainer, first_step: int, count: int) -> float:
    trainer.step = first_step
    for _ in range(WARMUP_SAMPLES):
        trainer.train_step()
    _synchronize(trainer.device)
    started = time.perf_counter()
    for _ in range(count):
        trainer.train_step()
    _synchronize(trainer.device)
    return (time.perf_counter() - started) / count


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_for_budget(settings: TrainSettings, seconds: float, note: Callable[[str], None]) -> int:
    """The `steps` a run of `settings` can train within `seconds` from now on this machine (at least the
    copy warm-up plus one agent step). A run already started keeps the steps its state records."""
    state = settings.out_dir / "train_state" / "state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["settings"]["steps"])
    started = time.perf_counter()
    trainer = Trainer(dataclasses.replace(settings, stop_after=None))
    try:
        copy_s = _seconds_per_step(trainer, 0, COPY_SAMPLES)
        agent_s = _seconds_per_step(trainer, settings.copy_warmup_steps, AGENT_SAMPLES)
        tick = time.perf_counter()
        evaluate(trainer.model, held_out_batches(trainer.tokenizer, settings.eval_examples, settings.batch_size,
                                                 retrieval_for(settings.runtime_retrieval)), trainer.formatting)
        eval_s = time.perf_counter() - tick
        tick = time.perf_counter()
        trainer.save_state()
        save_s = time.perf_counter() - tick
    finally:
        trainer.close()
        for name in ("state.json", "weights.safetensors", "optimizer.safetensors"):
            (trainer.state_dir / name).unlink(missing_ok=True)  # a measurement, not a run to resume
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    remaining = SAFETY * (seconds - (time.perf_counter() - started)) - settings.copy_warmup_steps * copy_s
    per_agent_step = agent_s + eval_s / settings.eval_every + save_s / settings.checkpoint_every
    steps = settings.copy_warmup_steps + max(1, int(remaining / per_agent_step))
    note(f"measured: {copy_s * 1000:.0f} ms a copy step, {agent_s * 1000:.0f} ms an agent step, "
         f"{eval_s:.1f} s an evaluation, {save_s:.1f} s a checkpoint -> {steps} steps fit in the budget")
    return steps
