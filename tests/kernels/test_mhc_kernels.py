"""mHC kernels: Triton (interpreter on CPU) against the torch references, and the references
against the formulas of MODEL_SPEC.md written out independently (loops, explicit Sinkhorn)."""

from __future__ import annotations

import pytest
import torch

import engram_kernels.mhc.post as post_module
from engram_kernels.mhc import (
    mhc_post,
    mhc_post_ref,
    mhc_post_triton,
    mhc_pre,
    mhc_pre_ref,
    mhc_pre_triton,
    mhc_split,
    mhc_split_ref,
    mhc_split_triton,
)

# The interpreter truncates fp32 -> bf16 stores where the GPU rounds to nearest: allow one bf16 ulp.
BF16_ULP = 2.0**-7


def _weights(n: int, lead: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random split inputs: mixes [*lead, (2+n)*n], scale [3], base [(2+n)*n] (non-symmetric comb)."""
    g = torch.Generator().manual_seed(seed)
    width = (2 + n) * n
    mixes = torch.randn(*lead, width, generator=g)
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn(width, generator=g)
    return mixes, scale, base


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype == dtype
    if dtype == torch.bfloat16:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=BF16_ULP, atol=1e-6)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("lead", [(5,), (2, 37)])
def test_split_triton_matches_reference(n: int, lead: tuple[int, ...]) -> None:
    mixes, scale, base = _weights(n, lead)
    for ours, ref in zip(mhc_split_triton(mixes, scale, base, n), mhc_split_ref(mixes, scale, base, n)):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_split_triton_honours_iters_and_eps() -> None:
    mixes, scale, base = _weights(4, (3,))
    ours = mhc_split_triton(mixes, scale, base, 4, sinkhorn_iters=3, eps=1e-2)
    ref = mhc_split_ref(mixes, scale, base, 4, sinkhorn_iters=3, eps=1e-2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_split_reference_matches_spec_formula() -> None:
    n, iters, eps = 3, 20, 1e-6
    mixes, scale, base = _weights(n, (4,))
    pre, post, comb = mhc_split_ref(mixes, scale, base, n, iters, eps)
    for t in range(mixes.shape[0]):
        m = mixes[t].tolist()
        b = base.tolist()
        s = scale.tolist()
        for i in range(n):
            want_pre = 1 / (1 + torch.exp(torch.tensor(-(m[i] * s[0] + b[i])))) + eps
            want_post = 2 / (1 + torch.exp(torch.tensor(-(m[n + i] * s[1] + b[n + i]))))
            assert pre[t, i].item() == pytest.approx(want_pre.item(), rel=1e-5)
            assert post[t, i].item() == pytest.approx(want_post.item(), rel=1e-5)
        logits = [[m[2 * n + j * n + k] * s[2] + b[2 * n + j * n + k] for k in range(n)] for j in range(n)]
        mat = [[torch.tensor(v).exp().item() for v in row] for row in logits]
        mat = [[v / sum(row) + eps for v in row] for row in mat]
        steps = ["col"] + ["row", "col"] * (iters - 1)
        for step in steps:
            if step == "row":
                mat = [[v / (sum(row) + eps) for v in row] for row in mat]
            else:
                col_sums = [sum(mat[j][k] for j in range(n)) for k in range(n)]
                mat = [[mat[j][k] / (col_sums[k] + eps) for k in range(n)] for j in range(n)]
        torch.testing.assert_close(comb[t], torch.tensor(mat), rtol=1e-5, atol=1e-7)


def test_split_comb_is_doubly_stochastic() -> None:
    # Moderate logits, as from a trained layer: 20 Sinkhorn steps converge there (very peaked
    # softmax rows need more steps, in the reference and transformers alike).
    mixes, scale, base = _weights(4, (16,))
    _, _, comb = mhc_split_triton(mixes * 0.5, scale, base * 0.5, 4)
    ones = torch.ones(16, 4)
    torch.testing.assert_close(comb.sum(dim=-1), ones, atol=1e-3, rtol=0)
    torch.testing.assert_close(comb.sum(dim=-2), ones, atol=1e-3, rtol=0)
    assert (comb - comb.transpose(-1, -2)).abs().max() > 1e-2  # the inputs give a non-symmetric comb


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64), (2, 2, 100)])
def test_pre_triton_matches_reference(n: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    *lead, dim = shape
    x = torch.randn(*lead, n, dim, generator=g).to(dtype)
    pre = torch.rand(*lead, n, generator=g)
    _close(mhc_pre_triton(x, pre), mhc_pre_ref(x, pre), dtype)


def test_pre_reference_is_weighted_stream_sum() -> None:
    x = torch.randn(2, 3, 4, 8)
    pre = torch.rand(2, 3, 4)
    want = sum(pre[..., i : i + 1] * x[..., i, :] for i in range(4))
    torch.testing.assert_close(mhc_pre_ref(x, pre), want)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64), (2, 2, 100), (1, 700)])
def test_post_triton_matches_reference(n: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(2)
    *lead, dim = shape
    x = torch.randn(*lead, n, dim, generator=g).to(dtype)
    f_out = torch.randn(*lead, dim, generator=g).to(dtype)
    _, post, comb = mhc_split_ref(*_weights(n, tuple(lead), seed=3), n)
    _close(mhc_post_triton(f_out, x, post, comb), mhc_post_ref(f_out, x, post, comb), dtype)


@pytest.mark.parametrize("impl", [mhc_post_ref, mhc_post_triton])
def test_post_routes_input_stream_j_to_output_k_through_comb_j_k(impl) -> None:
    # comb[j, (j + 1) % n] = 1 (a cyclic permutation, doubly stochastic and not symmetric):
    # output stream k must receive input stream k - 1, plus post_k * f_out.
    n, dim = 3, 5
    x = torch.arange(n * dim, dtype=torch.float32).view(1, n, dim)
    f_out = torch.full((1, dim), 100.0)
    post = torch.tensor([[0.0, 1.0, 2.0]])
    comb = torch.zeros(1, n, n)
    for j in range(n):
        comb[0, j, (j + 1) % n] = 1.0
    y = impl(f_out, x, post, comb)
    for k in range(n):
        torch.testing.assert_close(y[0, k], x[0, (k - 1) % n] + post[0, k] * f_out[0])


def test_dispatchers_run_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("Triton path taken for CPU tensors")

    monkeypatch.setattr(post_module, "mhc_post_triton", refuse)
    mixes, scale, base = _weights(2, (3,))
    pre, post, comb = mhc_split(mixes, scale, base, 2)
    x, f_out = torch.randn(3, 2, 8), torch.randn(3, 8)
    torch.testing.assert_close(mhc_pre(x, pre), mhc_pre_ref(x, pre))
    torch.testing.assert_close(mhc_post(f_out, x, post, comb), mhc_post_ref(f_out, x, post, comb))


def test_empty_batches_give_empty_outputs() -> None:
    mixes, scale, base = _weights(4, (0,))
    pre, post, comb = mhc_split_triton(mixes, scale, base, 4)
    assert pre.shape == (0, 4) and post.shape == (0, 4) and comb.shape == (0, 4, 4)
    x = torch.empty(0, 4, 16)
    assert mhc_pre_triton(x, pre).shape == (0, 16)
    assert mhc_post_triton(torch.empty(0, 16), x, post, comb).shape == (0, 4, 16)


@pytest.mark.parametrize("impl", [mhc_split_ref, mhc_split_triton])
def test_split_rejects_bad_arguments(impl) -> None:
    mixes, scale, base = _weights(4, (2,))
    with pytest.raises(TypeError, match="mixes"):
        impl(mixes.double(), scale, base, 4)
    with pytest.raises(ValueError, match="mixes"):
        impl(mixes[:, :-1], scale, base, 4)
    with pytest.raises(ValueError, match="scale"):
        impl(mixes, scale[:2], base, 4)
    with pytest.raises(ValueError, match="base"):
        impl(mixes, scale, base[:-1], 4)
    with pytest.raises(ValueError, match="hc_mult"):
        impl(mixes, scale, base, 0)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        impl(mixes, scale, base, 4, sinkhorn_iters=0)


@pytest.mark.parametrize("impl", [mhc_pre_ref, mhc_pre_triton])
def test_pre_rejects_bad_arguments(impl) -> None:
    x, pre = torch.randn(2, 4, 8), torch.rand(2, 4)
    with pytest.raises(TypeError, match="x"):
        impl(x.to(torch.int32), pre)
    with pytest.raises(TypeError, match="pre"):
        impl(x, pre.half())
    with pytest.raises(ValueError, match="pre"):
        impl(x, pre[:, :3])


@pytest.mark.parametrize("impl", [mhc_post_ref, mhc_post_triton])
def test_post_rejects_bad_arguments(impl) -> None:
    x, f_out, post, comb = torch.randn(2, 4, 8), torch.randn(2, 8), torch.rand(2, 4), torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="f_out"):
        impl(f_out[:, :7], x, post, comb)
    with pytest.raises(ValueError, match="post"):
        impl(f_out, x, post[:, :3], comb)
    with pytest.raises(ValueError, match="comb"):
        impl(f_out, x, post, comb[:, :3])
    with pytest.raises(TypeError, match="comb"):
        impl(f_out, x, post, comb.bfloat16())
    with pytest.raises(TypeError, match="x"):
        impl(f_out, "x", post, comb)
