"""Ablation of the demo agent model: the same training budget with and without Engram, and with mHC vs a
plain residual stream; held-out loss, held-out exact actions, and task success through the full runtime.

Each variant trains from scratch with the same seed, steps, batch size and data stream
(`python -m model_worker.training` with --no-engram / --no-mhc), then runs the same held-out agent tasks
through LocalRuntime (`runtime.evaluation`). Run directories are kept (resumable: a finished one is
only re-evaluated), so an interrupted benchmark continues where it stopped.

    python benchmarks/engram_ablation.py [--steps 300] [--tasks 40] [--out .engram/ablation]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from model_worker.training.trainer import Trainer, TrainSettings  # noqa: E402
from runtime.evaluation import evaluate_agent, held_out_tasks  # noqa: E402

VARIANTS = {  # name -> (engram, mhc)
    "Engram + mHC (shipped architecture)": (True, True),
    "no Engram, mHC": (False, True),
    "Engram, plain residual": (True, False),
}


class _Quiet:
    """Progress for a benchmark: a line every 50 steps."""

    def __init__(self, name: str):
        self.name = name

    def note(self, text: str) -> None:
        print(f"  [{self.name}] {text}", flush=True)

    def step(self, step: int, loss: float, tokens_per_s: float, entry: dict) -> None:
        if step % 50 == 0:
            print(f"  [{self.name}] step {step} loss {loss:.3f} ({tokens_per_s:,.0f} tok/s)", flush=True)

    def done(self, result) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per variant (same for all)")
    parser.add_argument("--batch-size", type=int, default=TrainSettings(out_dir=Path(".")).batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=40, help="held-out agent tasks per variant")
    parser.add_argument("--out", type=Path, default=Path(".engram/ablation"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"host: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{args.steps} steps of {args.batch_size} sessions per variant, seed {args.seed}, {args.tasks} tasks")
    tasks = held_out_tasks(args.tasks)
    rows = []
    for name, (engram, mhc) in VARIANTS.items():
        slug = f"engram{int(engram)}-mhc{int(mhc)}-s{args.steps}-b{args.batch_size}-seed{args.seed}"
        settings = TrainSettings(out_dir=args.out / slug, steps=args.steps, batch_size=args.batch_size,
                                 seed=args.seed, engram=engram, mhc=mhc, eval_every=max(1, args.steps))
        started = time.perf_counter()
        trainer = Trainer(settings, log=_Quiet(name))
        params = sum(p.numel() for p in trainer.params.values())  # Engram table rows included
        result = trainer.run()
        trained = time.perf_counter() - started
        report = asyncio.run(evaluate_agent(settings.out_dir, tasks))
        rows.append((name, params, result.held_out_loss, result.held_out_exact, report.success_rate,
                     report.all_actions_valid, trained))
        print(f"  [{name}] held-out loss {result.held_out_loss:.3f}, tasks {report.success_rate:.0%} "
              f"({', '.join(f'{k} {r}/{t}' for k, (r, t) in sorted(report.by_kind().items()))})", flush=True)
    print()
    print(f"{'variant':<38} {'params':>8} {'held-out loss':>14} {'exact actions':>14} {'task success':>13} "
          f"{'valid':>6} {'train s':>8}")
    for name, params, loss, exact, success, valid, seconds in rows:
        print(f"{name:<38} {params / 1e6:>7.2f}M {loss:>14.3f} {exact:>14.0%} {success:>13.0%} "
              f"{'yes' if valid else 'NO':>6} {seconds:>8.0f}")
    base = rows[0]
    for name, _, loss, _, success, _, _ in rows[1:]:
        print(f"{name}: held-out loss {loss / base[2]:.2f}x the shipped architecture's, "
              f"task success {success - base[4]:+.0%} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
