"""The C panel GEMM (`engram_kernels.cpu_decode.panel_gemm`) against its torch definition in float64: the packed
layout, every row-tile and panel tail, addends, the grouped form, thread counts, each ISA build, and the
operands it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engram_kernels.cpu_decode import (
    decode_gemm_available,
    decode_gemm_ref,
    grouped_decode_gemm_ref,
    grouped_panel_gemm,
    native,
    panel_gemm,
    panel_pack,
    panel_unpack,
    panel_width,
)

pytestmark = pytest.mark.skipif(not decode_gemm_available(), reason=f"no C kernel: {native.unavailable_reason()}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(got: torch.Tensor, want: torch.Tensor, k: int) -> None:
    tol = 2e-6 * max(k, 16) ** 0.5 * 4
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_the_packed_layout_holds_panel_columns_together_and_pads_with_zeros():
    width = panel_width()
    assert width in (16, 32)
    weight = torch.randn(width + 3, 5, generator=_gen(0))
    packed = panel_pack(weight)
    assert packed.shape == (2, 5, width) and packed.is_contiguous()
    assert torch.equal(packed[1, 2, 1], weight[width + 1, 2])  # panel 1, column k=2, output width + 1
    assert torch.equal(packed[1, :, 3:], torch.zeros(5, width - 3))  # the padding of the last panel
    assert torch.equal(panel_unpack(packed, width + 3), weight)
    stack = torch.randn(3, 7, 4, generator=_gen(1)).transpose(1, 2)  # [3, 4, 7] with unit stride along out
    assert torch.equal(panel_unpack(panel_pack(stack), 4), stack)


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 16, 25, 97, 200])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (31, 77), (32, 64), (33, 7), (100, 130)])
def test_panel_gemm_equals_float64_for_every_row_tile_and_panel_tail(rows, out_features, in_features):
    g = _gen(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    got = panel_gemm(x, panel_pack(weight), out_features)
    _close(got, decode_gemm_ref(x.double(), weight.double()), in_features)


def test_addends_alpha_out_and_strided_x():
    g = _gen(3)
    weight, x = torch.randn(45, 70, generator=g), torch.randn(9, 140, generator=g)[:, ::2].contiguous()
    packed = panel_pack(weight)
    bias, base = torch.randn(45, generator=g), torch.randn(9, 45, generator=g)
    exact = x.double() @ weight.double().t()
    _close(panel_gemm(x, packed, 45, bias), exact + bias.double(), 70)
    _close(panel_gemm(x, packed, 45, base, 0.25), base.double() + 0.25 * exact, 70)
    out = base.clone()
    assert panel_gemm(x, packed, 45, out, -1.5, out=out) is out  # accumulate in place
    _close(out, base.double() - 1.5 * exact, 70)
    wide = torch.randn(9, 200, generator=g)
    rows = wide[:, 10:80]  # row stride 200: the kernel reads x in place
    _close(panel_gemm(rows, packed, 45), rows.double() @ weight.double().t(), 70)


def test_thread_count_does_not_change_a_single_bit():
    g = _gen(4)
    weight, x = torch.randn(300, 96, generator=g), torch.randn(14, 96, generator=g)
    packed = panel_pack(weight)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(panel_gemm(x, packed, 300))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("counts", [[1, 0, 3, 2], [0, 0, 0, 1], [14, 0, 1, 30], [0, 0, 0, 0]])
def test_grouped_panel_gemm_equals_float64_group_by_group(counts):
    g = _gen(sum(counts) + 5)
    stack = torch.randn(len(counts), 50, 40, generator=g)
    x = torch.randn(sum(counts), 40, generator=g)
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    got = grouped_panel_gemm(x, offsets, panel_pack(stack), 50)
    assert got.shape == (sum(counts), 50)
    _close(got, grouped_decode_gemm_ref(x.double(), offsets, stack.double()), 40)


def test_operands_the_kernel_does_not_take_are_refused_with_their_shapes():
    g = _gen(6)
    weight = torch.randn(40, 24, generator=g)
    packed, x = panel_pack(weight), torch.randn(3, 24, generator=g)
    refused = [
        lambda: panel_gemm(x.double(), packed, 40),  # x not fp32
        lambda: panel_gemm(torch.randn(3, 25), packed, 40),  # K differs
        lambda: panel_gemm(x, packed, 80),  # more columns than the pack holds
        lambda: panel_gemm(x, packed, 3),  # fewer than its panels hold
        lambda: panel_gemm(x, packed.transpose(0, 1), 40),  # not a contiguous pack
        lambda: panel_gemm(x, packed[..., :8].contiguous(), 40),  # another panel width
        lambda: panel_gemm(x, weight, 40),  # not packed at all
        lambda: panel_gemm(x.t().contiguous().t(), packed, 40),  # x without unit stride along K
        lambda: panel_gemm(x, packed, 40, torch.randn(5, 40)),  # addend of the wrong shape
        lambda: grouped_panel_gemm(x, [0, 2], packed, 40),  # a 2-D pack for the grouped form
        lambda: grouped_panel_gemm(x, [0, 2, 1], panel_pack(torch.randn(2, 40, 24)), 40),  # bad offsets
    ]
    for call in refused:
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="panel_pack"):
        panel_pack(torch.randn(4, 4, dtype=torch.bfloat16))


def test_a_gradient_is_never_taken_through_the_kernel():
    weight = torch.randn(8, 8, requires_grad=True)
    with pytest.raises(ValueError):
        panel_gemm(torch.randn(2, 8, requires_grad=True), panel_pack(weight.detach()), 8)


_CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()


@pytest.mark.parametrize("march,width,needs", [("haswell", 16, {"avx2", "fma"}),
                                               ("skylake-avx512", 32, {"avx512f", "avx512bw"})])
def test_every_isa_path_computes_the_same_products(tmp_path, march, width, needs):
    """The AVX2 build (16 columns per panel, tiles of 6 rows) and the AVX-512 one (32, 12), each built for its
    -march and run here where the CPU has it."""
    if not needs <= _CPU_FLAGS:
        pytest.skip(f"this CPU lacks {sorted(needs - _CPU_FLAGS)}")
    lib = native.build_for(march, tmp_path / f"{march}.so")
    assert panel_width(lib) == width
    g = _gen(7)
    weight, x = torch.randn(width * 2 + 5, 77, generator=g), torch.randn(15, 77, generator=g)
    bias = torch.randn(width * 2 + 5, generator=g)
    packed = panel_pack(weight, width)
    y = torch.empty(15, width * 2 + 5)
    lib.engram_panel_gemm_f32(x.data_ptr(), x.stride(0), packed.data_ptr(), bias.data_ptr(), 0, y.data_ptr(),
                              y.stride(0), 15, width * 2 + 5, 77, 2.0, 2)
    _close(y, bias.double() + 2.0 * (x.double() @ weight.double().t()), 77)
    stack = torch.randn(3, width + 1, 77, generator=g)
    offsets, packed_stack = [0, 7, 7, 15], panel_pack(stack, width)
    bounds, grouped = torch.tensor(offsets, dtype=torch.int64), torch.empty(15, width + 1)
    lib.engram_grouped_panel_gemm_f32(x.data_ptr(), x.stride(0), bounds.data_ptr(), 3, packed_stack.data_ptr(),
                                      packed_stack.stride(0), grouped.data_ptr(), grouped.stride(0), width + 1, 77, 2)
    _close(grouped, grouped_decode_gemm_ref(x.double(), offsets, stack.double()), 77)
