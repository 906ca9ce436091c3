"""mHC layers against transformers' DeepSeek-V4 modules (same weights) and the DecoderLayer's
residual formula, plus the properties the model relies on (names, dtypes, init, direction)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4HyperConnection,
    DeepseekV4HyperHead,
    DeepseekV4MLP,
)

from model_worker.layers.mhc import HyperConnection, HyperHead, expand_to_streams

HIDDEN = 16
# (hc_mult, sinkhorn_iters, hc_eps, norm_eps): the second case makes every knob visible in the output.
SETTINGS = [(4, 20, 1e-6, 1e-6), (2, 7, 1e-3, 1e-1)]


def _config(n: int, iters: int, hc_eps: float, norm_eps: float) -> DeepseekV4Config:
    return DeepseekV4Config(
        hidden_size=HIDDEN,
        intermediate_size=32,
        moe_intermediate_size=32,
        num_hidden_layers=1,
        hc_mult=n,
        hc_sinkhorn_iters=iters,
        hc_eps=hc_eps,
        rms_norm_eps=norm_eps,
    )


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights (as after training): fn large enough to move the weights per token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 2 else 0.5) + (p.dim() == 1) * 0.5)


def _pair(n: int, iters: int, hc_eps: float, norm_eps: float, seed: int = 0):
    ours = HyperConnection(HIDDEN, n, iters, hc_eps, norm_eps)
    _randomize(ours, seed)
    theirs = DeepseekV4HyperConnection(_config(n, iters, hc_eps, norm_eps)).float()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _streams(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, n, HIDDEN, generator=g).to(dtype)  # [B, T, n, D]


def _their_residual(post: torch.Tensor, comb: torch.Tensor, f_out: torch.Tensor, x: torch.Tensor):
    """DeepseekV4DecoderLayer.forward's update: post ⊗ f_out + comb^T @ x."""
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * f_out.unsqueeze(-2) + torch.matmul(
        comb.to(dtype).transpose(-1, -2), x
    )


@pytest.mark.parametrize("setting", SETTINGS)
def test_hyper_connection_matches_transformers(setting) -> None:
    ours, theirs = _pair(*setting)
    x = _streams(setting[0])
    collapsed, post, comb = ours(x)
    their_post, their_comb, their_collapsed = theirs(x)
    for a, b in ((collapsed, their_collapsed), (post, their_post), (comb, their_comb)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_comb_is_doubly_stochastic_and_not_symmetric() -> None:
    ours, _ = _pair(*SETTINGS[0])
    _, _, comb = ours(_streams(4))
    ones = torch.ones(comb.shape[:-1])
    torch.testing.assert_close(comb.sum(dim=-1), ones, rtol=0, atol=1e-3)
    torch.testing.assert_close(comb.sum(dim=-2), ones, rtol=0, atol=1e-3)
    assert (comb - comb.transpose(-1, -2)).abs().max() > 1e-2


@pytest.mark.parametrize("setting", SETTINGS)
def test_hyper_head_matches_transformers(setting) -> None:
    n, _, hc_eps, norm_eps = setting
    ours = HyperHead(HIDDEN, n, hc_eps, norm_eps)
    _randomize(ours, seed=5)
    theirs = DeepseekV4HyperHead(_config(*setting)).float()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = _streams(n)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
    xb = x.bfloat16()
    torch.testing.assert_close(ours(xb).float(), theirs(xb).float(), rtol=2.0**-7, atol=1e-6)


def _two_sublayers_ours(hcs, mlps, x: torch.Tensor) -> torch.Tensor:
    for hc, mlp in zip(hcs, mlps):
        collapsed, post, comb = hc(x)
        x = hc.expand(mlp(collapsed), x, post, comb)
    return x


def _two_sublayers_theirs(hcs, mlps, x: torch.Tensor) -> torch.Tensor:
    for hc, mlp in zip(hcs, mlps):
        post, comb, collapsed = hc(x)
        x = _their_residual(post, comb, mlp(collapsed), x)
    return x


@pytest.mark.parametrize("setting", SETTINGS)
def test_wrapped_sublayers_match_decoder_layer_residual(setting) -> None:
    torch.manual_seed(0)
    config = _config(*setting)
    mlps = [DeepseekV4MLP(config).float() for _ in range(2)]
    pairs = [_pair(*setting, seed=s) for s in (10, 11)]
    ours, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
    x = _streams(setting[0])
    with torch.no_grad():
        torch.testing.assert_close(
            _two_sublayers_ours(ours, mlps, x), _two_sublayers_theirs(theirs, mlps, x), rtol=0, atol=1e-5
        )
        # bf16 residual: transformers rounds post/comb to bf16 before mixing, we mix in fp32 and round once.
        mlps = [m.bfloat16() for m in mlps]
        xb = x.bfloat16()
        torch.testing.assert_close(
            _two_sublayers_ours(ours, mlps, xb).float(),
            _two_sublayers_theirs(theirs, mlps, xb).float(),
            rtol=3e-2,
            atol=3e-2,
        )


def test_untransposed_comb_would_be_caught() -> None:
    ours, theirs = _pair(*SETTINGS[0])
    x = _streams(4)
    f_out = torch.randn(2, 5, HIDDEN)
    collapsed, post, comb = ours(x)
    y = ours.expand(f_out, x, post, comb)
    their_post, their_comb, _ = theirs(x)
    torch.testing.assert_close(y, _their_residual(their_post, their_comb, f_out, x), rtol=0, atol=1e-5)
    wrong = post.unsqueeze(-1) * f_out.unsqueeze(-2) + torch.matmul(comb, x)  # comb not transposed
    assert (y - wrong).abs().max() > 1e-2


def test_fresh_modules_start_near_identity_mixing() -> None:
    torch.manual_seed(0)
    hc, head = HyperConnection(HIDDEN, 4), HyperHead(HIDDEN, 4)
    h = torch.randn(2, 5, HIDDEN)
    x = expand_to_streams(h, 4)
    collapsed, post, comb = hc(x)
    # fn ~ N(0, 0.02^2) gives mixes of about N(0, 0.16^2) here: every weight stays near its centre.
    torch.testing.assert_close(post, torch.ones_like(post), rtol=0, atol=0.3)
    torch.testing.assert_close(comb, torch.full_like(comb, 0.25), rtol=0, atol=0.1)
    torch.testing.assert_close(collapsed, 2 * h, rtol=0, atol=0.3 * h.abs().max().item())  # 4 * sigmoid(~0)
    torch.testing.assert_close(head(x), 2 * h, rtol=0, atol=0.3 * h.abs().max().item())
    y = hc.expand(torch.zeros_like(h), x, post, comb)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-4)  # equal streams survive a doubly-stochastic mix


def test_reset_parameters_is_reproducible_with_a_generator() -> None:
    a, b = HyperConnection(HIDDEN, 4), HyperConnection(HIDDEN, 4)
    a.reset_parameters(generator=torch.Generator().manual_seed(3))
    b.reset_parameters(generator=torch.Generator().manual_seed(3))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert 0.01 < a.fn.std().item() < 0.03
    assert torch.equal(a.base, torch.zeros_like(a.base)) and torch.equal(a.scale, torch.ones(3))


def test_parameters_have_checkpoint_names_shapes_and_fp32() -> None:
    n, dim = 4, HIDDEN
    hc = HyperConnection(dim, n)
    assert {k: (tuple(v.shape), v.dtype) for k, v in hc.state_dict().items()} == {
        "fn": (((2 + n) * n, n * dim), torch.float32),
        "base": (((2 + n) * n,), torch.float32),
        "scale": ((3,), torch.float32),
    }
    head = HyperHead(dim, n)
    assert {k: (tuple(v.shape), v.dtype) for k, v in head.state_dict().items()} == {
        "hc_fn": ((n, n * dim), torch.float32),
        "hc_base": ((n,), torch.float32),
        "hc_scale": ((1,), torch.float32),
    }


def test_bf16_streams_keep_dtype_and_weights_stay_fp32() -> None:
    hc = HyperConnection(HIDDEN, 4)
    x = _streams(4, torch.bfloat16)
    collapsed, post, comb = hc(x)
    assert collapsed.dtype == torch.bfloat16 and post.dtype == comb.dtype == torch.float32
    assert hc.expand(collapsed, x, post, comb).dtype == torch.bfloat16


def test_expand_to_streams_copies_embedding_to_every_stream() -> None:
    h = torch.randn(2, 3, HIDDEN)
    x = expand_to_streams(h, 4)
    assert x.shape == (2, 3, 4, HIDDEN) and x.is_contiguous()
    for k in range(4):
        assert torch.equal(x[:, :, k], h)
    x[:, :, 0] += 1  # a real copy: streams and h are independent
    assert torch.equal(x[:, :, 1], h)


def test_layers_reject_bad_inputs() -> None:
    hc, head = HyperConnection(HIDDEN, 4), HyperHead(HIDDEN, 4)
    with pytest.raises(ValueError, match="x"):
        hc(torch.randn(2, 3, 2, HIDDEN))
    with pytest.raises(ValueError, match="x"):
        head(torch.randn(2, 3, 4, HIDDEN + 1))
    with pytest.raises(TypeError, match="x"):
        hc(torch.zeros(2, 3, 4, HIDDEN, dtype=torch.int64))
    with pytest.raises(ValueError, match="hc_mult"):
        expand_to_streams(torch.randn(2, 3, HIDDEN), 0)
