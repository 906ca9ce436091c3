"""DeepSeek-V3 expert selection in C (`engram_kernels.cpu_decode.sigmoid_route`) against its torch definition, and
inside the model's Router."""

from __future__ import annotations

import pytest
import torch

from engram_kernels import moe_routing as routing_module
from engram_kernels.cpu_decode import decode_gemm_available, native, sigmoid_route, sigmoid_route_ref
from model_worker.layers import moe as moe_module
from tests.model_worker.engine.engine_fixtures import tiny_config
from tests.model_worker.kernel_spies import spy_on

pytestmark = pytest.mark.skipif(not decode_gemm_available(), reason=f"no C kernel: {native.unavailable_reason()}")


@pytest.mark.parametrize("tokens,experts,groups,kept,top_k", [(1, 16, 4, 2, 4), (16, 16, 4, 2, 4), (9, 256, 8, 4, 8),
                                                             (5, 64, 1, 1, 6), (3, 8, 8, 3, 3), (4, 12, 3, 3, 12)])
@pytest.mark.parametrize("norm,with_bias", [(True, True), (False, False)])
def test_the_selection_equals_torch(tokens, experts, groups, kept, top_k, norm, with_bias):
    g = torch.Generator().manual_seed(tokens * experts + top_k)
    logits = torch.randn(tokens, experts, generator=g) * 3
    bias = torch.randn(experts, generator=g) * 0.2 if with_bias else None
    weights, ids = sigmoid_route(logits, bias, groups, kept, top_k, norm, 2.5)
    want_weights, want_ids = sigmoid_route_ref(logits, bias, groups, kept, top_k, norm, 2.5)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-6)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32


def test_rows_with_a_row_stride_and_no_tokens():
    logits = torch.randn(6, 40)[:, 4:20]  # row stride 40
    weights, ids = sigmoid_route(logits, None, 4, 2, 3, True, 1.0)
    assert torch.equal(ids, sigmoid_route_ref(logits, None, 4, 2, 3, True, 1.0)[1])
    empty_weights, empty_ids = sigmoid_route(torch.empty(0, 16), None, 4, 2, 3, True, 1.0)
    assert empty_ids.shape == (0, 3) and empty_weights.shape == (0, 3)


def test_ties_go_to_the_lower_group_and_expert():
    weights, ids = sigmoid_route(torch.zeros(1, 8), None, 4, 2, 3, True, 1.0)
    assert ids.tolist() == [[0, 1, 2]]  # groups 0 and 1 kept; experts 0, 1, 2 of them
    torch.testing.assert_close(weights, torch.full((1, 3), 1 / 3))


def test_configurations_it_cannot_select_are_refused():
    logits = torch.randn(2, 16)
    for call in (lambda: sigmoid_route(logits.double(), None, 4, 2, 4, True, 1.0),
                 lambda: sigmoid_route(logits, torch.zeros(8), 4, 2, 4, True, 1.0),
                 lambda: sigmoid_route(logits, None, 5, 2, 4, True, 1.0),  # 5 groups do not divide 16
                 lambda: sigmoid_route(logits, None, 4, 5, 4, True, 1.0),  # more kept groups than groups
                 lambda: sigmoid_route(logits, None, 4, 1, 5, True, 1.0),  # top 5 of one kept group of 4
                 lambda: sigmoid_route(torch.randn(1, 2048), None, 1, 1, 4, True, 1.0)):  # above 1024 experts
        with pytest.raises(ValueError):
            call()


def test_the_router_selects_in_c_for_decode_batches_and_in_torch_for_prefill(monkeypatch):
    spy = spy_on(monkeypatch, routing_module, "sigmoid_route")
    config = tiny_config(hidden_size=64, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    router = moe_module.Router(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.normal_(generator=g)
        router.e_score_correction_bias.normal_(generator=g)
    most = routing_module.C_MAX_TOKENS
    for tokens, in_c in ((1, True), (most, True), (most + 1, False)):
        x = torch.randn(tokens, 64, generator=g)
        calls = spy.calls
        with torch.inference_mode():
            weights, ids = router(x)
        assert (spy.calls > calls) == in_c
        logits = x @ router.weight.t()
        want_weights, want_ids = sigmoid_route_ref(logits, router.e_score_correction_bias, 4, 2, 4,
                                                   router.routing.norm_topk_prob,
                                                   router.routing.routed_scaling_factor)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
