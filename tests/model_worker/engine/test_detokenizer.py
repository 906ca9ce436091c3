"""Incremental detokenizer: deltas add up to tokenizer.decode of all output ids, no partial UTF-8 character
is ever emitted, and stop strings (also across token boundaries) are cut and never leak into a delta."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models

from model_worker.demo_tokenizer import build_demo_tokenizer
from model_worker.engine.detokenizer import IncrementalDetokenizer
from model_worker.tokenizer import Tokenizer

TEXT = "Hello café 日本語, naïve 🙂 résumé: 42 + 17 = 59. The END of 東京 story."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return build_demo_tokenizer(tmp_path_factory.mktemp("demo_tokenizer"))


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer.encode("The user said: ")


def stream(tokenizer, prompt, ids, stop=(), chunk=1) -> tuple[list[str], list[bool], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt, list(stop))
    deltas, hits = [], []
    for start in range(0, len(ids), chunk):
        delta, hit = detok.step(ids[start:start + chunk])
        deltas.append(delta)
        hits.append(hit)
    return deltas, hits, detok


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_deltas_concatenate_to_the_decoded_text(tokenizer, prompt, chunk):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # the text really splits characters
    deltas, hits, detok = stream(tokenizer, prompt, ids, chunk=chunk)
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT
    assert detok.text == TEXT and not any(hits)


def test_no_delta_holds_a_partial_character(tokenizer, prompt):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, _, detok = stream(tokenizer, prompt, ids)
    emitted = ""
    for delta in deltas:
        assert "\ufffd" not in delta
        emitted += delta
        assert TEXT.startswith(emitted)  # never revised later
    assert emitted == TEXT  # a whole-character text needs no flush


def test_random_token_streams_concatenate_to_decode(tokenizer, prompt):
    """Random ids (invalid UTF-8 runs, special tokens, ids past the vocabulary) still add up to decode()."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = torch.randint(tokenizer.vocab_size + 10, (int(torch.randint(1, 30, (1,), generator=generator)),),
                            generator=generator).tolist()
        deltas, _, detok = stream(tokenizer, prompt, ids)
        deltas.append(detok.flush())
        in_vocab = [i for i in ids if i < tokenizer.vocab_size]
        assert "".join(deltas) == tokenizer.decode(in_vocab)
        assert all(not d.endswith("\ufffd") for d in deltas[:-1])


@pytest.mark.parametrize("stop", ["END", "7 = 5", "語, na", "東京", "e END o"])
def test_stop_string_is_cut_and_never_leaks(tokenizer, prompt, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, hits, detok = stream(tokenizer, prompt, ids, stop=[stop])
    before = TEXT[: TEXT.index(stop)]
    assert "".join(deltas) == detok.text == before
    first_hit = hits.index(True)
    # The hit comes with the token that completes the stop string, not later.
    assert stop in tokenizer.decode(ids[: first_hit + 1]) and stop not in tokenizer.decode(ids[:first_hit])
    assert all(hits[first_hit:]) and not any(deltas[first_hit + 1:])
    assert detok.flush() == ""


def test_stop_string_spanning_token_boundaries(tokenizer, prompt):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    stop = "語, na"
    start = TEXT.index(stop)
    spans, pos = [], 0  # which tokens cover the stop string
    for i in range(len(ids)):
        pos_next = len(tokenizer.decode(ids[: i + 1]).rstrip("\ufffd"))
        if pos_next > start and pos < start + len(stop):
            spans.append(i)
        pos = pos_next
    assert len(spans) >= 2  # the premise of this test
    _, hits, detok = stream(tokenizer, prompt, ids, stop=[stop])
    assert any(hits) and detok.text == TEXT[:start]


@pytest.mark.parametrize("chunk", [1, 1000])
def test_earliest_of_several_stop_strings_wins(tokenizer, prompt, chunk):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, _, detok = stream(tokenizer, prompt, ids, stop=["story", "END", "42"], chunk=chunk)
    assert detok.text == "".join(deltas) == TEXT[: TEXT.index("42")]


def test_prompt_tail_gives_context_to_the_first_output_token():
    """With a Metaspace decoder a token's leading space is dropped at the start of a text, not after the prompt."""
    backend = BackendTokenizer(models.WordLevel({"▁hello": 0, "▁world": 1, "<unk>": 2}, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace()
    tokenizer = Tokenizer(backend)
    prompt, output = [0], [1, 0, 1]
    deltas, _, detok = stream(tokenizer, prompt, output)
    expected = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)):]
    assert expected == " world hello world"
    assert "".join(deltas) + detok.flush() == expected


def test_false_start_of_a_stop_string_is_released(tokenizer, prompt):
    ids = tokenizer.encode("ab abc", add_special_tokens=False)
    deltas, hits, detok = stream(tokenizer, prompt, ids, stop=["abc"])
    assert hits[-1] and "".join(deltas) == detok.text == "ab "


def test_flush_releases_a_held_stop_prefix_and_an_unfinished_character(tokenizer, prompt):
    ids = tokenizer.encode("wait for EN", add_special_tokens=False)
    deltas, hits, detok = stream(tokenizer, prompt, ids, stop=["END"])
    assert "".join(deltas) == "wait for " and not any(hits)
    assert detok.flush() == "EN" and detok.text == "wait for EN"

    partial = tokenizer.encode("日", add_special_tokens=False)[:-1]  # a character cut short
    deltas, _, detok = stream(tokenizer, prompt, partial)
    assert "".join(deltas) == ""
    assert detok.flush() == tokenizer.decode(partial) == "\ufffd"


def test_special_tokens_add_no_text(tokenizer, prompt):
    ids = [*tokenizer.encode("done", add_special_tokens=False), tokenizer.eos_token_id]
    deltas, _, detok = stream(tokenizer, prompt, ids)
    assert "".join(deltas) + detok.flush() == "done"


def test_invalid_arguments_are_rejected(tokenizer, prompt):
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tokenizer, prompt, [""])
    with pytest.raises(TypeError, match="prompt_token_ids"):
        IncrementalDetokenizer(tokenizer, "hello", [])
    detok = IncrementalDetokenizer(tokenizer, prompt, [])
    with pytest.raises(TypeError, match="new_token_ids"):
        detok.step([1.5])
    with pytest.raises(ValueError, match="new_token_ids"):
        detok.step([-1])
    with pytest.raises(TypeError, match="tokenizer"):
        IncrementalDetokenizer(object(), prompt, [])
