"""benchmarks/demo_runtime_decisions.py: which recorded calls it measures, the answers it weighs, and the
recalls it sets apart because their hits lack the stored value (runtime.evaluation --prompts writes the
lines; tests/runtime/test_evaluation.py checks that writer against the sessions)."""

from __future__ import annotations

import json

import pytest

from model_worker.training.traces import AnswerForms
from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("demo_runtime_decisions")


def _call(kind: str, key: str, expect: str, hits: list[str], *, searched: bool = True) -> dict:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": f"What is {key}?"}]
    if searched:
        search = {"type": "tool_calls", "calls": [{"name": "memory_search", "arguments": {"query": key}}]}
        found = [{"id": str(i), "kind": "fact", "text": text, "score": 0.5} for i, text in enumerate(hits)]
        messages += [{"role": "assistant", "content": json.dumps(search)},
                     {"role": "tool", "content": json.dumps([{"call_index": 0, "tool": "memory_search",
                                                              "result": {"hits": found}}])}]
    return {"kind": kind, "task": f"What is {key}?", "key": key, "expect": expect, "messages": messages,
            "reply": json.dumps({"type": "final", "answer": "x"})}


def test_only_calls_after_a_search_of_a_question_are_measured(script):
    calls = [_call("recall", "Ann's job", "baker", ["Ann's job is baker."]),
             _call("recall", "Ann's job", "baker", [], searched=False),  # the first step: no search before it
             _call("arithmetic", "2 plus 2", "4", ["2 plus 2 is 4."]),  # not a question kind
             _call("refusal", "Bo's job", "no memory", [])]
    assert [(c["kind"], c["key"]) for c in script.after_search_calls(calls)] == [("recall", "Ann's job"),
                                                                                 ("refusal", "Bo's job")]


def test_the_answers_weighed(script):
    recall = _call("recall", "Ann's job", "baker", ["Task: x\nOutcome: Ann's job is baker.", "Ann's job is baker."])
    assert script.right_and_wrong(recall) == ("Ann's job is baker.", "I have no memory of Ann's job.", True)
    refusal = _call("refusal", "Ann's job", "no memory", ["Ann's home city is Oslo.", "Bo's job is pilot."])
    assert script.right_and_wrong(refusal) == ("I have no memory of Ann's job.", "Ann's job is Oslo.", True)
    garbled = _call("recall", "Ann's job", "baker", ["Ann's job is bakr."])  # saved garbled: no decision saves it
    assert script.right_and_wrong(garbled)[2] is False
    prefix = AnswerForms("From memory: ")  # a checkpoint trained with --found-prefix answers a found fact with it
    assert script.right_and_wrong(recall, prefix) == ("From memory: Ann's job is baker.",
                                                      "I have no memory of Ann's job.", True)
    assert script.right_and_wrong(refusal, prefix)[1] == "From memory: Ann's job is Oslo."
    keyed = AnswerForms(refusal="{key}: I have no memory of it.")  # trained with --refusal: the key comes first
    assert script.right_and_wrong(recall, keyed) == ("Ann's job is baker.", "Ann's job: I have no memory of it.", True)
    assert script.right_and_wrong(refusal, keyed) == ("Ann's job: I have no memory of it.", "Ann's job is Oslo.", True)


def test_a_swapped_name_replaces_the_asked_person_only_as_a_whole_word(script):
    call = _call("refusal", "Drata's job", "no memory", ["Dratar's job is pilot.", "Drata's home city is Oslo."])
    swapped = script.with_name(call, "Alice")
    assert swapped["key"] == "Alice's job" and swapped["kind"] == "refusal"
    hits = json.loads(swapped["messages"][-1]["content"])[0]["result"]["hits"]
    assert [h["text"] for h in hits] == ["Dratar's job is pilot.", "Alice's home city is Oslo."]
    assert swapped["messages"][1]["content"] == "What is Alice's job?" and call["key"] == "Drata's job"  # a copy
    assert script.right_and_wrong(swapped) == ("I have no memory of Alice's job.", "Alice's job is pilot.", True)
    assert script.with_name(_call("recall_result", "2 plus 2", "4", ["2 plus 2 is 4."]), "Alice") is None


def test_a_file_that_is_not_prompts_is_refused_in_one_line(script, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"kind": "recall"}\n')
    assert script.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p.jsonl:1: not a prompt line" in err
    assert script.main([str(tmp_path / "missing.jsonl")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(path), "--swap-name", "al ice"])
    assert exit_info.value.code == 2 and "--swap-name" in capsys.readouterr().err


def test_each_prints_every_margin_that_the_medians_come_from(script, tmp_path, capsys):
    """`--each` lists the margins behind a row, sorted, as `measure` finds them (the shipped model, its wording)."""
    calls = [_call("recall", "Ann's job", "baker", ["Ann's job is baker."]),
             _call("refusal", "Bo's job", "no memory", ["Bo's home city is Oslo."]),
             _call("refusal", "Cy's job", "no memory", ["Dee's job is pilot."])]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(call) + "\n" for call in calls))
    assert script.main([str(path), "--each"]) == 0
    lines = capsys.readouterr().out.splitlines()
    printed = {line.split()[1]: line for line in lines if line.split()[0].endswith("demo_model")}
    margins = [line.split("margins: ")[1].split() for line in lines if "margins: " in line]
    rows = script.measure(script.ROOT / "model_worker" / "demo_model", calls)
    assert margins == [[f"{m:+.2f}" for m in sorted(rows[kind]["margins"])] for kind in ("recall", "refusal")]
    assert printed["refusal"].split()[3] == f"{rows['refusal']['likelier']}/2"
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(path), "--refusal", "I forgot {key}."])  # no "no memory": not a refusal the evaluation scores
    assert exit_info.value.code == 2 and "refusal" in capsys.readouterr().err
