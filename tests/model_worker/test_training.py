"""The demo model's training pieces against independent references: the model's own prefill, the real
tools and prompt builder, the tokenizer's chat rendering, and a resumed run against an uninterrupted one."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_worker.loading import load_model
from model_worker.tokenizer import Tokenizer
from model_worker.training import data, forward, pools, traces
from model_worker.training.budget import steps_for_budget
from model_worker.training.model_setup import (
    EXPORT_DTYPE,
    build_trainable,
    demo_model_config,
    export_checkpoint,
    load_exported,
)
from model_worker.training.prefetch import ChunkPrefetcher, chunk_batches
from model_worker.training.trainer import Trainer, TrainSettings
from runtime.prompts import parse_action
from runtime.tools.calculator import calculate


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    data.train_tokenizer(path, vocab_size=1024, seed=0, corpus_examples=300)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.from_pretrained(tokenizer_dir)


def test_held_out_split_shares_no_subject_or_value_with_training():
    rng = random.Random(0)
    held_out = {pools.subject_sampler(True)(rng) for _ in range(3000)}
    training = {pools.subject_sampler(False)(rng) for _ in range(3000)}
    assert not held_out & training and len(training) > 1500  # training names are mostly made up, never held out
    shared = {w.lower() for pool in (pools.FIRST_NAMES, pools.COLOURS, pools.CITIES, pools.FOODS, pools.JOBS,
                                     pools.PETS, pools.SPORTS, pools.DRINKS, pools.INSTRUMENTS)
              for w in pools.split(pool, False)}  # a word in two pools (Sofia: a city, a name) is in both splits
    for name, draw in pools.attribute_values(False).items():
        drawn = {draw(rng).lower() for _ in range(300)}
        assert not (drawn & pools.held_out_words()) - shared, name
    for pool in (pools.COLOURS, pools.CITIES, pools.FOODS, pools.JOBS, pools.PETS):
        assert not set(pools.split(pool, True)) & set(pools.split(pool, False))
        assert pools.split(pool, True) and pools.split(pool, False)


def _action_tokens(tokenizer, examples) -> set[int]:
    return {t for e in examples for t in tokenizer.encode(e.target, add_special_tokens=False)}


def test_words_made_of_tokenizer_pieces_put_the_vocabulary_into_actions_and_stay_out_of_the_held_out_split(
        tokenizer):
    pieces = data.word_pieces(tokenizer)
    assert pieces.lower and pieces.upper
    assert all(p.isalpha() and p.islower() for p in pieces.lower) and all(p[0].isupper() for p in pieces.upper)
    assert max(map(len, pieces.lower + pieces.upper)) <= pools.PIECE_MAX_LETTERS
    # without pieces the stream is the syllable-only one of earlier runs (same seed, same sessions)
    old = data.session_examples(60, seed=11)
    assert [e.target for e in old] == [e.target for e in data.session_examples(60, seed=11, pieces=None)]
    with_pieces = data.session_examples(600, seed=11, pieces=pieces)
    alphabetic = {tokenizer.token_to_id(p) for p in pieces.lower + pieces.upper}
    covered_old = _action_tokens(tokenizer, data.session_examples(600, seed=11)) & alphabetic
    covered_new = _action_tokens(tokenizer, with_pieces) & alphabetic
    never_written = alphabetic - covered_old  # tokens no syllable word or pool word of 600 sessions is made of
    print(f"alphabetic tokens in actions: {len(covered_old)} syllables only, {len(covered_new)} with pieces "
          f"({len(never_written & covered_new)} of the {len(never_written)} others), of {len(alphabetic)}")
    assert len(never_written & covered_new) > 0.25 * len(never_written)
    rng, reserved = random.Random(1), pools.held_out_words()
    names = {pools.subject_sampler(False, pieces)(rng) for _ in range(3000)}
    values = {draw(rng) for draw in pools.attribute_values(False, pieces).values() for _ in range(300)}
    assert not {w.lower() for w in names} & reserved
    assert all(w[0].isupper() for w in names)
    shared = {w.lower() for pool in (pools.FIRST_NAMES, pools.COLOURS, pools.CITIES, pools.FOODS, pools.JOBS,
                                     pools.PETS, pools.SPORTS, pools.DRINKS, pools.INSTRUMENTS)
              for w in pools.split(pool, False)}
    assert not ({v.lower() for v in values} & reserved) - shared


def test_every_target_is_a_valid_action_and_observations_are_real_tool_results():
    kinds = set()
    for session in [traces.TraceGenerator(seed=3).session(kind) for kind in traces.KINDS for _ in range(5)]:
        for example in session:
            kinds.add(example.kind)
            action = parse_action(example.target, traces.AGENT.tools, max_calls=2)
            assert json.dumps(action, ensure_ascii=False) == example.target
        # the last step's prompt replays every earlier action and its observations
        replayed = [m for m in session[-1].messages if m["role"] == "assistant"]
        assert [m["content"] for m in replayed] == [e.target for e in session[:-1]]
        for message in session[-1].messages:
            if message["role"] != "tool":
                continue
            for observation in json.loads(message["content"]):
                if observation["tool"] == "calculator":
                    index = session[-1].messages.index(message)
                    call = json.loads(session[-1].messages[index - 1]["content"])["calls"][0]
                    assert observation["result"] == calculate(call["arguments"]["expression"])
    assert kinds == set(traces.KINDS)


def test_recall_answers_copy_the_stored_fact_and_refusals_name_the_key():
    gen = traces.TraceGenerator(seed=5, held_out=True)
    for _ in range(20):
        session = gen.session("recall_search")
        answer = json.loads(session[-1].target)["answer"]
        tool_text = " ".join(m["content"] for m in session[-1].messages if m["role"] == "tool")
        assert answer in tool_text  # copied from the search hit
        refusal = json.loads(gen.session("refusal")[-1].target)["answer"]
        assert refusal.startswith("I have no memory of ")


def test_a_stored_fact_shows_as_the_runtime_leaves_it_the_written_memory_and_its_sessions_summary():
    """The orchestrator ends a session by writing "Task: <task>\nOutcome after <steps + 1> steps: <answer>" as an
    episode; a recall's store holds that summary of the storing session beside the written fact, as the runtime
    does (and a question's search then finds the sentence twice)."""
    gen = traces.TraceGenerator(seed=6)
    for kind in ("remember", "arithmetic_remember"):
        for _ in range(10):
            session = gen.session(kind)
            task = session[0].messages[-1]["content"]
            sentence = json.loads(session[-2].target)["calls"][0]["arguments"]["text"]
            runtime_summary = f"Task: {task}\nOutcome after {len(session)} steps: " \
                              f"{json.loads(session[-1].target)['answer']}"
            key, value = sentence[:-1].rsplit(" is ", 1)
            ours = gen.storing_summary(traces.Fact(key, value)).text
            assert ours.startswith("Task: ") and ours.split("\n", 1)[1] == runtime_summary.split("\n", 1)[1]
    both = 0
    for _ in range(40):
        hits = json.loads(gen.session("recall_search")[-1].messages[-1]["content"])[0]["result"]["hits"]
        both += sum(hit["kind"] == "episode" and "\nOutcome after " in hit["text"] for hit in hits) >= 1 and \
            any(hit["kind"] == "fact" for hit in hits)
    assert both >= 20


def test_a_cautious_recall_trains_only_the_answer_from_the_hits():
    """recall_cautious: the block held the fact and the model searched anyway; only the answer after the search
    is labelled, and it copies the sentence the hits and the block hold."""
    gen = traces.TraceGenerator(seed=7, weights=tuple(float(kind == "recall_cautious") for kind in traces.KINDS))
    for _ in range(20):
        steps = gen.session()
        assert len(steps) == 2 and json.loads(steps[0].target)["calls"][0]["name"] == "memory_search"
        (sequence,) = data.step_sequences(steps)
        assert sequence.labelled_from == 1 and sequence.target == steps[1].target
        answer = json.loads(sequence.target)["answer"]
        if not answer.startswith("I have no memory of "):
            assert answer in steps[0].messages[0]["content"] and answer in sequence.messages[-1]["content"]


def _memory_block(example: traces.Example) -> str:
    system = example.messages[0]["content"]
    return system[system.find(data.MEMORY_HEADING):] if data.MEMORY_HEADING in system else ""


def test_a_question_group_asks_one_question_four_ways_over_one_store_of_hard_negatives():
    """Answered from the block, found by search, never stored: the first step differs only by whether the
    block holds the very fact, and the store holds other people's same attribute to be told apart from it.
    The cautious way searches although the block holds the fact, and answers from the hits."""
    gen = traces.TraceGenerator(seed=8)
    same_attribute_elsewhere = answered_directly = 0
    for _ in range(30):
        direct, cautious, searched, refused = gen.question_group()
        assert json.loads(cautious[0].target)["calls"][0]["name"] == "memory_search"
        first_calls = [json.loads(session[0].target) for session in (direct, searched, refused)]
        key = first_calls[1]["calls"][0]["arguments"]["query"]
        if first_calls[0]["type"] != "final":  # retrieval ranked the fact below the block's k: search for it
            assert first_calls[0] == first_calls[1]
            continue
        answered_directly += 1
        sentence = first_calls[0]["answer"]
        assert sentence.startswith(f"{key} is ") and sentence in _memory_block(direct[0])
        if sentence in cautious[-1].messages[-1]["content"]:  # the hits hold it
            assert json.loads(cautious[-1].target) == first_calls[0]
        for session in (searched, refused):
            assert first_calls[1] == json.loads(session[0].target)  # the same search, from the same question
            assert sentence not in _memory_block(session[0])
        hits = searched[-1].messages[-1]["content"]
        found = json.loads(searched[-1].target)["answer"]
        assert found == sentence if sentence in hits else found == f"I have no memory of {key}."
        assert json.loads(refused[-1].target)["answer"] == f"I have no memory of {key}."
        assert sentence not in refused[-1].messages[-1]["content"]
        if "'s " in key:
            subject, attribute = key.split("'s ", 1)
            others = [line for line in _memory_block(refused[0]).splitlines()
                      if f"'s {attribute} is " in line and f"{subject}'s " not in line]
            same_attribute_elsewhere += bool(others)
    assert answered_directly >= 20 and same_attribute_elsewhere >= 12


def test_question_batches_pair_answering_with_searching_for_the_same_question(tmp_path):
    sequences, finals = data.question_groups(20, seed=3), 0
    assert len(sequences) == 20 and all(s.kind == "question_group" for s in sequences)
    assert all(data.short_form(s).messages[0] != s.messages[0] for s in sequences)  # full form
    for direct, searching in zip(sequences[::2], sequences[1::2], strict=True):
        call = json.loads(searching.target)["calls"][0]
        assert call["name"] == "memory_search" and len(direct.messages) == len(searching.messages) == 2  # step 0
        assert call["arguments"]["query"] in direct.messages[-1]["content"]  # one question (phrased its own way)
        finals += json.loads(direct.target)["type"] == "final"
    assert finals >= 8
    trainer = Trainer(_tiny_settings(tmp_path, question_batch_size=4))
    batch, again = trainer.question_batch(0), trainer.question_batch(0)
    assert batch.suffixes.shape[0] == 4 and bool((batch.labels >= 0).any())
    assert torch.equal(batch.suffixes, again.suffixes) and not torch.equal(batch.suffixes,
                                                                           trainer.question_batch(1).suffixes)
    assert Trainer(_tiny_settings(tmp_path / "none", question_batch_size=0)).question_batch(0) is None


def test_question_follow_ups_are_labelled_on_their_last_step_only(tokenizer):
    sequences = data.question_groups(40, seed=4, follow_ups=True)
    found, never_stored = sequences[2::4], sequences[3::4]  # per group: two first steps, two follow-ups
    follow_ups = found + never_stored
    assert all(len(s.messages) > 2 and s.labelled_from == 1 for s in follow_ups)  # after one search
    assert all(json.loads(s.target)["answer"].startswith("I have no memory of ") for s in never_stored)
    answers = [json.loads(s.target)["answer"] for s in found]
    assert sum(not a.startswith("I have no memory of ") for a in answers) >= len(found) // 2
    for a, b in zip(found, never_stored, strict=True):  # the same search, for the same question
        assert a.messages[2] == b.messages[2] and a.messages[2]["role"] == "assistant"
    item = data.tokenize(tokenizer, follow_ups[:1])[0]
    assert len(item.spans) == 1 and tokenizer.decode(item.ids[item.spans[0][0]:item.spans[0][1] - 1]) == \
        follow_ups[0].target


def test_labels_are_exactly_the_assistant_turns_taken_in_the_sequences_context(tokenizer):
    examples = data.session_examples(6, seed=1)
    items = data.tokenize(tokenizer, examples)
    batch = data.prefix_batch(items, tokenizer.pad_token_id)
    P = batch.prefix.numel()
    for b, (item, example) in enumerate(zip(items, examples, strict=True)):
        assert item.ids == tokenizer.encode_chat(example.messages) + \
            tokenizer.encode(example.target, add_special_tokens=False) + [tokenizer.eos_token_id]
        labelled = batch.labels[b][batch.labels[b] >= 0].tolist()
        turns = [m["content"] for m in example.messages if m["role"] == "assistant"] + [example.target]
        turns = turns[example.labelled_from:]
        expected = []
        for turn in turns:
            expected += tokenizer.encode(turn, add_special_tokens=False) + [tokenizer.eos_token_id]
        assert labelled == expected
        assert torch.equal(batch.suffixes[b, : len(item.ids) - P], torch.tensor(item.ids[P:]))


def test_every_labelled_action_sees_the_memories_its_step_saw():
    """A step's retrieval can find what an earlier step wrote; an action must never be trained in a sequence
    showing memories its own step did not have (it would learn to copy a memory_write from the memory block)."""
    gen = traces.TraceGenerator(5)
    changed = 0
    for _ in range(300):
        steps = gen.session()
        sequences = data.step_sequences(steps)
        labelled = [j for seq in sequences for j in range(seq.labelled_from, steps.index(
            next(s for s in steps if s.messages is seq.messages)) + 1)]
        assert labelled == list(range(len(steps)))  # every step once
        for seq in sequences:
            k = next(i for i, s in enumerate(steps) if s.messages is seq.messages)
            for j in range(seq.labelled_from, k + 1):
                assert steps[j].messages[0] == seq.messages[0]  # the same system message: the same memories
            changed += seq.labelled_from > 0
    assert changed > 50  # sessions whose memories change mid-way are common (a remember writes, then shows it)
    remember = data.step_sequences(gen.session("remember"))
    sentence = json.loads(remember[0].target)["calls"][0]["arguments"]["text"]
    assert sentence not in remember[0].messages[0]["content"]  # the write is learned from the task alone


def test_copy_batches_label_exactly_the_repeat(tokenizer):
    gen = torch.Generator().manual_seed(3)
    batch = data.copy_batch(gen, tokenizer.vocab_size, tokenizer.bos_token_id, batch=4, span=10)
    assert batch.prefix.tolist() == [tokenizer.bos_token_id] and batch.suffixes.shape == (4, 20)
    assert torch.equal(batch.suffixes[:, :10], batch.suffixes[:, 10:])
    assert int(batch.suffixes.min()) >= len(data.SPECIAL_TOKENS)  # never a special token
    for row, labels in zip(batch.suffixes.tolist(), batch.labels.tolist(), strict=True):
        # position t predicts token t + 1, labelled from the repeat's first token (the one before is a guess)
        assert [(t, label) for t, label in enumerate(labels) if label >= 0] == [(t, row[t + 1]) for t in range(10, 19)]


def test_a_word_has_the_same_tokens_after_a_space_and_after_a_quote(tokenizer):
    for word in ("Qorvelix", "Chen", "lilac", "E-1765"):
        spaced = tokenizer.encode(f"is {word}", add_special_tokens=False)
        quoted = tokenizer.encode(f'"{word}', add_special_tokens=False)
        alone = tokenizer.encode(word, add_special_tokens=False)
        assert spaced[-len(alone):] == quoted[-len(alone):] == alone, word


def test_shared_prefix_forward_equals_the_model_prefill_per_sequence(tokenizer):
    model, _ = build_trainable(demo_model_config(tokenizer), tokenizer, seed=0)
    model.eval()
    items = data.tokenize(tokenizer, data.session_examples(3, seed=2))
    batch = data.prefix_batch(items, tokenizer.pad_token_id)
    P = batch.prefix.numel()
    assert P > 100  # the shared system text
    with torch.no_grad():
        logits = model.head(forward.suffix_hidden(model, batch))
        for b, item in enumerate(items):
            reference = model.prefill(torch.tensor([item.ids])).logits[0, P:]
            torch.testing.assert_close(logits[b, : len(item.ids) - P], reference, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_parameter_and_the_engram_tables(tokenizer):
    model, tables = build_trainable(demo_model_config(tokenizer), tokenizer, seed=0)
    batch = data.prefix_batch(data.tokenize(tokenizer, data.session_examples(2, seed=4)), tokenizer.pad_token_id)
    loss, _, labels = forward.batch_loss(model, batch)
    loss.backward()
    assert labels.numel() > 0 and torch.isfinite(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    for table in tables.parameters():
        assert table.grad is not None and table.grad.abs().sum() > 0


def test_resumed_run_matches_an_uninterrupted_one_and_exports_a_loadable_checkpoint(tmp_path):
    def settings(out: Path, stop_after: int | None) -> TrainSettings:
        return _tiny_settings(out, stop_after=stop_after)

    class Silent:
        def note(self, text): pass
        def step(self, *args): pass
        def done(self, result): pass

    straight = Trainer(settings(tmp_path / "a", None), log=Silent())
    straight.run()
    Trainer(settings(tmp_path / "b", 4), log=Silent()).run()  # stopped after 4 of the 6 steps ...
    resumed = Trainer(settings(tmp_path / "b", None), log=Silent())  # ... and continued to the end
    resumed.run()
    assert straight.step == resumed.step == 6
    for name, param in straight.params.items():
        torch.testing.assert_close(resumed.params[name], param, rtol=0, atol=0, msg=name)

    loaded = load_model(tmp_path / "a")
    fp8_tables = straight.tables.to_fp8()
    straight.model.engram_tables = fp8_tables  # the exported (FP8) tables, as the loaded model reads them
    with torch.no_grad():  # ... and the exported (bf16) weights
        for param in straight.model.parameters():
            param.copy_(param.to(EXPORT_DTYPE).float())
    straight.model.eval()
    probe = torch.tensor([data.tokenize(straight.tokenizer, data.session_examples(1, seed=9))[0].ids[:200]])
    torch.testing.assert_close(loaded(probe), straight.model.prefill(probe).logits, rtol=1e-4, atol=1e-4)


def test_export_writes_the_tokenizer_and_fp8_tables(tmp_path, tokenizer):
    model, tables = build_trainable(demo_model_config(tokenizer), tokenizer, seed=0)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer_dir / name).write_text("{}")
    export_checkpoint(model, tables, tokenizer_dir, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "engram_tables.safetensors", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert model.engram_tables is tables  # training continues on the fp32 tables


def _tiny_settings(out: Path, **changes) -> TrainSettings:
    return TrainSettings(**{**dict(out_dir=out, steps=6, batch_size=2, vocab_size=1024, eval_every=100, eval_examples=2,
                                   checkpoint_every=2, warmup_steps=2, tokenizer_examples=300, short_batch_size=3,
                                   full_every=2, copy_warmup_steps=2, copy_batch_size=2, copy_span=8,
                                   question_batch_size=2), **changes})


def test_batches_prepared_in_worker_processes_equal_the_in_process_ones(tmp_path, tokenizer, tokenizer_dir):
    settings = _tiny_settings(tmp_path)
    prefetcher = ChunkPrefetcher(tokenizer_dir, settings, workers=1)
    try:
        for chunk, short in ((0, False), (0, True), (2, True)):  # 2 skips 1: the queued chunk 1 is dropped
            got, expected = prefetcher.get(chunk, short), chunk_batches(tokenizer, settings, chunk, short)
            assert [[item.ids for item in b] for b in got] == [[item.ids for item in b] for b in expected]
            assert [[item.spans for item in b] for b in got] == [[item.spans for item in b] for b in expected]
    finally:
        prefetcher.close()


def test_a_time_budget_becomes_a_step_count_and_leaves_no_run_behind(tmp_path, monkeypatch):
    for name, value in (("COPY_SAMPLES", 1), ("AGENT_SAMPLES", 2), ("WARMUP_SAMPLES", 0)):
        monkeypatch.setattr(f"model_worker.training.budget.{name}", value)  # a smoke run, not a measurement
    notes = []
    settings = _tiny_settings(tmp_path / "run")
    steps = steps_for_budget(settings, 3600.0, notes.append)
    assert steps > settings.copy_warmup_steps and "steps fit in the budget" in notes[0]
    assert not (tmp_path / "run" / "train_state" / "state.json").exists()  # the measurement is not resumable
    assert steps_for_budget(settings, 1.0, notes.append) == settings.copy_warmup_steps + 1  # over budget: one step


def test_every_variant_trains_under_bf16_autocast(tokenizer):
    """The GPU recipe's autocast: mHC's stream mixes stay fp32 (its kernels refuse bf16 mixes), and the loss
    and gradients come out finite for the plain, no-Engram and mHC variants alike."""
    batch = data.prefix_batch(data.tokenize(tokenizer, data.session_examples(2, seed=3, short=True)),
                              tokenizer.pad_token_id)
    for engram, mhc in ((True, False), (False, False), (True, True)):
        model, _ = build_trainable(demo_model_config(tokenizer, engram=engram, mhc=mhc), tokenizer, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = forward.batch_loss(model, batch)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None), (engram, mhc)


def test_training_continues_from_an_exported_checkpoint(tmp_path, tokenizer, tokenizer_dir):
    """--init-from: the weights and (dequantized FP8) tables an export wrote are what training starts from,
    so the trainable model computes what the servable checkpoint computes."""
    model, tables = build_trainable(demo_model_config(tokenizer, mhc=False), tokenizer, seed=5)
    export_checkpoint(model, tables, tokenizer_dir, tmp_path / "exported")
    fresh, fresh_tables = build_trainable(demo_model_config(tokenizer, mhc=False), tokenizer, seed=6)
    load_exported(fresh, fresh_tables, tmp_path / "exported")
    probe = torch.tensor([data.tokenize(tokenizer, data.session_examples(1, seed=4))[0].ids[:150]])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().prefill(probe).logits, load_model(tmp_path / "exported")(probe),
                                   rtol=1e-4, atol=1e-4)
    other, other_tables = build_trainable(demo_model_config(tokenizer, engram=False, mhc=False), tokenizer, seed=6)
    with pytest.raises(ValueError, match="not a checkpoint of this architecture"):
        load_exported(other, other_tables, tmp_path / "exported")


def test_same_form_results_keep_the_wording_and_change_the_numbers():
    generator = traces.TraceGenerator(3)
    for _ in range(200):
        key, expression, _ = generator.arithmetic()
        other_key, other_expression, other_result = generator.same_form(key, expression)
        assert re.sub(r"\d+", "N", other_key) == re.sub(r"\d+", "N", key) and other_key != key
        assert re.sub(r"\d+", "N", other_expression) == re.sub(r"\d+", "N", expression)
        assert other_result == json.dumps(calculate(other_expression)["result"])


def test_arithmetic_with_a_look_alike_result_in_memory_still_calls_the_calculator():
    generator, shown_look_alike = traces.TraceGenerator(5, same_form_results=1.0), 0
    for _ in range(40):
        first = generator.session("arithmetic")[0]
        block = next(m["content"] for m in first.messages if m["role"] == "system")
        question = re.sub(r"\d+", "N", next(m["content"] for m in first.messages if m["role"] == "user"))
        saved = re.findall(r"\] (.+?) is -?[\d.]+\.$", block, flags=re.MULTILINE)  # "17 times 23 is 391."
        shown_look_alike += any(re.sub(r"\d+", "N", key) in question for key in saved)
        assert json.loads(first.target)["calls"][0]["name"] == "calculator"
    assert shown_look_alike >= 30  # retrieval shows the saved look-alike in most prompts
    plain = traces.TraceGenerator(5).session("arithmetic")  # off by default: the data of earlier runs
    assert traces.TraceGenerator(5, same_form_results=1.0).session("arithmetic") != plain


def test_a_saved_result_in_memory_leaves_remembering_a_fact_unchanged():
    """--saved-results: remember (and question) sessions with a product saved as the runtime leaves it (the result
    and its session's summary) in their store; the action is still to write the fact asked for, word for word."""
    generator, shown, summaries = traces.TraceGenerator(5, saved_results=1.0), 0, 0
    for _ in range(40):
        first = generator.session("remember")[0]
        block = next(m["content"] for m in first.messages if m["role"] == "system")
        task = next(m["content"] for m in first.messages if m["role"] == "user")
        product = re.search(r"\] (\d\d) times (\d\d) is (\d+)\.$", block, flags=re.MULTILINE)
        if product:
            shown += 1
            assert int(product.group(1)) * int(product.group(2)) == int(product.group(3))
            summaries += f"Outcome after 3 steps: {product.group(0)[2:]} I saved it to memory." in block  # runtime's
        call = json.loads(first.target)["calls"][0]
        assert call["name"] == "memory_write" and call["arguments"]["text"].rstrip(".").split(" is ")[-1] in task
    assert shown >= 16 and summaries >= 8  # word-overlap retrieval shows the saved result in over half the prompts
    plain = traces.TraceGenerator(5).session("remember")  # off by default: the data of earlier runs
    assert traces.TraceGenerator(5, saved_results=0.0).session("remember") == plain
    assert traces.TraceGenerator(5, saved_results=1.0).session("remember") != plain


def test_kind_weights_choose_the_task_mix():
    only_remember = tuple(1.0 if kind == "remember" else 0.0 for kind in traces.KINDS)
    assert {e.kind for e in data.session_examples(20, seed=1, weights=only_remember)} == {"remember"}
    with pytest.raises(ValueError, match="non-negative weights"):
        traces.TraceGenerator(0, weights=(1.0,))


def test_the_trace_generator_needs_neither_redis_nor_sqlalchemy():
    """It runs on GPU machines that have torch and pydantic but not the runtime's services' clients."""
    code = ("import sys, model_worker.training.trainer; "
            "print(sorted(m for m in ('redis', 'sqlalchemy', 'opentelemetry') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
