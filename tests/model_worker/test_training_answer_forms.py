"""How the answer after a memory search is worded (traces.AnswerForms).

`--found-prefix`: an answer from a memory search's hits opens with a fixed word ("From memory: ..."), so that
found and "I have no memory of ..." part at that word and not at the first token of a name to be copied (on
the runtime's post-search prompts, stage 16's choice there followed how familiar the name was, not the hits).
`--refusal`: the answer when the search found nothing; "{key}: I have no memory of it." opens with the asked key,
so found and not found part right after the key, once the model has written it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_worker.tokenizer import Tokenizer
from model_worker.training import data, traces
from model_worker.training.prefetch import chunk_batches
from model_worker.training.trainer import TrainSettings

DEMO_MODEL = Path(__file__).resolve().parents[2] / "model_worker" / "demo_model"
PREFIX = "From memory: "
NONE = "I have no memory of "
KEYED = "{key}: I have no memory of it."


def _answer(example: traces.Example) -> str | None:
    action = json.loads(example.target)
    return action["answer"] if action["type"] == "final" else None


def _after_search(example: traces.Example) -> bool:
    return len(example.messages) > 2 and '"memory_search"' in example.messages[-1]["content"]


def test_only_answers_from_a_search_take_the_prefix():
    generator = traces.TraceGenerator(4, answers=traces.AnswerForms(PREFIX))
    counts = {"found": 0, "none": 0, "direct": 0}
    for kind in ("recall", "recall_search", "recall_cautious", "recall_result", "refusal") * 20:
        steps = generator.session(kind)
        answer, last = _answer(steps[-1]), steps[-1]
        if not _after_search(last):
            assert not answer.startswith(PREFIX) and " is " in answer  # answered from the block: the bare sentence
            counts["direct"] += 1
        elif answer.startswith(NONE):
            key = answer.removeprefix(NONE).rstrip(".")
            assert f"{key} is " not in last.messages[-1]["content"]  # the hits do not hold it
            counts["none"] += 1
        else:
            sentence = answer.removeprefix(PREFIX)
            assert answer.startswith(PREFIX) and sentence in last.messages[-1]["content"]  # copied from the hits
            counts["found"] += 1
    assert min(counts.values()) >= 10


def test_the_prefix_is_off_by_default_and_changes_nothing_else():
    plain = data.session_examples(80, seed=3)
    default = data.session_examples(80, seed=3, answers=traces.AnswerForms())
    assert [e.target for e in plain] == [e.target for e in default]
    prefixed = data.session_examples(80, seed=3, answers=traces.AnswerForms(PREFIX))
    changed = 0
    for old, new in zip(plain, prefixed, strict=True):
        assert old.messages == new.messages  # the same sessions, prompts and all
        if old.target != new.target:
            changed += 1
            assert json.loads(new.target)["answer"] == PREFIX + json.loads(old.target)["answer"]
    assert changed >= 5


def test_question_follow_ups_answer_a_found_fact_with_the_prefix():
    sequences = data.question_groups(40, seed=4, follow_ups=True, answers=traces.AnswerForms(PREFIX))
    found, never_stored = sequences[2::4], sequences[3::4]
    assert all(json.loads(s.target)["answer"].startswith(NONE) for s in never_stored)
    answers = [json.loads(s.target)["answer"] for s in found]
    assert sum(a.startswith(PREFIX) for a in answers) >= len(found) // 2
    assert all(a.startswith(PREFIX) or a.startswith(NONE) for a in answers)


def test_the_found_word_and_the_none_word_part_at_the_first_token():
    """The point of the prefix: the two answers differ at their first token, a fixed word, not a name."""
    tokenizer = Tokenizer.from_pretrained(DEMO_MODEL)
    found = tokenizer.encode(PREFIX + "Sarita's job is baker.", add_special_tokens=False)
    none = tokenizer.encode(NONE + "Sarita's job.", add_special_tokens=False)
    assert found[0] != none[0] and tokenizer.decode(found[:1]) == "From"


def test_training_settings_carry_the_prefix_into_the_batches(tmp_path):
    tokenizer = Tokenizer.from_pretrained(DEMO_MODEL)
    prefixed = chunk_batches(tokenizer, TrainSettings(out_dir=tmp_path, batch_size=4, found_prefix=PREFIX), 0)
    plain = chunk_batches(tokenizer, TrainSettings(out_dir=tmp_path, batch_size=4), 0)
    assert any(PREFIX in tokenizer.decode(item.ids) for batch in prefixed for item in batch)
    assert not any(PREFIX in tokenizer.decode(item.ids) for batch in plain for item in batch)


def test_the_training_command_passes_the_prefix_to_the_trainer(tmp_path, monkeypatch):
    from model_worker.training import __main__ as command

    seen = []

    class Recorder:
        def __init__(self, settings):
            seen.append(settings)

        def run(self, deadline=None):
            return None

    monkeypatch.setattr(command, "Trainer", Recorder)
    assert command.main(["--out", str(tmp_path / "a"), "--found-prefix", PREFIX]) == 0
    assert command.main(["--out", str(tmp_path / "b")]) == 0
    assert [s.found_prefix for s in seen] == [PREFIX, ""]


@pytest.mark.parametrize("refusal", ["I know nothing of {key}.", "I have no memory of it.", "{key}: no memory of {x}.",
                                     "{0}{key}: no memory."])
def test_a_refusal_must_name_the_key_and_say_no_memory(refusal):
    """The evaluation scores a refusal by "no memory"; without {key} the answer would not say what is missing."""
    with pytest.raises(ValueError, match="refusal"):
        traces.AnswerForms(refusal=refusal)


def test_a_refusal_gives_back_the_key_it_names():
    keyed, default = traces.AnswerForms(refusal=KEYED), traces.AnswerForms()
    assert keyed.not_found("Ann's job") == "Ann's job: I have no memory of it."
    assert keyed.refused_key("Ann's job: I have no memory of it.") == "Ann's job"
    assert default.refused_key("I have no memory of 17 times 23.") == "17 times 23"
    assert keyed.refused_key("I have no memory of Ann's job.") is None
    assert default.refused_key("Ann's job is baker.") is None


def test_a_keyed_refusal_is_said_only_when_the_hits_lack_the_fact():
    generator = traces.TraceGenerator(5, answers=traces.AnswerForms(refusal=KEYED))
    refused = found = 0
    for kind in ("recall_search", "recall_result", "refusal") * 20:
        last = generator.session(kind)[-1]
        answer = _answer(last)
        if not _after_search(last):
            continue
        key = traces.AnswerForms(refusal=KEYED).refused_key(answer)
        if key is not None:
            assert not answer.startswith(NONE) and f"{key} is " not in last.messages[-1]["content"]
            refused += 1
        else:
            assert answer in last.messages[-1]["content"]  # the found sentence, copied from the hits
            found += 1
    assert refused >= 10 and found >= 10


def test_a_keyed_refusal_and_a_found_fact_share_the_key_and_part_right_after_it():
    """The point of the keyed refusal: no decision before the key is written, and the first token after it decides."""
    tokenizer = Tokenizer.from_pretrained(DEMO_MODEL)
    key = tokenizer.encode("Sarita's job", add_special_tokens=False)
    found = tokenizer.encode("Sarita's job is baker.", add_special_tokens=False)
    none = tokenizer.encode(KEYED.format(key="Sarita's job"), add_special_tokens=False)
    assert found[:len(key)] == none[:len(key)] == key and found[len(key)] != none[len(key)]


def test_training_settings_carry_the_refusal_into_the_batches_and_the_command_checks_it(tmp_path, monkeypatch):
    from model_worker.training import __main__ as command

    tokenizer = Tokenizer.from_pretrained(DEMO_MODEL)
    only_refusals = tuple(float(kind == "refusal") for kind in traces.KINDS)
    keyed = chunk_batches(tokenizer, TrainSettings(out_dir=tmp_path, batch_size=4, refusal=KEYED,
                                                   kind_weights=only_refusals), 0)
    texts = [tokenizer.decode(item.ids) for batch in keyed for item in batch]
    assert any(": I have no memory of it." in text for text in texts)
    assert not any(f'"answer": "{NONE}' in text for text in texts)  # no refusal in the default wording
    seen = []
    monkeypatch.setattr(command, "Trainer", lambda settings: seen.append(settings) or _NoRun())
    assert command.main(["--out", str(tmp_path / "a"), "--refusal", KEYED]) == 0
    assert seen[0].refusal == KEYED and seen[0].answers.not_found("x") == "x: I have no memory of it."
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--out", str(tmp_path / "b"), "--refusal", "I forgot."])
    assert exit_info.value.code == 2 and len(seen) == 1  # a usage error, nothing trained


class _NoRun:
    def run(self, deadline=None):
        return None
