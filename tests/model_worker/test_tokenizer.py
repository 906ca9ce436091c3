"""Tokenizer wrapper, chat templates, the Engram compressed token map and the demo tokenizer.

References: transformers' PreTrainedTokenizerFast (encode, decode, apply_chat_template), the Engram
normalization written out here from MODEL_SPEC.md with `unicodedata`, and the spec's map rules.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from model_worker.demo_tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, build_demo_tokenizer
from model_worker.tokenizer import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_OUTPUT_CLOSE,
    TOOL_OUTPUT_OPEN,
    Tokenizer,
    load_tokenizer,
    normalize_for_engram,
)

# --------------------------------------------------------------------------------------------------
# Independent rendition of the Engram normalization (MODEL_SPEC.md), with unicodedata.
# Rust-side conventions made explicit: marks of every category (Mn, Mc, Me) are stripped, lowercase is
# per character (no Greek final sigma), Strip trims the Unicode White_Space property.

_WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def spec_normalize(text: str) -> str:
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    text = "".join(c.lower() for c in text if not unicodedata.category(c).startswith("M"))
    text = re.sub(r"[ \t\r\n]+", " ", text)
    if text == " ":
        return text
    return text.strip(_WHITE_SPACE).replace("\ue000", " ")


def _assigned_in_unicode_3_2(c: str) -> bool:
    # Python's and the Rust crates' Unicode tables differ only for characters assigned later.
    return unicodedata.ucd_3_2_0.category(c) != "Cn"


_HANDPICKED = [
    "", " ", "  ", "\t", "\n", " \t\r\n ", "Hello", " hello", "HELLO\n", "café", "CAFÉ", "cafe\u0301",
    "ﬁne", "Ｈｅｌｌｏ", "ΣΑΣ", "aΣ", "İstanbul", "straße", "Å", "ǅ", "①②", "½", "x\u00a0y", "\u3000a\u3000",
    "\x0b", "\x0c\x0c", "\x1c", "\x85a\x85", "a\ue000b", "\ue000", " \ue000 ", "ǆ", "ﬀ", "Ⅻ", "ｶﾞ", "가",
    "नमस्ते", "ไทย", "\u200b", "a  b\t\tc\n\nd", "\r\n", " a ", "Ω", "Ꮳ", "µ", "ſ", "ÿ", "Ÿ",
]  # fmt: skip


def _random_strings(n: int, seed: int = 0) -> list[str]:
    pool_ranges = [
        (0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x370, 0x400), (0x400, 0x460), (0x900, 0x980),
        (0x1E00, 0x1F00), (0x2000, 0x2070), (0x2150, 0x2190), (0x3000, 0x3040), (0xAC00, 0xAC40),
        (0xFB00, 0xFB07), (0xFF01, 0xFF70),
    ]  # fmt: skip
    pool = [chr(c) for lo, hi in pool_ranges for c in range(lo, hi) if _assigned_in_unicode_3_2(chr(c))]
    pool += list(" \t\r\n\n  ")
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 8))) for _ in range(n)]


def test_engram_normalizer_matches_unicodedata_rendition_of_the_spec():
    texts = _HANDPICKED + _random_strings(3000)
    mismatches = [
        (t, normalize_for_engram(t), spec_normalize(t)) for t in texts if normalize_for_engram(t) != spec_normalize(t)
    ]
    assert mismatches == []


def test_engram_normalizer_folds_case_accents_and_whitespace_but_keeps_a_lone_space():
    assert normalize_for_engram(" CAFÉ\t\n") == "cafe"
    assert normalize_for_engram("ﬁ") == "fi"
    assert normalize_for_engram("a \t\r\n b") == "a b"
    assert normalize_for_engram(" ") == " "
    assert normalize_for_engram("\n\n") == " "
    assert normalize_for_engram("  x  ") == "x"
    with pytest.raises(TypeError, match="text"):
        normalize_for_engram(b"bytes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# A small byte-level BPE holding case, accent and whitespace variants and partial-UTF-8 byte tokens.

_VARIANT_CORPUS = [
    "Hello hello HELLO world", "(hello) (HELLO) (Hello) (world)", "café cafe Café CAFÉ",
    "(café) (cafe) (CAFÉ)", "one\t\n\ntwo", "three  \n  four\r\n", "x\x0by\x0cz", "naïve naive",
] * 20  # fmt: skip


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory) -> Path:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_VARIANT_CORPUS, trainer=trainer)
    path = tmp_path_factory.mktemp("variant")
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    return path


@pytest.fixture(scope="module")
def variant(variant_dir) -> Tokenizer:
    return load_tokenizer(variant_dir)


def _ids(tok: Tokenizer, *raw_tokens: str) -> list[int]:
    ids = [tok.token_to_id(t) for t in raw_tokens]
    assert None not in ids, f"training did not produce all of {raw_tokens}"
    return ids


def test_compressed_map_merges_case_accent_and_leading_space_variants(variant):
    token_map = variant.compressed_token_map()
    hello = _ids(variant, "Hello", "hello", "HELLO", "Ġhello", "ĠHELLO")
    cafe = _ids(variant, "cafe", "cafÃ©", "CAFÃī", "ĠCAFÃī", "Ġcafe", "ĠCafÃ©")
    assert len({int(token_map[i]) for i in hello}) == 1
    assert len({int(token_map[i]) for i in cafe}) == 1
    assert token_map[hello[0]] != token_map[cafe[0]]
    naive = _ids(variant, "naÃ¯ve", "Ġnaive")
    assert token_map[naive[0]] == token_map[naive[1]]


def test_compressed_map_sends_every_whitespace_run_to_the_lone_space_id(variant):
    token_map = variant.compressed_token_map()
    space = _ids(variant, "Ġ")[0]
    runs = [i for i in range(variant.vocab_size) if re.fullmatch(r"[ \t\r\n]+", variant.decode([i]))]
    assert len(runs) >= 6  # " ", "\t", "\n", "\r", "\t\n", "  ", "\r\n", ...
    assert {int(token_map[i]) for i in runs} == {int(token_map[space])}


def test_compressed_map_keeps_text_that_normalizes_to_nothing(variant):
    token_map = variant.compressed_token_map()
    vtab, ffeed, space = _ids(variant, "ċ", "Č", "Ġ")  # "\x0b", "\x0c": Strip removes them
    assert len({int(token_map[vtab]), int(token_map[ffeed]), int(token_map[space])}) == 3


def test_compressed_map_keys_partial_utf8_tokens_by_raw_token(variant):
    token_map = variant.compressed_token_map()
    replacement = [i for i in range(variant.vocab_size) if "\ufffd" in variant.decode([i], False)]
    c3, c2, tail = _ids(variant, "Ã", "Â", "¯ve")  # bytes 0xC3, 0xC2 alone; 0xAF + "ve"
    assert {c3, c2, tail} <= set(replacement)
    # Every such token is its own key (its raw string), so none share a compressed id.
    assert len({int(token_map[i]) for i in replacement}) == len(replacement)
    assert len(replacement) >= 128


def test_compressed_map_numbers_ids_by_first_appearance(variant):
    token_map = variant.compressed_token_map()
    assert token_map.dtype == np.int64 and token_map.shape == (variant.vocab_size,)
    assert token_map[0] == 0
    running_max = np.maximum.accumulate(token_map)
    assert np.all(np.diff(running_max) <= 1)  # a new id is always the next unused one
    assert np.all((token_map == running_max) | (token_map < running_max))
    assert variant.compressed_vocab_size == len(np.unique(token_map)) == int(token_map.max()) + 1
    assert variant.compressed_vocab_size < variant.vocab_size


def test_compressed_map_matches_spec_built_with_transformers(variant_dir, variant):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(variant_dir / "tokenizer.json"))
    key_to_new: dict[str, int] = {}
    expected = []
    for token_id in range(len(hf)):
        text = hf.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "\ufffd" in text:
            key = hf.convert_ids_to_tokens(token_id)
        else:
            key = spec_normalize(text) or text
        expected.append(key_to_new.setdefault(key, len(key_to_new)))
    np.testing.assert_array_equal(variant.compressed_token_map(), np.array(expected, dtype=np.int64))


def test_compressed_map_is_cached_and_read_only(variant):
    token_map = variant.compressed_token_map()
    assert variant.compressed_token_map() is token_map
    with pytest.raises(ValueError):
        token_map[0] = 5


# --------------------------------------------------------------------------------------------------
# Encode / decode against transformers.


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    build_demo_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def demo(demo_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def hf_demo(demo_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(demo_dir))


_TEXTS = [
    "The agent adds 17 and 25 to get 42.", "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\n",
    "Ünïcödé, 日本語, emoji 🙂 and a café.", "", "x", f"{BOS} already has a BOS<|User|>hi",
]  # fmt: skip


@pytest.mark.parametrize("text", _TEXTS)
def test_encode_matches_transformers_and_round_trips(demo, hf_demo, text):
    ids = demo.encode(text)
    assert ids == hf_demo.encode(text)
    assert ids[0] == demo.bos_token_id == 0
    assert demo.encode(text, add_special_tokens=False) == hf_demo.encode(text, add_special_tokens=False)
    assert demo.decode(ids, skip_special_tokens=False) == hf_demo.decode(ids, skip_special_tokens=False)
    plain = demo.encode(text, add_special_tokens=False)
    assert demo.decode(plain, skip_special_tokens=False) == text
    assert demo.decode(ids) == hf_demo.decode(ids, skip_special_tokens=True)


def test_encode_batch_equals_encode_one_by_one(demo):
    assert demo.encode_batch(_TEXTS) == [demo.encode(t) for t in _TEXTS]
    assert demo.encode_batch(_TEXTS, add_special_tokens=False) == [demo.encode(t, False) for t in _TEXTS]


def test_decode_accepts_numpy_and_torch_ids(demo):
    import torch

    ids = demo.encode("memory and tools", add_special_tokens=False)
    assert demo.decode(np.array(ids)) == demo.decode(torch.tensor(ids)) == "memory and tools"


def _variant_copy(variant_dir: Path, out: Path, file_adds_bos: bool, **config) -> Path:
    backend = Backend.from_file(str(variant_dir / "tokenizer.json"))
    backend.post_processor = (
        processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)]) if file_adds_bos else None
    )
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>", **config}))
    return out


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True}])
def test_file_post_processor_decides_bos_like_transformers(variant_dir, tmp_path, flags):
    from transformers import PreTrainedTokenizerFast

    path = _variant_copy(variant_dir, tmp_path, file_adds_bos=True, **flags)
    ours, hf = Tokenizer.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(str(path))
    for text in ("hello world", ""):
        assert ours.encode(text) == hf.encode(text) == [0, *ours.encode(text, add_special_tokens=False)]


def test_config_flags_add_bos_eos_only_when_the_file_has_no_post_processor(variant_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    plain = _variant_copy(variant_dir, tmp_path, file_adds_bos=False)
    assert Tokenizer.from_pretrained(plain).encode("hello") == PreTrainedTokenizerFast.from_pretrained(
        str(plain)
    ).encode("hello")
    flagged = Tokenizer.from_pretrained(
        _variant_copy(variant_dir, tmp_path, file_adds_bos=False, add_bos_token=True, add_eos_token=True)
    )
    body = flagged.encode("hello", add_special_tokens=False)
    assert flagged.encode("hello") == [0, *body, 1]


# --------------------------------------------------------------------------------------------------
# Chat templates against transformers.

_SCHEMA = {"type": "object", "properties": {"expression": {"type": "string"}}}
_TOOLS = [{"type": "function", "function": {"name": "calc", "description": "Add.", "parameters": _SCHEMA}}]


def _call(arguments: dict | str) -> dict:
    return {"type": "function", "function": {"name": "calc", "arguments": arguments}}


_CONVERSATIONS = {
    "plain": [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}],
    "two_systems": [{"role": "system", "content": "Rule one."}, {"role": "system", "content": "Rule two."},
                    {"role": "user", "content": "ok"}],
    "no_system": [{"role": "user", "content": "résumé ✓\nline two"}],
    "tool_round": [
        {"role": "user", "content": "Compute 6*7"},
        {"role": "assistant", "content": "", "tool_calls": [_call({"expression": "6*7"})]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "tool_calls": [_call('{"expression": "42+0"}')]},  # OpenAI-style str arguments
        {"role": "tool", "content": "42"},
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_template_matches_transformers(demo, hf_demo, name, add_generation_prompt):
    messages = _CONVERSATIONS[name]
    tools = _TOOLS if name == "tool_round" else None
    ours = demo.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    theirs = hf_demo.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == theirs
    assert ours.endswith("<|Assistant|>") == add_generation_prompt


def test_default_template_lays_out_deepseek_turns(demo):
    rendered = demo.apply_chat_template(_CONVERSATIONS["plain"])
    assert rendered == (f"{BOS}You are brief.<|User|>Hi there<|Assistant|>Hello!{EOS}<|User|>What is 2+2?<|Assistant|>")
    ids = demo.encode_chat(_CONVERSATIONS["plain"])
    assert ids.count(demo.bos_token_id) == 1 and ids[0] == demo.bos_token_id
    assert demo.token_to_id("<|User|>") in ids and ids[-1] == demo.token_to_id("<|Assistant|>")


def test_default_template_writes_tool_calls_and_outputs_between_the_published_markers(demo):
    rendered = demo.apply_chat_template(_CONVERSATIONS["tool_round"], tools=_TOOLS)
    call = f'{TOOL_CALL_OPEN}{{"name": "calc", "arguments": {{"expression": "6*7"}}}}{TOOL_CALL_CLOSE}'
    assert f"<|Assistant|>{call}{EOS}{TOOL_OUTPUT_OPEN}42{TOOL_OUTPUT_CLOSE}" in rendered
    assert rendered.startswith(f"{BOS}## Tools\n") and json.dumps(_TOOLS[0]) in rendered


# Multi-line on purpose: whitespace control (trim_blocks, lstrip_blocks) must match transformers.
_CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{% endfor %}
{% if tools %}
  {{ tools | tojson(indent=2) }}
{% endif %}
{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}
{{ ns.n }} messages{{ eos_token }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture()
def chatml_dir(variant_dir, tmp_path) -> Path:
    (tmp_path / "tokenizer.json").write_bytes((variant_dir / "tokenizer.json").read_bytes())
    config = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": _CHATML_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_config_template_matches_transformers(chatml_dir):
    from transformers import PreTrainedTokenizerFast

    ours, hf = Tokenizer.from_pretrained(chatml_dir), PreTrainedTokenizerFast.from_pretrained(str(chatml_dir))
    messages = _CONVERSATIONS["plain"]
    for tools in (None, _TOOLS):
        assert ours.apply_chat_template(messages, tools=tools) == hf.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )


def test_template_raise_exception_becomes_value_error(chatml_dir):
    with pytest.raises(ValueError, match="system first"):
        Tokenizer.from_pretrained(chatml_dir).apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_jinja_file_is_used(chatml_dir):
    (chatml_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert Tokenizer.from_pretrained(chatml_dir).apply_chat_template([{"role": "user", "content": "hi"}]) == "HI"


def test_missing_template_falls_back_to_the_default(variant):
    rendered = variant.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|bos|><|User|>hi<|Assistant|>"


def test_sandbox_blocks_python_internals(chatml_dir):
    config = json.loads((chatml_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (chatml_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        Tokenizer.from_pretrained(chatml_dir).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ("hello", TypeError, "messages"),
        (["hello"], TypeError, r"messages\[0\]"),
        ([{"content": "no role"}], ValueError, r"messages\[0\]\['role'\]"),
        ([{"role": "user"}], ValueError, r"messages\[0\]\['content'\]"),
        ([{"role": "user", "content": 5}], ValueError, r"messages\[0\]\['content'\]"),
        ([{"role": "user", "content": [{"type": "image"}]}], ValueError, r"messages\[0\]\['content'\]\[0\]"),
        ([{"role": "robot", "content": "beep"}], ValueError, "unsupported message role"),
    ],
)
def test_malformed_messages_raise_clear_errors(demo, messages, error, match):
    with pytest.raises(error, match=match):
        demo.apply_chat_template(messages)


def test_text_parts_are_joined_into_content(demo):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert demo.apply_chat_template(parts) == demo.apply_chat_template([{"role": "user", "content": "Hi there"}])


# --------------------------------------------------------------------------------------------------
# Loading errors and argument checks.


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_pickle_or_vocab_only_directory_is_refused_without_unpickling(tmp_path):
    # Unpickling this would raise a RuntimeError, not the FileNotFoundError we expect.
    (tmp_path / "tokenizer.pkl").write_bytes(b"cbuiltins\nRuntimeError\n(S'unpickled!'\ntR.")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.pkl, vocab.json.*never loaded"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_config_values_are_named(variant_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((variant_dir / "tokenizer.json").read_bytes())
    for config, match in [
        ({"bos_token": "<s>"}, "bos_token"),
        ({"add_bos_token": "yes"}, "add_bos_token"),
        ({"chat_template": "{% for %}"}, "chat_template"),
        ({"chat_template": 3}, "chat_template"),
    ]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=match):
            Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_encode_and_decode_check_their_arguments(demo):
    with pytest.raises(TypeError, match="text"):
        demo.encode(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="texts"):
        demo.encode_batch("abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ids"):
        demo.decode([demo.vocab_size])
    with pytest.raises(ValueError, match="ids"):
        demo.decode([-1])
    with pytest.raises(TypeError, match="ids"):
        demo.decode([[1, 2]])
    with pytest.raises(TypeError, match="tools"):
        demo.apply_chat_template([{"role": "user", "content": "x"}], tools="calculator")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Demo tokenizer.


def _digest(path: Path) -> str:
    return hashlib.sha256(
        (path / "tokenizer.json").read_bytes() + (path / "tokenizer_config.json").read_bytes()
    ).hexdigest()


def test_demo_tokenizer_builds_identically_twice_and_in_a_fresh_process(demo_dir, tmp_path):
    build_demo_tokenizer(tmp_path / "again")
    assert _digest(tmp_path / "again") == _digest(demo_dir)
    script = "import sys; from model_worker.demo_tokenizer import build_demo_tokenizer as b; b(sys.argv[1])"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "proc")], check=True, cwd=root)
    assert _digest(tmp_path / "proc") == _digest(demo_dir)


def test_demo_tokenizer_has_deepseek_special_ids_and_exact_vocab(demo, tmp_path):
    assert [demo.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (demo.bos_token_id, demo.eos_token_id, demo.pad_token_id) == (0, 1, 2)
    assert demo.pad_token == PAD and demo.vocab_size == len(demo) == 2048
    assert demo.token_to_id("<|reserved_0|>") is None  # the built-in corpus fills 2048 with learned tokens
    small = build_demo_tokenizer(tmp_path, vocab_size=300, corpus=["a tiny corpus"])
    assert small.vocab_size == 300 and small.token_to_id("<|reserved_0|>") is not None
    assert small.decode(small.encode("a tiny corpus")) == "a tiny corpus"


def test_demo_tokenizer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_demo_tokenizer(tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="corpus"):
        build_demo_tokenizer(tmp_path, corpus=[])
