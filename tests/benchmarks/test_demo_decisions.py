"""benchmarks/demo_decisions.py's after-search measurement: the pair of final answers it compares, and its
per-token log-likelihoods against the trainer's own loss on the same batch."""

from __future__ import annotations

import json

import pytest
import torch

from model_worker.training import data, traces
from model_worker.training.forward import batch_loss
from tests.benchmarks import load_script

DEMO = load_script("demo_decisions").ROOT / "model_worker" / "demo_model"


@pytest.fixture(scope="module")
def decisions():
    return load_script("demo_decisions")


def _last_after_search(kind: str, seed: int = 4, found_prefix: str = "") -> traces.Example:
    generator = traces.TraceGenerator(seed, held_out=True, answers=traces.AnswerForms(found_prefix))
    while True:
        last = generator.session(kind)[-1]
        if "memory_search" in last.messages[-2]["content"]:
            return last


def test_a_refusal_is_weighed_against_the_top_hits_value(decisions):
    last = _last_after_search("refusal")
    right, wrong = decisions._right_and_wrong(last)
    assert right == last.target and json.loads(right)["answer"].startswith("I have no memory of ")
    key = json.loads(right)["answer"].removeprefix("I have no memory of ").rstrip(".")
    top = json.loads(last.messages[-1]["content"])[-1]["result"]["hits"][0]["text"]
    value = json.loads(wrong)["answer"].removeprefix(f"{key} is ").rstrip(".")
    assert json.loads(wrong)["answer"].startswith(f"{key} is ") and top.rstrip(".").endswith(f" is {value}")


def test_a_found_fact_is_weighed_against_no_memory(decisions):
    last = _last_after_search("recall_search")
    right, wrong = decisions._right_and_wrong(last)
    key = json.loads(right)["answer"].rsplit(" is ", 1)[0]
    assert right == last.target and json.loads(wrong) == {"type": "final", "answer": f"I have no memory of {key}."}


def test_with_a_found_prefix_both_sides_carry_it_where_they_state_a_value(decisions):
    prefix = "From memory: "
    found = _last_after_search("recall_search", found_prefix=prefix)
    right, wrong = decisions._right_and_wrong(found, traces.AnswerForms(prefix))
    key = json.loads(right)["answer"].removeprefix(prefix).rsplit(" is ", 1)[0]
    assert right == found.target and json.loads(right)["answer"].startswith(prefix)
    assert json.loads(wrong)["answer"] == f"I have no memory of {key}."
    refused = _last_after_search("refusal", found_prefix=prefix)
    right, wrong = decisions._right_and_wrong(refused, traces.AnswerForms(prefix))
    assert right == refused.target and json.loads(wrong)["answer"].startswith(prefix)


def test_token_likelihoods_agree_with_the_trainers_loss(decisions):
    tokenizer, model = decisions._model(DEMO)
    last = _last_after_search("refusal")
    prior = sum(m["role"] == "assistant" for m in last.messages)
    pair = [traces.Example(last.messages, t, "refusal", labelled_from=prior) for t in decisions._right_and_wrong(last)]
    batch = data.prefix_batch(data.tokenize(tokenizer, pair), tokenizer.pad_token_id)
    rows = decisions.token_nlls(model, batch)
    with torch.no_grad():
        loss, _, labels = batch_loss(model, batch)
    assert torch.equal(torch.cat([ids for ids, _ in rows]), labels)  # the labelled tokens, row by row
    assert torch.cat([nll for _, nll in rows]).mean().item() == pytest.approx(loss.item(), rel=1e-4)
    # each row labels only its final answer (the earlier search turn is context), so the rows differ
    assert [len(ids) for ids, _ in rows] == [len(tokenizer.encode(t, add_special_tokens=False)) + 1  # + EOS
                                          for t in decisions._right_and_wrong(last)]
    # the margin is taken where the answers part ("I" of "I have no memory" against the key's first token),
    # as log p(right) - log p(wrong) there
    (right_ids, right_nll), (wrong_ids, wrong_nll) = rows
    j = int((right_ids[: len(wrong_ids)] != wrong_ids[: len(right_ids)]).nonzero()[0])
    assert torch.equal(right_ids[:j], wrong_ids[:j]) and right_ids[j] != wrong_ids[j]
    assert decisions.decision_margin(model, tokenizer, pair) == pytest.approx(float(wrong_nll[j] - right_nll[j]))
