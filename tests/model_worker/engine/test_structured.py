"""Structured decoding: with random logits (a random-weight model) every JSON-schema / regex constrained
output decodes to text that json.loads + jsonschema (or re.fullmatch) accept; EOS is allowed exactly when
the output is complete; the token-byte vocabulary and the bitmask unpacking match independent references."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from model_worker.demo_tokenizer import build_demo_tokenizer
from model_worker.engine.sampling import Sampler, SamplingParams, make_generator
from model_worker.engine.structured import GrammarBackend, apply_grammar_masks, token_bytes
from model_worker.tokenizer import Tokenizer

PADDING = 37  # the model's lm_head is wider than the tokenizer (not a multiple of 32 on purpose)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "tags", "active"],
}
REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org|net)"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return build_demo_tokenizer(tmp_path_factory.mktemp("demo_tokenizer"))


@pytest.fixture(scope="module")
def backend(tokenizer) -> GrammarBackend:
    return GrammarBackend(tokenizer, tokenizer.vocab_size + PADDING)


def generate(backend: GrammarBackend, grammar, seed: int, max_steps: int = 400, on_step=None) -> tuple[list[int], bool]:
    """Constrained generation from random logits (scaled so they are peaky, like a model's); returns ids, ended."""
    state = backend.matcher(grammar)
    logits_source = torch.Generator().manual_seed(seed)
    params, generator = SamplingParams(temperature=1.0, seed=seed), make_generator(seed)
    ids: list[int] = []
    for _ in range(max_steps):
        logits = torch.randn(backend.vocab_size, generator=logits_source) * 3.0
        if on_step is not None:
            on_step(ids, state.allowed_tokens())
        state.fill_mask(logits)
        token = Sampler()(logits[None], [params], [generator]).token_ids[0]
        state.accept(token)
        if state.is_terminated():
            return ids, True
        ids.append(token)
    return ids, False


def test_schema_outputs_from_random_logits_always_parse_and_validate(tokenizer, backend):
    grammar = backend.compile(json_schema=SCHEMA)
    outputs = []
    for seed in range(50):
        ids, ended = generate(backend, grammar, seed)
        assert ended, f"seed {seed}: grammar did not finish within the step budget"
        text = tokenizer.decode(ids)
        value = json.loads(text)
        jsonschema.validate(value, SCHEMA)
        outputs.append(value)
    assert len({json.dumps(v) for v in outputs}) > 40  # really different outputs, not one forced string


def test_regex_outputs_from_random_logits_always_match(tokenizer, backend):
    grammar = backend.compile(regex=REGEX)
    for seed in range(50):
        ids, ended = generate(backend, grammar, seed)
        assert ended
        text = tokenizer.decode(ids)
        assert re.fullmatch(REGEX, text), text


@pytest.mark.parametrize(("kind", "source"), [("json_schema", SCHEMA), ("regex", REGEX)])
def test_eos_is_allowed_exactly_when_the_output_is_complete(tokenizer, backend, kind, source):
    def complete(text: str) -> bool:
        if kind == "regex":
            return re.fullmatch(REGEX, text) is not None
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    checked = []

    def on_step(ids, allowed):
        text = tokenizer.decode(ids)
        assert bool(allowed[tokenizer.eos_token_id]) == complete(text), text
        checked.append(complete(text))

    grammar = backend.compile(**{kind: source})
    for seed in range(8):
        _, ended = generate(backend, grammar, 1000 + seed, on_step=on_step)
        assert ended
    assert any(checked) and not all(checked)


def test_special_and_padding_tokens_are_never_allowed(tokenizer, backend):
    state = backend.matcher(backend.compile(json_schema={"type": "string"}))
    state.accept(tokenizer.token_to_id('"'))
    allowed = state.allowed_tokens()
    assert allowed.shape == (tokenizer.vocab_size + PADDING,)
    assert allowed.sum() > 1000  # inside a string nearly everything goes
    forbidden = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.token_to_id("<|User|>"),
                 *range(tokenizer.vocab_size, tokenizer.vocab_size + PADDING)]
    assert not allowed[forbidden].any()


def test_json_strings_never_allow_raw_control_characters(tokenizer, backend):
    state = backend.matcher(backend.compile(json_schema=SCHEMA))
    for token in tokenizer.encode('{"name": "a', add_special_tokens=False):
        state.accept(token)
    vocab = token_bytes(tokenizer, backend.vocab_size)
    allowed = state.allowed_tokens()
    assert allowed.sum() > 500
    control = [i for i, b in enumerate(vocab) if b is not None and any(x < 0x20 for x in b)]
    assert control and not allowed[control].any()


def test_token_bytes_concatenate_to_the_decoded_text(tokenizer):
    vocab = token_bytes(tokenizer, tokenizer.vocab_size + PADDING)
    assert all(vocab[i] is None for i in range(tokenizer.vocab_size, tokenizer.vocab_size + PADDING))
    text_ids = [i for i, b in enumerate(vocab) if b is not None]
    sequences = [tokenizer.encode("café 日本 🙂 naïve, 42 + 17 = 59.\n\tdone", add_special_tokens=False)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        picks = torch.randint(len(text_ids), (12,), generator=generator).tolist()
        sequences.append([text_ids[p] for p in picks])
    for ids in sequences:
        assert b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace") == tokenizer.decode(ids)


def test_fill_mask_matches_xgrammar_reference_masking(tokenizer, backend):
    import xgrammar as xgr

    grammar = backend.compile(regex=REGEX)
    state = backend.matcher(grammar)
    reference_matcher = xgr.GrammarMatcher(grammar.compiled)
    for token in tokenizer.encode("ab", add_special_tokens=False):
        state.accept(token)
        assert reference_matcher.accept_token(token)
    logits = torch.randn(backend.vocab_size, generator=torch.Generator().manual_seed(1))
    ours, reference = logits.clone(), logits.clone()[None]
    state.fill_mask(ours)
    bitmask = xgr.allocate_token_bitmask(1, backend.vocab_size)
    reference_matcher.fill_next_token_bitmask(bitmask)
    xgr.apply_token_bitmask_inplace(reference, bitmask)
    assert torch.equal(ours, reference[0])
    assert torch.isinf(ours).sum() > 0 and torch.isfinite(ours).sum() > 10


def test_batched_masks_equal_per_row_masks(backend):
    states = [backend.matcher(backend.compile(json_schema=SCHEMA)), None, backend.matcher(backend.compile(regex=REGEX))]
    logits = torch.randn(3, backend.vocab_size, generator=torch.Generator().manual_seed(2))
    expected = logits.clone()
    for row, state in enumerate(states):
        if state is not None:
            state.fill_mask(expected[row])
    apply_grammar_masks(logits, states)
    assert torch.equal(logits, expected)


def test_grammar_rejects_a_disallowed_token_and_tokens_after_the_end(tokenizer, backend):
    state = backend.matcher(backend.compile(json_schema=SCHEMA))
    with pytest.raises(ValueError, match="does not allow"):
        state.accept(tokenizer.token_to_id("a"))  # JSON object must start with "{"
    state = backend.matcher(backend.compile(regex="ok"))
    for token in tokenizer.encode("ok", add_special_tokens=False):
        state.accept(token)
    assert state.can_terminate() and not state.is_terminated()
    state.accept(tokenizer.eos_token_id)
    assert state.is_terminated()
    assert state.allowed_tokens().nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="ended"):
        state.accept(tokenizer.token_to_id("o"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"json_schema": {"type": "foo"}}, "json_schema"),
        ({"json_schema": {"properties": 3}}, "json_schema"),
        ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 2}}, "json_schema"),
        ({"json_schema": {"$ref": "#/definitions/missing"}}, "json_schema"),
        ({"json_schema": "{}"}, "json_schema"),
        ({"json_schema": {"default": object()}}, "json_schema"),
        ({"regex": "(ab"}, "regex"),
        ({"regex": "[a-"}, "regex"),
        ({}, "json_schema / regex"),
        ({"json_schema": {"type": "string"}, "regex": "a"}, "json_schema / regex"),
    ],
)
def test_invalid_grammar_raises_value_error_naming_the_argument(backend, kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        backend.compile(**kwargs)


def test_compiled_grammars_are_cached(backend):
    first = backend.compile(json_schema=dict(SCHEMA))
    assert backend.compile(json_schema=dict(SCHEMA)) is first
    assert backend.compile(regex=REGEX) is not first


def test_fill_mask_rejects_a_row_of_the_wrong_width(backend):
    state = backend.matcher(backend.compile(regex=REGEX))
    with pytest.raises(ValueError, match="logits_row"):
        state.fill_mask(torch.zeros(backend.vocab_size - 1))


def test_non_byte_level_tokenizer_is_rejected():
    word_level = BackendTokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2}, unk_token="a"))
    tokenizer = Tokenizer(word_level, {"eos_token": "<eos>"})
    with pytest.raises(ValueError, match="byte-level"):
        GrammarBackend(tokenizer, 3)


def test_masks_apply_to_inference_mode_logits(backend):
    with torch.inference_mode():
        logits = torch.zeros(2, backend.vocab_size)
    states = [backend.matcher(backend.compile(regex=REGEX)), None]
    backend.matcher(backend.compile(regex=REGEX)).fill_mask(logits[0])
    apply_grammar_masks(logits, states)
    assert torch.isinf(logits[0]).any() and not torch.isinf(logits[1]).any()
