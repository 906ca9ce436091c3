"""Inference-time weight fusion (`model_worker.execution.fused`) and the MoE block's two expert paths.

Every result is checked against an independent float64 computation from the original (cloned, or
dequantized) weights: fusion must change how the weights are stored and multiplied, never the function,
the parameter names or the saved checkpoint.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engram_kernels.quant import quantize_fp8_weight_ref
from model_worker import load_model, save_model
from model_worker.execution import experts as experts_module
from model_worker.execution.fused import ConcatenatedWeight, StackedWeight, grouped_linear, grouped_mm_available
from model_worker.layers.linear import Linear
from model_worker.layers.moe import MLP, MoE
from tests.model_worker.engine.engine_fixtures import tiny_config, tiny_model

HAS_GROUPED_MM = grouped_mm_available(torch.zeros(1))
needs_grouped_mm = pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without F.grouped_mm")


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Overwrite every float parameter and buffer in place with N(0, std^2) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * std)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _swiglu64(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(x @ Wg^T) * (x @ Wu^T)) in float64."""
    x, w_gate, w_up, w_down = (t.double() for t in (x, w_gate, w_up, w_down))
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def _mlp64(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """The MLP's function in float64 from its (dequantized, if FP8) weights."""
    return _swiglu64(x, mlp.gate_proj.dense_weight(), mlp.up_proj.dense_weight(), mlp.down_proj.dense_weight())


def _random_mlp(hidden: int = 24, inter: int = 40, seed: int = 0) -> MLP:
    mlp = MLP(hidden, inter)
    _randomize(mlp, seed)
    return mlp


def _fp8(lin: Linear) -> None:
    """Switch a float Linear to FP8 (block-quantized copy of its weight)."""
    lin.to_fp8(*quantize_fp8_weight_ref(lin.weight.detach()))


# ---- ConcatenatedWeight through MLP ----------------------------------------------------------------


def test_mlp_output_equals_float64_swiglu_of_the_original_weights():
    """The fused gate/up GEMM computes exactly the SwiGLU of the weights the MLP was given."""
    mlp = _random_mlp()
    wg, wu, wd = (lin.weight.detach().clone() for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mlp(x).double(), _swiglu64(x, wg, wu, wd), rtol=1e-5, atol=1e-5)
    # and again (fusion already built, now reused)
    torch.testing.assert_close(mlp(x[:, :1]).double(), _swiglu64(x[:, :1], wg, wu, wd), rtol=1e-5, atol=1e-5)


def test_first_forward_makes_gate_and_up_views_of_one_tensor_without_changing_state_dict():
    """Fusion re-points gate/up to views of one storage; names, shapes and values in state_dict() stay."""
    mlp = _random_mlp()
    before = {name: t.clone() for name, t in mlp.state_dict().items()}
    assert _storage(mlp.gate_proj.weight) != _storage(mlp.up_proj.weight)
    with torch.inference_mode():
        mlp(torch.randn(2, 24))
    assert _storage(mlp.gate_proj.weight) == _storage(mlp.up_proj.weight)
    assert _storage(mlp.down_proj.weight) != _storage(mlp.gate_proj.weight)
    assert isinstance(mlp.gate_proj.weight, torch.nn.Parameter)
    after = mlp.state_dict()
    assert list(after) == list(before)
    for name, want in before.items():
        assert after[name].shape == want.shape and after[name].dtype == want.dtype, name
        assert torch.equal(after[name], want), name  # (save_model stores views as contiguous tensors)


def test_fused_parameters_are_not_inference_tensors_and_take_in_place_updates():
    """Built under inference_mode, the fused tensor must still be ordinary: an in-place weight update
    (what loading / weight sync does) must work afterwards and be seen by the next forward."""
    mlp = _random_mlp()
    x = torch.randn(4, 24)
    with torch.inference_mode():
        mlp(x)
    assert not mlp.gate_proj.weight.is_inference() and not mlp.up_proj.weight.is_inference()
    new_gate = torch.randn(40, 24, generator=torch.Generator().manual_seed(5)) * 0.2
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(new_gate)
    want = _swiglu64(x, new_gate, mlp.up_proj.weight, mlp.down_proj.weight)
    torch.testing.assert_close(mlp(x).double(), want, rtol=1e-5, atol=1e-5)


def test_fusion_is_rebuilt_after_to_float_gives_a_member_new_storage():
    """`to_float` replaces gate's parameter: the next call must use the new gate, not the stale fused copy."""
    mlp = _random_mlp()
    x = torch.randn(6, 24)
    mlp(x)  # fuse
    old_up = mlp.up_proj.weight.detach().clone()
    new_gate = torch.randn(40, 24, generator=torch.Generator().manual_seed(7)) * 0.2
    mlp.gate_proj.to_float(new_gate.clone())
    want = _swiglu64(x, new_gate, old_up, mlp.down_proj.weight)
    torch.testing.assert_close(mlp(x).double(), want, rtol=1e-5, atol=1e-5)
    assert _storage(mlp.gate_proj.weight) == _storage(mlp.up_proj.weight)  # fused again
    assert torch.equal(mlp.gate_proj.weight, new_gate) and torch.equal(mlp.up_proj.weight, old_up)


def test_fusion_is_rebuilt_after_a_cast_of_all_parameters_to_bf16():
    """`cast`-style `param.data = param.data.to(bf16)`: the next call runs the bf16 weights, fused again."""
    mlp = _random_mlp()
    x = torch.randn(6, 24)
    mlp(x)  # fuse in fp32
    for param in mlp.parameters():
        param.data = param.data.to(torch.bfloat16)
    got = mlp(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert mlp.gate_proj.weight.dtype == torch.bfloat16
    assert _storage(mlp.gate_proj.weight) == _storage(mlp.up_proj.weight)
    want = _mlp64(mlp, x.to(torch.bfloat16))  # the bf16 weights, in float64
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_fusion_is_rebuilt_after_module_double():
    """`module.double()` (nn.Module._apply) gives every member new storage; float64 runs then match tightly."""
    mlp = _random_mlp()
    x = torch.randn(6, 24)
    mlp(x)
    mlp.double()
    want = _mlp64(mlp, x)
    torch.testing.assert_close(mlp(x.double()), want, rtol=1e-12, atol=1e-12)


def test_a_stale_fused_copy_is_never_used_after_only_one_member_changes():
    """Changing up alone (new storage) after fusion: outputs follow the new up and the unchanged gate."""
    mlp = _random_mlp()
    x = torch.randn(3, 24)
    mlp(x)
    gate, down = mlp.gate_proj.weight.detach().clone(), mlp.down_proj.weight.detach().clone()
    mlp.up_proj.weight.data = mlp.up_proj.weight.data * -2.0
    torch.testing.assert_close(mlp(x).double(), _swiglu64(x, gate, mlp.up_proj.weight, down), rtol=1e-5, atol=1e-5)


# ---- ConcatenatedWeight: members that cannot be fused ----------------------------------------------


def test_biased_member_is_not_fused_and_members_run_one_by_one():
    """A bias cannot ride the concatenated GEMM: get() is None and each output is that Linear's own."""
    a, b = Linear(16, 8, bias=True), Linear(16, 12)
    _randomize(a, 1)
    _randomize(b, 2)
    fused = ConcatenatedWeight(a, b)
    x = torch.randn(5, 16)
    out_a, out_b = fused(x)
    assert fused.get() is None
    assert _storage(a.weight) != _storage(b.weight)
    assert torch.equal(out_a, a(x)) and torch.equal(out_b, b(x))
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_a.double(), x.double() @ a.weight.double().T + a.bias.double(), **tol)
    torch.testing.assert_close(out_b.double(), x.double() @ b.weight.double().T, **tol)


def test_fp8_member_is_not_fused_and_members_run_one_by_one():
    """An FP8 member (even one switched after a first fused call) disables fusion; outputs stay correct."""
    a, b = Linear(128, 64), Linear(128, 32)
    _randomize(a, 3, std=0.05)
    _randomize(b, 4, std=0.05)
    fused = ConcatenatedWeight(a, b)
    x = torch.randn(4, 128)
    assert fused.get() is not None  # float members fuse
    _fp8(a)
    out_a, out_b = fused(x)
    assert fused.get() is None
    assert torch.equal(out_a, a(x)) and torch.equal(out_b, b(x))
    # sanity: the FP8 output is close to the dequantized weight's product (i.e. really a's function)
    rel = (out_a.double() - x.double() @ a.dense_weight().double().T).norm() / out_a.norm()
    assert rel < 0.05
    torch.testing.assert_close(out_b.double(), x.double() @ b.weight.double().T, rtol=1e-5, atol=1e-5)


def test_mlp_with_fp8_gate_equals_dequantized_reference():
    mlp = _random_mlp(hidden=128, inter=64, seed=8)
    x = torch.randn(5, 128)
    mlp(x)  # fused in float first
    _fp8(mlp.gate_proj)
    assert mlp._gate_up.get() is None
    got = mlp(x).double()
    want = _mlp64(mlp, x)
    assert ((got - want).norm() / want.norm()) < 0.05


@pytest.mark.parametrize(
    "make",
    [
        lambda: (Linear(16, 8), Linear(12, 8)),  # different in_features
        lambda: (Linear(16, 8), Linear(16, 8, dtype=torch.bfloat16)),  # different dtypes
        lambda: (Linear(16, 8, device="meta"), Linear(16, 8, device="meta")),  # not materialised
    ],
    ids=["in_features", "dtype", "meta"],
)
def test_unfusable_member_combinations_give_none(make):
    assert ConcatenatedWeight(*make()).get() is None


# ---- StackedWeight ---------------------------------------------------------------------------------


def test_stacked_weight_is_the_experts_weights_stacked_and_members_become_views():
    experts = [_random_mlp(hidden=16, inter=8, seed=s) for s in range(5)]
    originals = [(e.gate_proj.weight.detach().clone(), e.up_proj.weight.detach().clone()) for e in experts]
    stacked = StackedWeight([[e.gate_proj, e.up_proj] for e in experts])
    tensor = stacked.get()
    assert tensor.shape == (5, 16, 16)
    for e, (g, u) in enumerate(originals):
        assert torch.equal(tensor[e], torch.cat([g, u]))
        assert torch.equal(experts[e].gate_proj.weight, g) and torch.equal(experts[e].up_proj.weight, u)
        assert _storage(experts[e].gate_proj.weight) == _storage(tensor)
    assert stacked.get() is tensor  # unchanged members: not rebuilt


def test_stacked_weight_with_groups_of_different_widths_gives_none():
    stacked = StackedWeight([[Linear(16, 8), Linear(16, 8)], [Linear(16, 8)]])
    assert stacked.get() is None


# ---- grouped_linear --------------------------------------------------------------------------------


def _grouped_reference(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-group loop x_g @ W_g^T in float64."""
    out, start = [], 0
    for g, n in enumerate(counts):
        out.append(x[start : start + n].double() @ weight[g].double().T)
        start += n
    return torch.cat(out)


@needs_grouped_mm
@pytest.mark.parametrize(
    "counts",
    [[0, 3, 0, 5, 2, 0], [7, 0, 0, 1], [0, 0, 4], [1, 1, 1, 1], [9]],
    ids=["empty_start_middle_end", "empty_middle", "empty_start", "one_each", "single"],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_grouped_linear_equals_a_per_group_loop(counts, dtype, tol):
    g = torch.Generator().manual_seed(len(counts))
    x = torch.randn(sum(counts), 32, generator=g).to(dtype)
    weight = (torch.randn(len(counts), 24, 32, generator=g) * 0.2).to(dtype)
    got = grouped_linear(x, weight, torch.tensor(counts))
    assert got.shape == (sum(counts), 24) and got.dtype == dtype
    torch.testing.assert_close(got.double(), _grouped_reference(x, weight, counts), rtol=tol, atol=tol)


def test_grouped_mm_available_only_for_fp32_and_bf16():
    assert not grouped_mm_available(torch.zeros(1, dtype=torch.float64))
    assert not grouped_mm_available(torch.zeros(1, dtype=torch.float16))
    assert grouped_mm_available(torch.zeros(1)) == HAS_GROUPED_MM


# ---- MoE block -------------------------------------------------------------------------------------


def _moe(seed: int = 0) -> MoE:
    config = tiny_config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=4,
                         n_shared_experts=1, n_group=2, topk_group=2)
    moe = MoE(config)
    _randomize(moe, seed)
    return moe


def _moe_reference(moe: MoE, flat: torch.Tensor, mlp=_mlp64) -> torch.Tensor:
    """Per token: sum_j weight_j * expert_j(x) + shared(x), summed in float64, from the router's choice.
    mlp(module, x [n, D]) -> [n, D] is how one expert is evaluated (default: float64 SwiGLU of its weights)."""
    weights, ids = moe.gate(flat)
    out = mlp(moe.shared_experts, flat).double()
    for n in range(flat.shape[0]):
        for w, e in zip(weights[n].tolist(), ids[n].tolist()):
            out[n] += w * mlp(moe.experts[e], flat[n : n + 1])[0].double()
    return out


class _CountGrouped:
    """Wraps moe.grouped_linear to record whether the grouped path ran."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return grouped_linear(*args)


@pytest.mark.parametrize("tokens,grouped", [(1, False), (2, True), (32, True)])
def test_moe_equals_per_token_float64_reference(monkeypatch, tokens, grouped):
    """N*k < n_experts -> loop over used experts; N*k >= n_experts -> grouped GEMM. Both = the definition."""
    moe = _moe()
    spy = _CountGrouped()
    monkeypatch.setattr(experts_module, "grouped_linear", spy)
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(tokens))
    want = _moe_reference(moe, x[0])
    got = moe(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-4)
    assert (spy.calls > 0) == (grouped and HAS_GROUPED_MM)
    # the experts were stacked (float weights): gate/up of all experts share one storage
    assert len({_storage(e.gate_proj.weight) for e in moe.experts} | {_storage(moe.experts[0].up_proj.weight)}) == 1


@pytest.mark.parametrize("tokens", [2, 16])
def test_moe_with_unused_experts_at_start_middle_and_end(tokens):
    """Routing biased onto experts {1, 3, 5, 6}: experts 0, 2, 4 and 7 get no tokens (empty groups at both
    ends and inside the grouped GEMM); the output is still the definition."""
    moe = _moe(seed=4)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.fill_(-10.0)[[1, 3, 5, 6]] = 10.0
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(30 + tokens))
    _, ids = moe.gate(x[0])
    assert set(ids.flatten().tolist()) == {1, 3, 5, 6}
    want = _moe_reference(moe, x[0])
    torch.testing.assert_close(moe(x)[0].double(), want, rtol=1e-4, atol=1e-4)


def test_moe_is_correct_when_expert_mlps_are_also_called_directly():
    """An expert MLP called directly runs its gate and up one by one (its own fusion is disabled: the MoE's
    stack holds those weights); alternating the two must never move the weights out of the stack or let
    either use a stale copy."""
    moe = _moe(seed=3)
    x = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(4))
    want_moe = _moe_reference(moe, x[0])
    want_expert = _mlp64(moe.experts[2], x[0])
    for _ in range(2):
        torch.testing.assert_close(moe(x)[0].double(), want_moe, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(moe.experts[2](x[0]).double(), want_expert, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moe(x[:, :1])[0].double(), want_moe[:1], rtol=1e-4, atol=1e-4)
    assert _storage(moe.experts[2].up_proj.weight) == _storage(moe._stacked_gate_up.get())


@pytest.mark.parametrize("tokens", [1, 32])
def test_moe_with_fp8_experts_equals_dequantized_reference(monkeypatch, tokens):
    """FP8 experts cannot be stacked: the loop path runs them. Tight against the same routing done token by
    token with each expert's own FP8 function; loose against float64 of the dequantized weights (the
    gap is FP8 activation quantization, ~3-5%)."""
    moe = _moe(seed=1)
    for expert in moe.experts:
        for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
            _fp8(lin)
    spy = _CountGrouped()
    monkeypatch.setattr(experts_module, "grouped_linear", spy)
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(10 + tokens))
    want = _moe_reference(moe, x[0])
    want_fp8 = _moe_reference(moe, x[0], mlp=lambda module, rows: module(rows))
    got = moe(x)[0].double()
    assert spy.calls == 0 and moe._stacked_gate_up.get() is None
    torch.testing.assert_close(got, want_fp8, rtol=1e-5, atol=1e-5)
    assert ((got - want).norm() / want.norm()) < 0.08


@needs_grouped_mm
def test_moe_in_bf16_grouped_path_matches_reference_loosely():
    """After a bf16 cast the stacking is rebuilt in bf16 and the grouped path still computes the MoE."""
    moe = _moe(seed=2)
    x = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(6))
    moe(x)  # stacked in fp32
    for name, param in moe.named_parameters():
        if not name.startswith("gate."):
            param.data = param.data.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    want = _moe_reference(moe, xb[0])
    got = moe(xb)
    assert got.dtype == torch.bfloat16 and moe._stacked_gate_up.get().dtype == torch.bfloat16
    assert ((got[0].double() - want).norm() / want.norm()) < 0.02


# ---- whole model: save/load after fusion -----------------------------------------------------------


def test_save_and_load_after_fusion_round_trips_exactly(tmp_path):
    """Fused views must save as ordinary tensors: reloaded model has the same state and the same logits."""
    model = tiny_model(seed=5).eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    ids = torch.randint(5, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(ids)
    moe = model.model.layers[1].mlp
    assert isinstance(moe, MoE)
    assert _storage(moe.experts[0].gate_proj.weight) == _storage(moe.experts[1].up_proj.weight)  # stacked
    dense = model.model.layers[0].mlp
    assert _storage(dense.gate_proj.weight) == _storage(dense.up_proj.weight)  # concatenated
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], t) for name, t in before.items())

    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(before)
    for name, t in before.items():
        assert torch.equal(loaded_state[name], t), name
    with torch.inference_mode():
        assert torch.equal(loaded(ids), logits)
        assert torch.equal(model(ids), logits)  # the original still runs the same after saving


@pytest.mark.parametrize("method", ["torch", "c-rows", "c-panel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(24,), (1, 24), (1, 1, 24), (3, 24), (2, 5, 24)])
def test_every_linear_method_matches_float64_for_one_row_and_many(method, dtype, shape):
    """Each float linear method's run and accumulate (`execution.linear_methods`; prepared as at load, and
    falling back to torch's kernel where its own does not take the dtype) against float64."""
    from model_worker.execution.linear_methods import C_ROWS, PANEL, REFERENCE

    chosen = {m.name: m for m in (REFERENCE, C_ROWS, PANEL)}[method]
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    weight, bias = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    chosen.prepare(weight)
    linear, linear_accumulate = chosen.run, chosen.accumulate
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    want = x.double() @ weight.double().t()
    for got, ref in ((linear(x, weight), want), (linear(x, weight, bias), want + bias.double())):
        assert got.dtype == dtype and got.shape == (*shape[:-1], 40)
        torch.testing.assert_close(got.double(), ref, **tol)
    rows = x.reshape(-1, 24)
    out = torch.randn(rows.shape[0], 40, generator=g).to(dtype)
    got = linear_accumulate(out, rows, weight, 0.375)
    chosen.release(weight)
    assert got.dtype == dtype and got.shape == out.shape
    torch.testing.assert_close(got.double(), out.double() + 0.375 * (rows.double() @ weight.double().t()), **tol)


def test_per_group_views_follow_a_rebuilt_fusion():
    """per_group() hands out views of the fused tensor get() last returned, and new ones after a rebuild."""
    moe = MoE(tiny_config())
    _randomize(moe, seed=11)
    stacked = moe._stacked_down
    fused = stacked.get()
    views, transposed = stacked.per_group()
    assert len(views) == len(moe.experts) and stacked.per_group()[0] is views  # made once
    for expert, view, view_t in zip(moe.experts, views, transposed):
        assert torch.equal(view, expert.down_proj.weight) and torch.equal(view_t, expert.down_proj.weight.t())
    moe.experts[1].down_proj.weight.data = moe.experts[1].down_proj.weight.data * 3.0
    assert stacked.get() is not fused
    assert torch.equal(stacked.per_group()[0][1], moe.experts[1].down_proj.weight)
