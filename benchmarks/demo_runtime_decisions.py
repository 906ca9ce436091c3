"""The decision after a search, on the runtime's own prompts: does a demo checkpoint answer a found fact, and
say "no memory" of one never stored, when the prompt is exactly what the orchestrator built?

`demo_decisions.py` measures this decision teacher-forced on simulated sessions; this script measures it on
the prompts `python -m runtime.evaluation --prompts FILE` recorded (memory block, search hits and all, as the
runtime rendered them). Per question whose last call follows a memory_search, it compares the right final
answer with the tempting wrong one at the token where the two part (recall: "<key> is <value>." against
"I have no memory of <key>." or the refusal the checkpoint was trained with, --refusal; refusal the other way
round, the wrong value being the top hit's), and beside
that shows what the model replied in the run. A recall whose value no hit holds (the storing session saved it
garbled) is counted apart: no decision can get it right.

`--swap-name NAME` measures each question about a person a second time with the person's name replaced by
NAME everywhere (prompt and both answers): the same evidence, another name. Where the choice moves with the
name, the model decides by the name, not by whether the hits hold the asked fact.

    python -m runtime.evaluation --seed 1 --prompts /tmp/prompts-1.jsonl
    python benchmarks/demo_runtime_decisions.py /tmp/prompts-1.jsonl [--model DIR ...] [--swap-name Alice]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_decisions import (  # noqa: E402
    _answer,
    _model,
    add_answer_arguments,
    answer_forms,
    decision_margin,
    top_hit_value,
)

from model_worker.training import traces  # noqa: E402
from model_worker.training.traces import DEFAULT_ANSWERS, AnswerForms  # noqa: E402

QUESTION_KINDS = ("recall", "recall_result", "refusal")


def after_search_calls(lines: list[dict]) -> list[dict]:
    """The recorded calls of question tasks that follow a memory_search (the decision after it)."""
    out = []
    for call in lines:
        last = call["messages"][-1]
        if call["kind"] in QUESTION_KINDS and last["role"] == "tool" and '"memory_search"' in last["content"]:
            out.append(call)
    return out


def right_and_wrong(call: dict, answers: AnswerForms = DEFAULT_ANSWERS) -> tuple[str, str, bool]:
    """(right final answer, tempting wrong one, whether the hits hold what the right one needs); `answers`: how
    the checkpoint words its answers after a search (training's --found-prefix and --refusal)."""
    key = call["key"]
    hits = json.loads(call["messages"][-1]["content"])[-1]["result"]["hits"]
    no_memory = answers.not_found(key)
    if call["kind"] == "refusal":
        return no_memory, answers.found(f"{key} is {top_hit_value(hits)}."), True
    sentence = f"{key} is {call['expect']}."
    return answers.found(sentence), no_memory, any(sentence in hit["text"] for hit in hits)


def with_name(call: dict, name: str) -> dict | None:
    """`call` with the asked person's name replaced by `name` in every message and in the key (whole words only:
    "Drata" is not replaced inside "Dratar"); None for a question about no person (a computed result)."""
    if "'s " not in call["key"]:
        return None
    person = call["key"].split("'s ", 1)[0]
    old = re.compile(rf"\b{re.escape(person)}\b")
    messages = [dict(m, content=old.sub(name, m["content"])) for m in call["messages"]]
    return dict(call, messages=messages, key=old.sub(name, call["key"]))


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
def measure(checkpoint: Path, calls: list[dict], answers: AnswerForms = DEFAULT_ANSWERS,
            swap_name: str | None = None) -> dict[str, dict]:
    """kind -> {"calls", "likelier" (right wins at the parting token), "margins", "replied" (the run's reply
    was the right answer), "value_missing" (recalls whose hits lack the stored value), and with `swap_name`
    "swapped" / "swapped_likelier" (questions about a person, measured again under that name)}."""
    tokenizer, model = _model(checkpoint)
    out = {kind: {"calls": 0, "likelier": 0, "margins": [], "replied": 0, "value_missing": 0, "swapped": 0,
                  "swapped_likelier": 0} for kind in QUESTION_KINDS}

    def margin(call: dict, right: str, wrong: str) -> float:
        turns = sum(m["role"] == "assistant" for m in call["messages"])
        pair = [traces.Example(call["messages"], _answer(t), call["kind"], labelled_from=turns) for t in (right, wrong)]
        return decision_margin(model, tokenizer, pair)

    for call in calls:
        row = out[call["kind"]]
        right, wrong, decidable = right_and_wrong(call, answers)
        if not decidable:
            row["value_missing"] += 1
            continue
        row["calls"] += 1
        row["margins"].append(margin(call, right, wrong))
        row["likelier"] += row["margins"][-1] > 0
        row["replied"] += json.loads(call["reply"]).get("answer") == right
        swapped = with_name(call, swap_name) if swap_name else None
        if swapped is not None:
            row["swapped"] += 1
            row["swapped_likelier"] += margin(swapped, *right_and_wrong(swapped, answers)[:2]) > 0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", type=Path, help="a file written by python -m runtime.evaluation --prompts")
    parser.add_argument("--model", type=Path, action="append", default=None,
                        help="checkpoint directory (repeatable; default: the shipped demo model)")
    add_answer_arguments(parser)
    parser.add_argument("--swap-name", default=None, metavar="NAME",
                        help="also measure each question about a person with the name replaced by NAME")
    parser.add_argument("--each", action="store_true",
                        help="also print every call's margin, sorted, per checkpoint and kind")
    args = parser.parse_args(argv)
    if args.swap_name is not None and not re.fullmatch(r"[A-Z][a-z]+", args.swap_name):
        parser.error("--swap-name: one capitalised word of letters, such as Alice")
    answers = answer_forms(parser, args)
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
    swapped = f"with {args.swap_name}" if args.swap_name else ""
    print(f"{'checkpoint':<40} {'kind':<14} {'searched':>8} {'right likelier':>14} {'median':>7} "
          f"{'replied right':>13} {'value not in hits':>17} {'coin':>5}" + (f" {swapped:>14}" if swapped else ""))
    for checkpoint in checkpoints:
        for kind, row in measure(checkpoint, calls, answers, args.swap_name).items():
            n = row["calls"]
            share = f"{row['likelier']}/{n}" if n else "-"
            median = f"{statistics.median(row['margins']):+.2f}" if n else "-"
            cell = f"{row['swapped_likelier']}/{row['swapped']}" if row["swapped"] else "-"
            swap = f" {cell:>14}" if swapped else ""
            print(f"{str(checkpoint)[-40:]:<40} {kind:<14} {n:>8} {share:>14} {median:>7} "
                  f"{row['replied']:>13} {row['value_missing']:>17} {'50%':>5}{swap}", flush=True)
            if args.each and n:
                print(f"{'':<40} {'':<14} margins: " + " ".join(f"{m:+.2f}" for m in sorted(row["margins"])))
    print(f"(post-search calls recorded in {args.prompts}; the margin is log p(right) - log p(wrong) in nats at the "
          "token where the two final answers part; 'replied right': the answer the run gave"
          + (f"; '{swapped}': right likelier with the asked person renamed {args.swap_name}, the questions about a "
             "person only)" if swapped else ")"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
