"""`python -m model_worker.training --out DIR`: train the demo agent model from scratch (or resume).

Writes a servable checkpoint (config, weights, FP8 Engram tables, tokenizer) to DIR, plus
DIR/training.json with the settings and the held-out figures; DIR/train_state holds what a resumed
run needs. The shipped checkpoint (model_worker/demo_model) was trained on a GPU by
scripts/train_demo_gpu.sh and one continuation run; its MODEL_CARD.md has the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from model_worker.training.budget import steps_for_budget
from model_worker.training.traces import KIND_WEIGHTS, KINDS, AnswerForms
from model_worker.training.trainer import PRECISIONS, Trainer, TrainSettings


def _kind_weights(text: str) -> tuple[float, ...]:
    """"remember=3,recall=2" -> one weight per traces.KINDS (the defaults where a kind is not named)."""
    weights = dict(zip(KINDS, KIND_WEIGHTS, strict=True))
    for part in filter(None, text.split(",")):
        kind, _, value = part.partition("=")
        if kind.strip() not in weights:
            raise argparse.ArgumentTypeError(f"unknown kind {kind.strip()!r} (kinds: {', '.join(KINDS)})")
        try:
            weights[kind.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected KIND=WEIGHT with a number") from None
        if weights[kind.strip()] < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: a weight must not be negative")
    return tuple(weights[kind] for kind in KINDS)


def _share(text: str) -> float:
    """A share of sessions in [0, 1]."""
    try:
        share = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a share between 0 and 1") from None
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a share must be between 0 and 1")
    return share


def _piece_count(text: str) -> int:
    """Tokens in a made-up word, at most: a whole number from 1 to 12."""
    if not text.isdigit() or not 1 <= int(text) <= 12:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number from 1 to 12")
    return int(text)


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
    parser.add_argument("--short-batch-size", type=int, default=defaults.short_batch_size)
    parser.add_argument("--copy-batch-size", type=int, default=defaults.copy_batch_size)
    parser.add_argument("--question-batch-size", type=int, default=defaults.question_batch_size,
                        help="sequences of question groups (one question answered from the memory block, by "
                             "search, and refused, side by side) added to every agent step (0: none)")
    parser.add_argument("--question-follow-ups", action="store_true",
                        help="question batches also hold each group's last step after its search (answer from the "
                             "hits, also after a cautious search, or say there is none)")
    parser.add_argument("--runtime-retrieval", type=_share, nargs="?", const=1.0, default=0.0, metavar="SHARE",
                        help="simulated sessions rank memories with the runtime's own embedder (all-MiniLM-L6-v2), "
                             "as the runtime's retrieval does, not by word overlap (the data of runs before it); "
                             "with SHARE in (0, 1), that share of sessions does and the rest use word overlap")
    parser.add_argument("--same-form-results", type=_share, default=0.0, metavar="SHARE",
                        help="that share of arithmetic sessions has a saved result of the same form in memory "
                             "('17 times 23 is 391.' and its session's summary, asked 'What is 12 times 11?'), as "
                             "after the quickstart; the calculator must answer it (0: the data of runs before it)")
    parser.add_argument("--saved-results", type=_share, default=0.0, metavar="SHARE",
                        help="that share of remember and question sessions has a computed and saved result in "
                             "memory (the result and its session's summary, as `make demo` leaves them); asked to "
                             "remember a fact, the model must not blend the two (0: the data of runs before it)")
    parser.add_argument("--found-prefix", default=defaults.found_prefix, metavar="TEXT",
                        help="what an answer from a memory search's hits opens with, e.g. 'From memory: ' (a fixed "
                             "first word decides found against 'I have no memory of ...' before a name is copied; "
                             "default '': the bare sentence, the data of runs before it)")
    parser.add_argument("--refusal", default=defaults.refusal, metavar="TEXT",
                        help="the answer when a memory search finds nothing, with {key} where the asked key goes and "
                             "'no memory' in it; '{key}: I have no memory of it.' makes the model write the key "
                             "first, so found and not found part right after it (default: the data of runs before it)")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--eval-examples", type=int, default=defaults.eval_examples,
                        help="held-out sessions scored at each evaluation")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default=defaults.device, help="cpu (default) or cuda")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="bf16: bf16 autocast for the forward pass (for GPUs)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="processes preparing batches ahead (use them with --device cuda)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                        help="continue from an exported checkpoint (weights, tables, tokenizer), not random weights")
    parser.add_argument("--full-every", type=int, default=defaults.full_every,
                        help="every N-th agent batch is full-form sessions, the others short-form")
    parser.add_argument("--kind-weights", type=_kind_weights, default=defaults.kind_weights, metavar="KIND=W,...",
                        help=f"task mix (kinds: {', '.join(KINDS)}; unnamed kinds keep their default weight)")
    parser.add_argument("--piece-max-count", type=_piece_count, default=defaults.piece_max_count, metavar="N",
                        help="made-up names and values of up to N of the tokenizer's tokens (default "
                             f"{defaults.piece_max_count}; held-out words such as 'electrician' break into 5-6)")
    parser.add_argument("--syllable-words-only", action="store_true",
                        help="make up names and values from syllables only, not also from the tokenizer's tokens "
                             "(the data of runs before this option)")
    parser.add_argument("--copy-warmup-steps", type=int, default=defaults.copy_warmup_steps)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="measure this machine's step time and set --steps to fit the budget")
    args = parser.parse_args(argv)
    counts = (args.steps, args.batch_size, args.eval_every, args.checkpoint_every, args.eval_examples, args.full_every)
    if min(counts) < 1 or (args.stop_after is not None and args.stop_after < 1):
        parser.error("--steps, --batch-size, --eval-every, --eval-examples, --checkpoint-every and --stop-after "
                     "must be positive")
    if min(args.short_batch_size, args.copy_batch_size, args.question_batch_size, args.workers, args.copy_warmup_steps,
           args.warmup_steps) < 0:
        parser.error("--short-batch-size, --copy-batch-size, --question-batch-size, --workers and the warm-up steps "
                     "must not be negative")
    if args.init_from is not None and not (args.init_from / "model.safetensors").is_file():
        parser.error(f"--init-from: no exported checkpoint at {args.init_from} (model.safetensors missing)")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error("--time-budget must be a positive number of seconds")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    try:
        AnswerForms(args.found_prefix, args.refusal)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(max(1, args.threads))
    torch.backends.cuda.matmul.allow_tf32 = True
    settings = TrainSettings(out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, eval_every=args.eval_every, engram=not args.no_engram,
                             mhc=args.mhc, stop_after=args.stop_after, short_batch_size=args.short_batch_size,
                             copy_batch_size=args.copy_batch_size, checkpoint_every=args.checkpoint_every,
                             question_batch_size=args.question_batch_size,
                             question_follow_ups=args.question_follow_ups, runtime_retrieval=args.runtime_retrieval,
                             same_form_results=args.same_form_results, saved_results=args.saved_results,
                             eval_examples=args.eval_examples, copy_warmup_steps=args.copy_warmup_steps,
                             warmup_steps=args.warmup_steps, full_every=args.full_every,
                             kind_weights=args.kind_weights, piece_words=not args.syllable_words_only,
                             piece_max_count=args.piece_max_count, found_prefix=args.found_prefix,
                             refusal=args.refusal, init_from=None if args.init_from is None else str(args.init_from),
                             device=args.device, precision=args.precision, workers=args.workers)
    deadline = None
    try:
        if args.time_budget is not None:
            deadline = time.perf_counter() + args.time_budget
            steps = steps_for_budget(settings, args.time_budget, lambda text: print(text, file=sys.stderr, flush=True))
            settings = dataclasses.replace(settings, steps=steps)
        print(f"training into {args.out} ({settings.steps} steps of {settings.batch_size}, seed {settings.seed}, "
              f"{settings.device})", file=sys.stderr, flush=True)
        Trainer(settings).run(deadline)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
