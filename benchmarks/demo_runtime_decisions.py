"""The decision after a search, on the runtime's own prompts: does a demo checkpoint answer a found fact, and
say "no memory" of one never stored, when the prompt is exactly what the orchestrator built?

`demo_decisions.py` measures this decision teacher-forced on simulated sessions; this script measures it on
the prompts `python -m runtime.evaluation --prompts FILE` recorded (memory block, search hits and all, as the
runtime rendered them). Per question whose last call follows a memory_search, it compares the right final
answer with the tempting wrong one at the token where the two part (recall: "<key> is <value>." against
"I have no memory of <key>."; refusal the other way round, the wrong value being the top hit's), and beside
that shows what the model replied in the run. A recall whose value no hit holds (the storing session saved it
garbled) is counted apart: no decision can get it right.

    python -m runtime.evaluation --seed 1 --prompts /tmp/prompts-1.jsonl
    python benchmarks/demo_runtime_decisions.py /tmp/prompts-1.jsonl [--model DIR ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_decisions import _answer, _model, decision_margin, top_hit_value  # noqa: E402

from model_worker.training import traces  # noqa: E402

QUESTION_KINDS = ("recall", "recall_result", "refusal")


def after_search_calls(lines: list[dict]) -> list[dict]:
    """The recorded calls of question tasks that follow a memory_search (the decision after it)."""
    out = []
    for call in lines:
        last = call["messages"][-1]
        if call["kind"] in QUESTION_KINDS and last["role"] == "tool" and '"memory_search"' in last["content"]:
            out.append(call)
    return out


def right_and_wrong(call: dict) -> tuple[str, str, bool]:
    """(right final answer, tempting wrong one, whether the hits hold what the right one needs)."""
    key = call["key"]
    hits = json.loads(call["messages"][-1]["content"])[-1]["result"]["hits"]
    no_memory = f"I have no memory of {key}."
    if call["kind"] == "refusal":
        return no_memory, f"{key} is {top_hit_value(hits)}.", True
    sentence = f"{key} is {call['expect']}."
    return sentence, no_memory, any(sentence in hit["text"] for hit in hits)


def read_prompts(path: Path) -> list[dict]:
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            line = json.loads(text)
            if not {"kind", "key", "expect", "messages", "reply"} <= line.keys():
                raise ValueError("missing fields")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{path}:{number}: not a prompt line of runtime.evaluation --prompts ({exc})") from None
        lines.append(line)
    return lines


@torch.no_grad()
def measure(checkpoint: Path, calls: list[dict]) -> dict[str, dict]:
    """kind -> {"calls", "likelier" (right wins at the parting token), "margins", "replied" (the run's reply
    was the right answer), "value_missing" (recalls whose hits lack the stored value)}."""
    tokenizer, model = _model(checkpoint)
    out = {kind: {"calls": 0, "likelier": 0, "margins": [], "replied": 0, "value_missing": 0}
           for kind in QUESTION_KINDS}
    for call in calls:
        row = out[call["kind"]]
        right, wrong, decidable = right_and_wrong(call)
        if not decidable:
            row["value_missing"] += 1
            continue
        turns = sum(m["role"] == "assistant" for m in call["messages"])
        pair = [traces.Example(call["messages"], _answer(t), call["kind"], labelled_from=turns) for t in (right, wrong)]
        margin = decision_margin(model, tokenizer, pair)
        row["calls"] += 1
        row["likelier"] += margin > 0
        row["margins"].append(margin)
        row["replied"] += json.loads(call["reply"]).get("answer") == right
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", type=Path, help="a file written by python -m runtime.evaluation --prompts")
    parser.add_argument("--model", type=Path, action="append", default=None,
                        help="checkpoint directory (repeatable; default: the shipped demo model)")
    args = parser.parse_args(argv)
    checkpoints = args.model or [ROOT / "model_worker" / "demo_model"]
    for checkpoint in checkpoints:
        if not (checkpoint / "config.json").is_file():
            print(f"error: no checkpoint at {checkpoint} (config.json missing)", file=sys.stderr)
            return 2
    if not args.prompts.is_file():
        print(f"error: no file {args.prompts}", file=sys.stderr)
        return 2
    try:
        calls = after_search_calls(read_prompts(args.prompts))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"{'checkpoint':<40} {'kind':<14} {'searched':>8} {'right likelier':>14} {'median':>7} "
          f"{'replied right':>13} {'value not in hits':>17} {'coin':>5}")
    for checkpoint in checkpoints:
        for kind, row in measure(checkpoint, calls).items():
            n = row["calls"]
            share = f"{row['likelier']}/{n}" if n else "-"
            median = f"{statistics.median(row['margins']):+.2f}" if n else "-"
            print(f"{str(checkpoint)[-40:]:<40} {kind:<14} {n:>8} {share:>14} {median:>7} "
                  f"{row['replied']:>13} {row['value_missing']:>17} {'50%':>5}", flush=True)
    print(f"(post-search calls recorded in {args.prompts}; the margin is log p(right) - log p(wrong) in nats at the "
          "token where the two final answers part; 'replied right': the answer the run gave)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
