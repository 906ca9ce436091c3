"""benchmarks/demo_search_hits.py reads what `runtime.evaluation --transcripts` writes, and its simulated
side is the trace simulator's own searches (docs/training.md quotes both)."""

from __future__ import annotations

from runtime.evaluation import AgentTask, TaskOutcome, transcript_line
from tests.benchmarks import load_script


def _outcome(kind: str, question: str, expect: str, hits: list[tuple[str, float]]) -> TaskOutcome:
    search = {"kind": "action", "memories": [], "action": {"type": "tool_calls", "calls": []},
              "results": [{"hits": [{"id": str(i), "kind": "fact", "text": text, "score": score}
                                    for i, (text, score) in enumerate(hits)]}]}
    answer = {"kind": "final", "memories": [], "action": {"type": "final", "answer": "x"}, "results": []}
    return TaskOutcome(AgentTask(kind, "t", question, expect), "completed", "x", 2, True, False,
                       transcript=[search, answer])


def test_runtime_figures_come_from_the_evaluation_transcripts(tmp_path):
    script = load_script("demo_search_hits")
    path = tmp_path / "t.jsonl"
    path.write_text("".join(transcript_line(o) for o in (
        _outcome("recall", "What is Ann's job?", "baker",
                 [("Ann's job is baker.", 0.9), ("Task: x\nOutcome: Ann's job is baker.", 0.8),
                  ("Bo's job is baker.", 0.4)]),
        _outcome("recall", "Tell me Cy's job.", "pilot", [("Cy's job is nurse.", 0.5), ("Cy's job is pilot.", 0.7)]),
        _outcome("refusal", "What is Ann's job?", "no memory", [("Ann's job is baker.", 0.6)]),  # not a recall
    )))
    counts, scores = script.from_transcripts(path)
    assert dict(counts) == {3: 1, 2: 1}
    # only the asked fact's own memory is scored: not the storing session's summary, not another person's
    # memory with the same value, not the person's other fact
    assert sorted(scores) == [0.7, 0.9]


def test_simulated_searches_are_the_simulators_and_score_in_its_range():
    script = load_script("demo_search_hits")
    counts, scores = script.simulated(20)
    assert sum(counts.values()) >= 20 and set(counts) <= set(range(1, script.SEARCH_K + 1))
    assert scores and all(0.0 <= s <= 0.95 for s in scores)  # WordOverlap caps its scores at 0.95
