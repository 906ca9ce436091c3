"""Sampler and SamplingParams: greedy, the temperature/top-k/top-p distribution against the analytic one,
per-request seeds independent of the batch, logprobs, and validation errors that name the field."""

from __future__ import annotations

import math

import pytest
import torch

from model_worker.engine.sampling import Sampler, SampleResult, SamplingParams, make_generator

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]
DRAWS = 20_000
# Chi-square bound for <= 5 degrees of freedom: the 99.99% quantile is ~25.7; a wrong distribution
# (e.g. a missing temperature or an off-by-one nucleus) gives hundreds at this many draws.
CHI2_BOUND = 30.0


def analytic_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The target distribution written out from the definitions, in plain Python."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = order[:top_k] if top_k > 0 else order
    z = sum(math.exp(scaled[i]) for i in kept)
    nucleus, mass = [], 0.0
    for i in kept:
        if mass >= top_p and top_p < 1.0:
            break
        nucleus.append(i)
        mass += math.exp(scaled[i]) / z
    z = sum(math.exp(scaled[i]) for i in nucleus)
    return [math.exp(scaled[i]) / z if i in nucleus else 0.0 for i in range(len(logits))]


def draw_counts(params: SamplingParams, seed: int = 0) -> list[int]:
    logits = torch.tensor([LOGITS] * DRAWS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        result = Sampler()(logits, [params] * DRAWS, [None] * DRAWS)
    return torch.bincount(torch.tensor(result.token_ids), minlength=len(LOGITS)).tolist()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (2.0, 4, 0.9), (0.7, 2, 0.5)],
)
def test_sampled_distribution_matches_temperature_top_k_top_p_definition(temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    expected = analytic_distribution(LOGITS, temperature, top_k, top_p)
    counts = draw_counts(params)
    outside = [i for i, p in enumerate(expected) if p == 0.0 and counts[i] > 0]
    assert not outside, f"tokens outside the support were drawn: {outside} ({counts})"
    chi2 = sum((counts[i] - DRAWS * p) ** 2 / (DRAWS * p) for i, p in enumerate(expected) if p > 0)
    assert chi2 < CHI2_BOUND, f"chi2={chi2:.1f} counts={counts} expected={[round(DRAWS * p) for p in expected]}"


def test_top_p_support_matches_nucleus_boundary():
    # Probabilities 0.5, 0.3, 0.2: a token stays while the mass before it is < top_p.
    logits = [math.log(0.5), math.log(0.3), math.log(0.2)]
    for top_p, support in [(0.45, {0}), (0.55, {0, 1}), (0.85, {0, 1, 2})]:
        rows = 3000
        with torch.random.fork_rng():
            torch.manual_seed(1)
            result = Sampler()(torch.tensor([logits] * rows), [SamplingParams(top_p=top_p)] * rows, [None] * rows)
        assert set(result.token_ids) == support, top_p


def test_greedy_is_argmax_and_draws_no_random_numbers():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    generator = make_generator(7)
    before = generator.get_state().clone()
    result = Sampler()(logits, [SamplingParams(temperature=0.0)] * 8, [generator] * 8)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert torch.equal(generator.get_state(), before)


@pytest.mark.parametrize("params", [SamplingParams(top_k=1, temperature=5.0), SamplingParams(top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_pick_the_argmax(params):
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(4))
    result = Sampler()(logits, [params] * 16, [make_generator(i) for i in range(16)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_masked_logits_are_never_sampled():
    logits = torch.randn(200, 64, generator=torch.Generator().manual_seed(5)) * 4
    allowed = torch.zeros(64, dtype=torch.bool)
    allowed[[3, 17, 40, 41]] = True
    logits[:, ~allowed] = float("-inf")
    result = Sampler()(logits, [SamplingParams(temperature=1.5)] * 200, [make_generator(9)] * 200)
    assert set(result.token_ids) <= {3, 17, 40, 41}


def _seeded_run(position: int, others: list[tuple[SamplingParams, torch.Generator | None]], steps: int = 24):
    """Tokens of a seed-42 request sampled at `position` in a batch with `others`, over `steps` steps."""
    mine = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=42)
    my_generator = make_generator(mine.seed)
    logit_source = torch.Generator().manual_seed(11)
    noise_source = torch.Generator().manual_seed(position + 100)  # other rows: different logits per run
    tokens = []
    for _ in range(steps):
        my_logits = torch.randn(1, 500, generator=logit_source)
        other_logits = torch.randn(len(others), 500, generator=noise_source)
        logits = torch.cat([other_logits[:position], my_logits, other_logits[position:]])
        params = [p for p, _ in others]
        generators = [g for _, g in others]
        params.insert(position, mine)
        generators.insert(position, my_generator)
        tokens.append(Sampler()(logits, params, generators).token_ids[position])
    return tokens


def test_same_seed_gives_same_tokens_alone_or_batched():
    alone = _seeded_run(0, [])
    others = [
        (SamplingParams(temperature=0.0), None),
        (SamplingParams(temperature=1.0), None),
        (SamplingParams(temperature=1.3, seed=42), make_generator(42)),  # same seed, own generator
        (SamplingParams(top_k=5, seed=7), make_generator(7)),
        (SamplingParams(top_p=0.5, logprobs=3), None),
    ]
    assert _seeded_run(2, others) == alone
    assert _seeded_run(5, others) == alone
    assert len(set(alone)) > 5  # the run really samples (not a constant)


def test_different_seeds_give_different_tokens():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(12))
    runs = []
    for seed in (1, 2):
        generator = make_generator(seed)
        runs.append([Sampler()(logits, [SamplingParams()], [generator]).token_ids[0] for _ in range(20)])
    assert runs[0] != runs[1]


def test_logprobs_are_log_softmax_of_unscaled_logits():
    logits = torch.randn(4, 80, generator=torch.Generator().manual_seed(13)) * 3
    params = [
        SamplingParams(temperature=0.6, top_k=10, logprobs=5),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=2.0),
        SamplingParams(temperature=1.0, top_p=0.7, logprobs=20),
    ]
    result = Sampler()(logits, params, [make_generator(i) for i in range(4)])
    assert isinstance(result, SampleResult)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for row, p in enumerate(params):
        if p.logprobs is None:
            assert result.logprobs[row] is None and result.top_logprobs[row] is None
            continue
        token = result.token_ids[row]
        assert result.logprobs[row] == pytest.approx(reference[row, token].item(), abs=1e-5)
        top_values, top_ids = reference[row].topk(p.logprobs)
        assert [t for t, _ in result.top_logprobs[row]] == top_ids.tolist()
        assert [lp for _, lp in result.top_logprobs[row]] == pytest.approx(top_values.tolist(), abs=1e-5)


def test_make_generator_is_reproducible_and_none_without_seed():
    assert make_generator(None) is None
    a, b = make_generator(2**64 - 1), make_generator(-1)  # same seed modulo 2**64
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", True),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("seed", 2**64),
        ("logprobs", 21),
        ("logprobs", -1),
        ("stop", [""]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("json_schema", "not a dict"),
        ("regex", 3),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_schema_and_regex_are_exclusive_and_unknown_fields_rejected():
    with pytest.raises(ValueError, match="json_schema and regex"):
        SamplingParams(json_schema={"type": "string"}, regex="a+")
    with pytest.raises(ValueError, match="tempreature"):
        SamplingParams(tempreature=0.5)
    params = SamplingParams()
    with pytest.raises(ValueError, match="max_tokens"):
        params.max_tokens = -3


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ["END"]


def test_sampler_rejects_malformed_inputs():
    sampler = Sampler()
    with pytest.raises(ValueError, match="logits"):
        sampler(torch.zeros(5), [SamplingParams()], [None])
    with pytest.raises(TypeError, match="logits"):
        sampler(torch.zeros(1, 5, dtype=torch.long), [SamplingParams()], [None])
    with pytest.raises(ValueError, match="params"):
        sampler(torch.zeros(2, 5), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match="generators"):
        sampler(torch.zeros(1, 5), [SamplingParams()], [])
