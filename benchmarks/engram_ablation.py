"""Ablation of the demo agent model: the same training budget with and without Engram, and with mHC vs a
plain residual stream; held-out loss, held-out exact sessions, and task success through the full runtime.

Each variant trains from scratch with the same seed, settings and data stream (`python -m
model_worker.training`, one process per variant, with --no-engram / --mhc), then runs the same held-out
agent tasks through LocalRuntime (`runtime.evaluation`). The budget is the same for every variant: `--steps`,
or with `--time-budget` the same wall-clock seconds (each run measures its own step time, so a cheaper
variant gets more steps: equal compute, not equal steps). `--parallel` trains the variants at once (a GPU
has room for several runs of this size); `--repeat` trains the shipped variant a second time with the same
seed, to show what the re-train command reproduces. Run directories are kept: a finished run is only
re-evaluated, an interrupted one resumes.

    python benchmarks/engram_ablation.py [--steps 300] [--tasks 40] [--out .engram/ablation]
    python benchmarks/engram_ablation.py --device cuda --precision bf16 --workers 3 --parallel \\
        --time-budget 430 --repeat --tasks 0        # on a GPU machine; evaluate the checkpoints later
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {  # flag -> (label, engram, mhc); the first is the shipped architecture
    "engram-plain": ("Engram, plain residual (shipped)", True, False),
    "no-engram": ("no Engram, plain residual", False, False),
    "engram-mhc": ("Engram + mHC (4 streams)", True, True),
}
POLL_SECONDS = 30
TRAINING_FLAGS = ("batch_size", "short_batch_size", "copy_batch_size", "checkpoint_every", "eval_every",
                  "eval_examples", "device", "precision", "workers", "seed")


def training_command(args: argparse.Namespace, out: Path, engram: bool, mhc: bool) -> list[str]:
    command = [sys.executable, "-m", "model_worker.training", "--out", str(out)]
    for flag in TRAINING_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    command += ["--time-budget", str(args.time_budget)] if args.time_budget else ["--steps", str(args.steps)]
    command += ["--threads", str(args.threads)]
    return command + (["--no-engram"] if not engram else []) + (["--mhc"] if mhc else [])


def run_all(runs: list[tuple[str, Path, list[str]]], parallel: bool) -> list[str]:
    """Start the training processes (all at once, or one after another), each logging to out/train.log; print
    each one's latest progress line every POLL_SECONDS. Returns the names of the runs that failed (the others
    still run to the end)."""
    pending, failed = list(runs), []
    active: list[tuple[str, Path, subprocess.Popen]] = []
    while pending or active:
        while pending and (parallel or not active):
            name, out, command = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = (out / "train.log").open("a")
            print(f"  [{name}] {' '.join(command[1:])}", flush=True)
            active.append((name, out, subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(POLL_SECONDS if parallel else 2.0)
        for name, out, process in list(active):
            lines = (out / "train.log").read_text(errors="replace").strip().splitlines()
            if lines:
                print(f"  [{name}] {lines[-1][:150]}", flush=True)
            if process.poll() is not None:
                active.remove((name, out, process))
                if process.returncode != 0:
                    print(f"  [{name}] FAILED (exit {process.returncode}); see {out / 'train.log'}", flush=True)
                    failed.append(name)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per variant (same for all)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="instead of --steps: the same wall-clock seconds of training per variant")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--repeat", action="store_true", help="train the first variant twice (same seed)")
    parser.add_argument("--parallel", action="store_true", help="train the variants at once (a GPU)")
    parser.add_argument("--tasks", type=int, default=40, help="held-out agent tasks per variant (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: CPUs / runs)")
    parser.add_argument("--out", type=Path, default=Path(".engram/ablation"))
    for flag in TRAINING_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", default=None)
    args = parser.parse_args()
    variants = list(args.variants) + ([args.variants[0]] if args.repeat else [])
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // (len(variants) if args.parallel else 1))
    budget = f"{args.time_budget:.0f} s of training" if args.time_budget else f"{args.steps} steps"
    print(f"host: {platform.machine()}, {os.cpu_count()} CPUs, device {args.device or 'cpu'}; {budget} per variant, "
          f"seed {args.seed or 0}, {'in parallel' if args.parallel else 'one after another'}", flush=True)
    tag = f"t{args.time_budget:.0f}" if args.time_budget else f"s{args.steps}"
    runs, seen = [], {}
    for flag in variants:
        label, engram, mhc = VARIANTS[flag]
        seen[flag] = seen.get(flag, 0) + 1
        name = label if seen[flag] == 1 else f"{label}, again"
        out = args.out / (f"{flag}-{tag}-seed{args.seed or 0}" + ("" if seen[flag] == 1 else "-again"))
        runs.append((name, out, training_command(args, out, engram, mhc)))
    failed = run_all([run for run in runs if not (run[1] / "training.json").is_file()], args.parallel)
    rows = []
    for name, out, _ in runs:
        if name in failed:
            continue
        figures = json.loads((out / "training.json").read_text())
        success = None
        if args.tasks > 0:
            from runtime.evaluation import evaluate_agent, held_out_tasks  # the full runtime: only when asked

            report = asyncio.run(evaluate_agent(out, held_out_tasks(args.tasks)))
            success = report.success_rate
            kinds = ", ".join(f"{kind} {right}/{total}" for kind, (right, total) in sorted(report.by_kind().items()))
            print(f"  [{name}] tasks {success:.0%} ({kinds})", flush=True)
        rows.append((name, figures, success))
    print()
    print(f"{'variant':<40} {'steps':>6} {'held-out loss':>14} {'copied':>7} {'exact sessions':>15} {'tasks':>6} "
          f"{'train s':>8}")
    for name, f, success in rows:
        tasks = "-" if success is None else f"{success:.0%}"
        print(f"{name:<40} {f.get('steps_done', f['settings']['steps']):>6} {f['held_out_loss']:>14.3f} "
              f"{f['held_out_copy']:>7.0%} {f['held_out_exact']:>15.0%} {tasks:>6} {f['seconds_this_run']:>8.0f}")
    base = rows[0][1] if rows and runs[0][0] not in failed else None
    for name, f, _ in rows[1:] if base else []:
        print(f"{name}: held-out loss {f['held_out_loss'] / base['held_out_loss']:.2f}x the shipped variant's, "
              f"exact sessions {100 * (f['held_out_exact'] - base['held_out_exact']):+.0f} points")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
