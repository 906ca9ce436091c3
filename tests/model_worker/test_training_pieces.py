"""Made-up training words of more tokenizer pieces (`--piece-max-count`): held-out words such as
"electrician" break into 5-6 of the demo tokenizer's tokens, more than the default 3 a made-up word has."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from model_worker.tokenizer import Tokenizer
from model_worker.training import data, pools

DEMO_MODEL = Path(__file__).resolve().parents[2] / "model_worker" / "demo_model"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(DEMO_MODEL)


def _piece_words(pieces: pools.WordPieces, count: int = 2000) -> list[str]:
    rng = random.Random(5)
    return [pools.fresh_word(rng, frozenset(), pieces) for _ in range(count)]


def _tokens(tokenizer: Tokenizer, word: str) -> int:
    return len(tokenizer.encode(" is " + word, add_special_tokens=False)) - 2  # less " " and "is"


def test_held_out_words_have_more_pieces_than_a_default_made_up_word(tokenizer):
    held_out = [w for w in ("electrician", "quesadillas", "turquoise", "carpenter") if w in pools.held_out_words()]
    assert held_out, "the example words are no longer held out: pick others"
    assert min(_tokens(tokenizer, w) for w in held_out) > pools.PIECE_MAX_COUNT


def test_made_up_words_take_up_to_max_count_pieces(tokenizer):
    default, longer = data.word_pieces(tokenizer), data.word_pieces(tokenizer, 6)
    assert default.max_count == pools.PIECE_MAX_COUNT == 3 and longer.max_count == 6
    assert (default.lower, default.upper) == (longer.lower, longer.upper)
    letters = pools.PIECE_MAX_LETTERS
    short, long_ = _piece_words(default), _piece_words(longer)
    assert max(map(len, short)) <= 3 * letters
    assert max(map(len, long_)) <= 6 * letters and max(map(len, long_)) > 3 * letters
    assert max(_tokens(tokenizer, w) for w in long_) > max(_tokens(tokenizer, w) for w in short)
    with pytest.raises(ValueError, match="at least one piece"):
        data.word_pieces(tokenizer, 0)


def test_the_training_command_takes_a_piece_count(tmp_path, capsys):
    from model_worker.training.__main__ import _piece_count, main

    assert _piece_count("6") == 6 and _piece_count("1") == 1
    for bad in ("0", "13", "six", "-2"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path / "run"), "--piece-max-count", bad])
        assert exit_info.value.code == 2
        assert "--piece-max-count" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_training_settings_choose_the_pieces(tokenizer, tmp_path):
    from model_worker.training.prefetch import settings_pieces
    from model_worker.training.trainer import TrainSettings

    assert settings_pieces(tokenizer, TrainSettings(out_dir=tmp_path)).max_count == pools.PIECE_MAX_COUNT
    assert settings_pieces(tokenizer, TrainSettings(out_dir=tmp_path, piece_max_count=6)).max_count == 6
    assert settings_pieces(tokenizer, TrainSettings(out_dir=tmp_path, piece_words=False)) is None
