"""FP8 block quantization: the torch reference against the E4M3 format's own arithmetic, and the
Triton kernels (run by the interpreter on CPU) against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from engram_kernels.quant import (
    FP8_E4M3_MAX,
    dequantize_fp8_block,
    dequantize_fp8_block_ref,
    dequantize_fp8_block_triton,
    dequantize_fp8_weight,
    dequantize_fp8_weight_ref,
    dequantize_fp8_weight_triton,
    quantize_fp8_block,
    quantize_fp8_block_ref,
    quantize_fp8_block_triton,
    quantize_fp8_weight_ref,
)

BLOCKS = (32, 64, 128)
FMTS = ("fp32", "ue8m0")
HALF_ULP = 2.0**-4  # E4M3 has 3 mantissa bits: rounding error <= 2^-4 of the value (normals)
SUBNORMAL_STEP = 2.0**-9  # spacing of E4M3 below 2^-6


def _blocky_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian values whose magnitude changes by powers of two from row to row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x * torch.exp2(torch.randint(-6, 7, (*shape[:-1], 1), generator=g).float())


def _e4m3_values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random finite E4M3 values (as float32), every code except NaN equally likely."""
    codes = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # NaN codes -> 1.5
    return codes.view(torch.float8_e4m3fn).float()


def _representable_input(shape: tuple[int, ...], block: int, seed: int) -> torch.Tensor:
    """E4M3 values times a power of two per block, each block's amax 448 * that power: quantizing
    recovers them exactly under both scale formats."""
    k = shape[-1]
    q = _e4m3_values(shape, seed)
    q[..., ::block] = FP8_E4M3_MAX  # one 448 per block pins amax = 448 * scale
    nb = math.ceil(k / block)
    g = torch.Generator().manual_seed(seed + 1)
    pow2 = torch.exp2(torch.randint(-10, 8, (*shape[:-1], nb), generator=g).float())
    return q * pow2.repeat_interleave(block, dim=-1)[..., :k]


def _assert_is_fp32_result_stored_as(got: torch.Tensor, exact: torch.Tensor) -> None:
    """got == exact (fp32) cast to got's dtype; a bfloat16 `got` may instead hold `exact` truncated,
    because the CPU interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest)."""
    rounded = exact.to(got.dtype)
    if got.dtype != torch.bfloat16:
        assert torch.equal(got, rounded)
        return
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32)
    assert ((got.float() == rounded.float()) | (got.float() == truncated)).all()


def _per_value(scale: torch.Tensor, block: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(block, dim=-1)[..., :k]


def _float64_block_scales(x: torch.Tensor, block: int) -> torch.Tensor:
    """max(amax, 1e-4) / 448 per block, one block at a time in float64."""
    flat = x.double().reshape(-1, x.shape[-1])
    rows = []
    for row in flat:
        blocks = [row[s : s + block] for s in range(0, row.numel(), block)]
        rows.append([max(b.abs().max().item(), 1e-4) / 448.0 for b in blocks])
    return torch.tensor(rows, dtype=torch.float64).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("block", BLOCKS)
def test_round_trip_error_is_within_half_an_e4m3_ulp(block: int, scale_fmt: str) -> None:
    x = _blocky_input((3, 5, 200), seed=block)  # 200 = partial last block for every block size
    q, scale = quantize_fp8_block_ref(x, block, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (3, 5, math.ceil(200 / block))
    err = (dequantize_fp8_block_ref(q, scale, block) - x).abs()
    s = _per_value(scale, block, x.shape[-1])
    assert (err <= HALF_ULP * x.abs() + SUBNORMAL_STEP / 2 * s + 1e-6 * x.abs()).all()
    block_amax = _per_value(_float64_block_scales(x, block).float() * FP8_E4M3_MAX, block, x.shape[-1])
    assert (err <= HALF_ULP * block_amax).all()


@pytest.mark.parametrize("block", BLOCKS)
def test_fp32_scales_are_block_amax_over_448(block: int) -> None:
    x = _blocky_input((4, 300), seed=7)
    x[1, :block] = 0.0  # all-zero block: amax floored at 1e-4
    _, scale = quantize_fp8_block_ref(x, block)
    expected = _float64_block_scales(x, block)
    assert scale[1, 0].item() == pytest.approx(1e-4 / 448, rel=1e-6)
    torch.testing.assert_close(scale.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("block", BLOCKS)
def test_ue8m0_scales_are_the_next_power_of_two_up(block: int) -> None:
    x = _blocky_input((4, 300), seed=11)
    _, s_fp32 = quantize_fp8_block_ref(x, block, "fp32")
    _, s_pow2 = quantize_fp8_block_ref(x, block, "ue8m0")
    mantissa, _ = torch.frexp(s_pow2)
    assert (mantissa == 0.5).all()  # exact powers of two
    assert (s_pow2 >= s_fp32).all() and (s_pow2 < 2 * s_fp32).all()


@pytest.mark.parametrize("quantize", [quantize_fp8_block_ref, quantize_fp8_block_triton])
def test_ue8m0_rounds_a_scale_one_ulp_above_a_power_of_two_up(quantize) -> None:
    # amax = 56 (1 + 2^-18) gives the fp32 scale 2^-3 (1 + 2^-23); log2 of it rounds to -3 in fp32.
    x = torch.zeros(2, 64)
    x[0, 5] = torch.nextafter(torch.tensor(56.0), torch.tensor(100.0))
    x[1, 9] = -56.0  # exactly 448 * 2^-3: already a power of two, kept
    _, s_fp32 = quantize(x, 64, "fp32")
    _, s_pow2 = quantize(x, 64, "ue8m0")
    assert s_fp32[0, 0].item() == 2.0**-3 * (1 + 2.0**-23)
    assert s_pow2[:, 0].tolist() == [2.0**-2, 2.0**-3]


@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("block", BLOCKS)
def test_exactly_representable_values_round_trip_exactly(block: int, scale_fmt: str) -> None:
    x = _representable_input((6, 300), block, seed=block + 1)
    q, scale = quantize_fp8_block_ref(x, block, scale_fmt)
    assert torch.equal(dequantize_fp8_block_ref(q, scale, block), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("block", BLOCKS)
def test_triton_quantize_is_bit_exact_on_representable_inputs(block: int, scale_fmt: str, dtype) -> None:
    x = _representable_input((2, 3, 200), block, seed=block + 2).to(dtype)
    q_ref, s_ref = quantize_fp8_block_ref(x, block, scale_fmt)
    q_tri, s_tri = quantize_fp8_block_triton(x, block, scale_fmt)
    assert torch.equal(s_tri, s_ref)
    assert torch.equal(q_tri.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("block", BLOCKS)
def test_triton_quantize_matches_reference_up_to_interpreter_rounding(block: int, scale_fmt: str) -> None:
    """The CPU interpreter's fp32->e4m3 store sometimes rounds toward zero where it should round
    away (it drops the carry into the exponent, and truncates subnormals). On a GPU the codes match
    exactly; here every mismatch must be of that kind and rare."""
    x = _blocky_input((2, 3, 200), seed=block + 3)
    q_ref, s_ref = quantize_fp8_block_ref(x, block, scale_fmt)
    q_tri, s_tri = quantize_fp8_block_triton(x, block, scale_fmt)
    assert torch.equal(s_tri, s_ref)
    ref_code, tri_code = q_ref.view(torch.uint8).int(), q_tri.view(torch.uint8).int()
    wrong = ref_code != tri_code
    assert wrong.float().mean().item() < 0.05
    assert ((ref_code ^ tri_code)[wrong] & 0x80 == 0).all()  # same sign
    assert ((ref_code & 0x7F)[wrong] > (tri_code & 0x7F)[wrong]).all()  # smaller magnitude


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", BLOCKS)
def test_triton_dequantize_equals_reference(block: int, dtype: torch.dtype) -> None:
    q = _e4m3_values((3, 4, 200), seed=block).to(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(block)
    scale = torch.rand(3, 4, math.ceil(200 / block), generator=g) * 0.01
    got = dequantize_fp8_block_triton(q, scale, block, dtype)
    _assert_is_fp32_result_stored_as(got, dequantize_fp8_block_ref(q, scale, block))


def test_dispatchers_run_the_reference_on_cpu_with_all_arguments() -> None:
    x = _blocky_input((4, 100), seed=3)
    q_ref, s_ref = quantize_fp8_block_ref(x, 32, "ue8m0")
    q, s = quantize_fp8_block(x, 32, "ue8m0")
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    expected = dequantize_fp8_block_ref(q, s, 32, torch.bfloat16)
    assert torch.equal(dequantize_fp8_block(q, s, 32, torch.bfloat16), expected)


@pytest.mark.parametrize("quantize", [quantize_fp8_block_ref, quantize_fp8_block_triton])
def test_quantize_accepts_zero_tokens(quantize) -> None:
    q, scale = quantize(torch.empty(0, 256), 128, "fp32")
    assert q.shape == (0, 256) and scale.shape == (0, 2)


@pytest.mark.parametrize("block", [64, 128])
def test_weight_round_trip_on_partial_tiles(block: int) -> None:
    w = _blocky_input((200, 300), seed=block) * 0.02
    w_q, scale_inv = quantize_fp8_weight_ref(w, block)
    nb_n, nb_k = math.ceil(200 / block), math.ceil(300 / block)
    assert w_q.dtype == torch.float8_e4m3fn and w_q.shape == (200, 300) and w_q.is_contiguous()
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (nb_n, nb_k)
    for i in range(nb_n):
        for j in range(nb_k):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block].double()
            expected = max(tile.abs().max().item(), 1e-4) / 448.0
            assert scale_inv[i, j].item() == pytest.approx(expected, rel=1e-6)
    s = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:200, :300]
    err = (dequantize_fp8_weight_ref(w_q, scale_inv, block) - w).abs()
    assert (err <= HALF_ULP * w.abs() + SUBNORMAL_STEP / 2 * s + 1e-6 * w.abs()).all()


def test_weight_of_representable_values_round_trips_exactly() -> None:
    q = _e4m3_values((200, 300), seed=5)
    q[::128, ::128] = -FP8_E4M3_MAX  # amax 448 in every 128 x 128 tile
    tile_pow2 = torch.tensor([[2.0**-7, 2.0**-3, 2.0**-9], [2.0**-5, 2.0**-8, 2.0**-4]])
    w = q * tile_pow2.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    w_q, scale_inv = quantize_fp8_weight_ref(w)
    assert torch.equal(scale_inv, tile_pow2)
    assert torch.equal(dequantize_fp8_weight_ref(w_q, scale_inv), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [64, 128])
def test_triton_weight_dequantize_equals_reference(block: int, dtype: torch.dtype) -> None:
    w_q = _e4m3_values((200, 300), seed=block).to(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(block)
    scale_inv = torch.rand(math.ceil(200 / block), math.ceil(300 / block), generator=g) * 1e-3
    exact = dequantize_fp8_weight_ref(w_q, scale_inv, block)  # fp32
    assert torch.equal(dequantize_fp8_weight(w_q, scale_inv, block, dtype), exact.to(dtype))  # CPU: reference
    _assert_is_fp32_result_stored_as(dequantize_fp8_weight_triton(w_q, scale_inv, block, dtype), exact)


_Q = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
_S = torch.ones(4, 2)


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda f: f(torch.ones(4, 256, dtype=torch.int32)), TypeError, "x"),
        (lambda f: f(torch.ones(4, 256), 48), ValueError, "block"),
        (lambda f: f(torch.ones(4, 256), 128, "e8m0"), ValueError, "scale_fmt"),
        (lambda f: f(torch.ones(())), ValueError, "x"),
    ],
)
@pytest.mark.parametrize("quantize", [quantize_fp8_block_ref, quantize_fp8_block_triton])
def test_quantize_rejects_bad_arguments_by_name(quantize, call, error, name: str) -> None:
    with pytest.raises(error, match=rf"^{name}\b"):
        call(quantize)


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [
        ((_Q.float(), _S), TypeError, "q"),
        ((_Q, _S.double()), TypeError, "scale"),
        ((_Q, torch.ones(4, 3)), ValueError, "scale"),
        ((_Q, _S, 128, torch.int8), TypeError, "dtype"),
    ],
)
@pytest.mark.parametrize("dequantize", [dequantize_fp8_block_ref, dequantize_fp8_block_triton])
def test_dequantize_rejects_bad_arguments_by_name(dequantize, args, error, name: str) -> None:
    with pytest.raises(error, match=rf"^{name}\b"):
        dequantize(*args)


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: quantize_fp8_weight_ref(torch.ones(2, 3, 4)), ValueError, "w"),
        (lambda: quantize_fp8_weight_ref(torch.ones(4, 4), 100), ValueError, "block"),
        (lambda: dequantize_fp8_weight_ref(_Q, torch.ones(2, 2)), ValueError, "scale_inv"),
        (lambda: dequantize_fp8_weight_triton(_Q[0], torch.ones(1, 2)), ValueError, "w_q"),
        (lambda: dequantize_fp8_weight_triton(_Q.half(), torch.ones(1, 2)), TypeError, "w_q"),
    ],
)
def test_weight_ops_reject_bad_arguments_by_name(call, error, name: str) -> None:
    with pytest.raises(error, match=rf"^{name}\b"):
        call()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu])
def test_table_decode_of_one_byte_floats_equals_torch_conversion_for_every_code(dtype):
    """one_byte_float_to_float32 (a 256-entry table) is bit-identical to .float(), NaN codes included,
    on a strided slice as on a contiguous tensor."""
    from engram_kernels.quant.fp8_format import one_byte_float_to_float32

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).reshape(16, 16)
    for x in (codes, codes[:, 3:11], codes.t()):
        got, want = one_byte_float_to_float32(x), x.float()
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.view(torch.int32)[~got.isnan()], want.view(torch.int32)[~want.isnan()])
    with pytest.raises(TypeError, match="one-byte float"):
        one_byte_float_to_float32(torch.zeros(3, dtype=torch.uint8))
