"""What a memory search returns to the demo model: in the training simulator against the real runtime.

The demo model decides after a `memory_search` whether the hits hold the fact asked for. It learned that
from the trace simulator's searches (word-overlap scores, or with training's `--runtime-retrieval` the
runtime's embedder: `model_worker/training/retrieval.py`); in the runtime the hits come from the sentence
embedder and the agent's own store. This prints, side by side, the number of hits per search and the score
of the hit holding the asked fact, from simulated recall sessions (both simulator retrievals) and from the
recall tasks of a `python -m runtime.evaluation --transcripts FILE` run:

    python -m runtime.evaluation --seed 1 --transcripts /tmp/seed1.jsonl
    python benchmarks/demo_search_hits.py /tmp/seed1.jsonl [--sessions 200]

It needs no demo model and no runtime of its own: it reads the transcripts and runs the simulator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_worker.training import traces  # noqa: E402
from model_worker.training.retrieval import WORD_OVERLAP, Retrieval, runtime_retrieval  # noqa: E402

SEARCH_K = traces.SEARCH_K


def _summary(counts: Counter, scores: list[float]) -> str:
    searches = sum(counts.values())
    most = max(SEARCH_K, *counts)  # a search may ask for more than the default k
    spread = " ".join(f"{n}:{counts[n] / searches:.0%}" for n in range(most + 1))
    if not scores:
        return f"{searches:>6} searches | hits {spread} | no hit held the fact"
    return (f"{searches:>6} searches | hits {spread} | fact's score min {min(scores):.2f} "
            f"median {statistics.median(scores):.2f} max {max(scores):.2f} (n={len(scores)})")


def simulated(sessions: int, seed: int = 3, retrieval: Retrieval = WORD_OVERLAP) -> tuple[Counter, list[float]]:
    """Hits per search and the found fact's score over the post-search steps of simulated held-out
    recall-by-search sessions."""
    generator = traces.TraceGenerator(seed, held_out=True, retrieval=retrieval)
    counts, scores = Counter(), []
    for _ in range(sessions):
        for step in generator.session("recall_search")[1:]:
            hits = json.loads(step.messages[-1]["content"])[-1]["result"]["hits"]
            counts[len(hits)] += 1
            answer = json.loads(step.target)["answer"]
            scores += [hit["score"] for hit in hits if hit["text"] == answer]
    return counts, scores


def _is_asked_fact(text: str, task: dict) -> bool:
    """`text` is "<key> is <expected value>." with the key the question asks about ("Ann's job")."""
    tail = f" is {task['expect']}."
    return text.endswith(tail) and text[: -len(tail)] in task["task"]


def from_transcripts(path: Path) -> tuple[Counter, list[float]]:
    """The same figures over the recall tasks of an evaluation's transcripts (the score of the stored fact's
    own memory, not of the storing session's summary)."""
    counts, scores = Counter(), []
    with path.open() as lines:
        for line in lines:
            task = json.loads(line)
            if task["kind"] != "recall":
                continue
            for step in task["steps"]:
                for result in step["results"]:
                    if not isinstance(result, dict) or "hits" not in result:
                        continue
                    counts[len(result["hits"])] += 1
                    scores += [hit["score"] for hit in result["hits"] if _is_asked_fact(hit["text"], task)]
    return counts, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("transcripts", type=Path, help="JSON lines from `python -m runtime.evaluation --transcripts`")
    parser.add_argument("--sessions", type=int, default=200, help="simulated recall-by-search sessions")
    args = parser.parse_args(argv)
    if args.sessions < 1:
        parser.error("--sessions must be positive")
    if not args.transcripts.is_file():
        print(f"error: no transcripts file at {args.transcripts}", file=sys.stderr)
        return 2
    try:
        runtime = from_transcripts(args.transcripts)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        print(f"error: {args.transcripts} is not a runtime.evaluation transcripts file ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    print(f"simulator, word overlap     {_summary(*simulated(args.sessions))}")
    print(f"simulator, runtime embedder {_summary(*simulated(args.sessions, retrieval=runtime_retrieval()))}")
    print(f"runtime                     {_summary(*runtime)}")
    print("(hits n:share of searches returning n hits; the fact's score: the hit whose text is the asked fact)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
