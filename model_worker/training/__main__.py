"""`python -m model_worker.training --out DIR`: train the demo agent model from scratch (or resume).

Writes a servable checkpoint (config, weights, FP8 Engram tables, tokenizer) to DIR, plus
DIR/training.json with the settings and the held-out figures; DIR/train_state holds what a resumed
run needs. The defaults reproduce the shipped checkpoint (model_worker/demo_model).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from model_worker.training.trainer import Trainer, TrainSettings


def main(argv: list[str] | None = None) -> int:
    defaults = TrainSettings(out_dir=Path("."))
    parser = argparse.ArgumentParser(prog="python -m model_worker.training", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory (resumed if it holds a run)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop and export at this step of the --steps schedule (a later one goes on)")
    parser.add_argument("--no-engram", action="store_true", help="ablation: no Engram layers")
    parser.add_argument("--mhc", action="store_true", help="ablation: mHC (4 streams) instead of the plain residual")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or (args.stop_after is not None and args.stop_after < 1):
        parser.error("--steps, --batch-size and --stop-after must be positive")
    torch.set_num_threads(max(1, args.threads))
    settings = TrainSettings(out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, eval_every=args.eval_every, engram=not args.no_engram,
                             mhc=args.mhc, stop_after=args.stop_after)
    print(f"training into {args.out} ({settings.steps} steps of {settings.batch_size}, seed {settings.seed})",
          file=sys.stderr, flush=True)
    try:
        Trainer(settings).run()
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
