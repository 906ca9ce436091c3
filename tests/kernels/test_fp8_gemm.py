"""Block-scaled FP8 GEMM and FP8 linear: the reference against a float matmul of the dequantized
operands, the Triton kernel (run by the interpreter on CPU) against the reference, and fp8_linear
against F.linear with the unquantized weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engram_kernels.gemm import fp8_gemm, fp8_gemm_ref, fp8_gemm_triton, fp8_linear
from engram_kernels.quant import (
    dequantize_fp8_block_ref,
    dequantize_fp8_weight_ref,
    quantize_fp8_block_ref,
    quantize_fp8_weight_ref,
)

SHAPES = [(5, 200, 300), (64, 128, 256), (1, 384, 130), (33, 260, 128)]  # (M, N, K)
FP32_SUM_RTOL = 1e-5  # fp32 sums of <= 384 exact products in another order: ~K * 2^-24 worst case


def _operands(m: int, n: int, k: int, seed: int):
    """Quantized activations (per token per 128) and weights (128 x 128 tiles) with varied scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-4, 5, (m, 1), generator=g).float())
    w = torch.randn(n, k, generator=g) * 0.05
    return (*quantize_fp8_block_ref(x, 128), *quantize_fp8_weight_ref(w, 128))


def _abs_product(a_q, a_scale, w_q, w_scale) -> torch.Tensor:
    """|A| @ |W|^T of the dequantized operands: scales the rounding error of any summation order."""
    a = dequantize_fp8_block_ref(a_q, a_scale, 128)
    w = dequantize_fp8_weight_ref(w_q, w_scale, 128)
    return a.abs() @ w.abs().T


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_gemm_ref_is_the_matmul_of_the_dequantized_operands(m: int, n: int, k: int) -> None:
    a_q, a_scale, w_q, w_scale = _operands(m, n, k, seed=m + n + k)
    out = fp8_gemm_ref(a_q, a_scale, w_q, w_scale)
    a = dequantize_fp8_block_ref(a_q, a_scale, 128).double()
    w = dequantize_fp8_weight_ref(w_q, w_scale, 128).double()
    assert out.shape == (m, n) and out.dtype == torch.float32
    err = (out.double() - a @ w.T).abs()
    assert (err <= FP32_SUM_RTOL * _abs_product(a_q, a_scale, w_q, w_scale).double() + 1e-30).all()


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_triton_gemm_matches_reference(m: int, n: int, k: int) -> None:
    a_q, a_scale, w_q, w_scale = _operands(m, n, k, seed=m * n + k)
    got = fp8_gemm_triton(a_q, a_scale, w_q, w_scale)
    expected = fp8_gemm_ref(a_q, a_scale, w_q, w_scale)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert ((got - expected).abs() <= FP32_SUM_RTOL * _abs_product(a_q, a_scale, w_q, w_scale)).all()


def test_triton_gemm_reads_strided_operands_and_writes_bf16() -> None:
    a_q, a_scale, w_q, w_scale = _operands(24, 200, 300, seed=3)
    a_q_t = a_q.T.contiguous().T  # same values, column-major
    a_scale_t = a_scale.T.contiguous().T
    got = fp8_gemm_triton(a_q_t, a_scale_t, w_q, w_scale, out_dtype=torch.bfloat16)
    expected = fp8_gemm_ref(a_q, a_scale, w_q, w_scale)
    assert got.dtype == torch.bfloat16
    bf16_step = 2.0**-7 * expected.abs()  # one bf16 ulp, covering round-to-nearest and truncation
    bound = bf16_step + FP32_SUM_RTOL * _abs_product(a_q, a_scale, w_q, w_scale)
    assert ((got.float() - expected).abs() <= bound).all()


def test_gemm_dispatcher_runs_the_reference_on_cpu() -> None:
    a_q, a_scale, w_q, w_scale = _operands(8, 130, 200, seed=4)
    expected = fp8_gemm_ref(a_q, a_scale, w_q, w_scale, torch.float16)
    assert torch.equal(fp8_gemm(a_q, a_scale, w_q, w_scale, torch.float16), expected)


@pytest.mark.parametrize("gemm", [fp8_gemm_ref, fp8_gemm_triton])
def test_gemm_of_zero_tokens_is_empty(gemm) -> None:
    a_q, a_scale, w_q, w_scale = _operands(0, 130, 200, seed=5)
    assert gemm(a_q, a_scale, w_q, w_scale).shape == (0, 130)


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_fp8_linear_is_within_fp8_error_of_float_linear(scale_fmt: str) -> None:
    """FP8 tolerance: x and W are each rounded to E4M3 with error <= 2^-4 of every value (plus a
    subnormal step of at most 2^-10 * scale), so |y - x W^T| <= (2 * 2^-4 + 2^-8) * (|x| @ |W|^T)
    + 1e-3. Random rounding errors mostly cancel: the relative Frobenius error is about 3.6% here
    (about 2.5% per quantized operand), and must stay under 5%."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 300, generator=g)
    w = torch.randn(200, 300, generator=g) * 0.05
    bias = torch.randn(200, generator=g)
    w_q, w_scale = quantize_fp8_weight_ref(w)
    y = fp8_linear(x, w_q, w_scale, bias, scale_fmt)
    y_float = F.linear(x, w, bias)
    assert y.shape == (2, 7, 200) and y.dtype == torch.float32
    err = (y - y_float).abs()
    assert (err <= (2 * 2.0**-4 + 2.0**-8) * (x.abs() @ w.abs().T) + 1e-3).all()
    assert (torch.linalg.norm(y - y_float) / torch.linalg.norm(y_float - bias)).item() < 0.05


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_fp8_linear_is_quantize_then_gemm_over_any_leading_dims(scale_fmt: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 260, generator=g).bfloat16()
    w_q, w_scale = quantize_fp8_weight_ref(torch.randn(130, 260, generator=g) * 0.05)
    bias = torch.randn(130, generator=g).bfloat16()
    a_q, a_scale = quantize_fp8_block_ref(x.reshape(24, 260), 128, scale_fmt)
    expected = (fp8_gemm_ref(a_q, a_scale, w_q, w_scale) + bias.float()).bfloat16().reshape(2, 3, 4, 130)
    y = fp8_linear(x, w_q, w_scale, bias, scale_fmt)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)


def _gemm_args(**change):
    a_q, a_scale, w_q, w_scale = _operands(4, 130, 200, seed=8)
    args = {"a_q": a_q, "a_scale": a_scale, "w_q": w_q, "w_scale": w_scale, "out_dtype": torch.float32}
    return {**args, **change}


@pytest.mark.parametrize(
    ("change", "error", "name"),
    [
        ({"a_q": torch.zeros(4, 200)}, TypeError, "a_q"),
        ({"w_q": torch.zeros(130, 256, dtype=torch.float8_e4m3fn)}, ValueError, "w_q"),
        ({"a_scale": torch.ones(4, 1)}, ValueError, "a_scale"),
        ({"w_scale": torch.ones(2, 2, dtype=torch.bfloat16)}, TypeError, "w_scale"),
        ({"w_scale": torch.ones(1, 2)}, ValueError, "w_scale"),
        ({"out_dtype": torch.int32}, TypeError, "out_dtype"),
    ],
)
@pytest.mark.parametrize("gemm", [fp8_gemm_ref, fp8_gemm_triton])
def test_gemm_rejects_bad_operands_by_name(gemm, change, error, name: str) -> None:
    with pytest.raises(error, match=rf"^{name}\b"):
        gemm(**_gemm_args(**change))


@pytest.mark.parametrize(
    ("x", "bias", "error", "name"),
    [
        (torch.randn(3, 256), None, ValueError, "x"),
        (torch.randn(3, 200).to(torch.float8_e4m3fn), None, TypeError, "x"),
        (torch.randn(3, 200), torch.randn(131), ValueError, "bias"),
        (torch.randn(3, 200), torch.ones(130, dtype=torch.int64), TypeError, "bias"),
    ],
)
def test_fp8_linear_rejects_bad_inputs_by_name(x, bias, error, name: str) -> None:
    args = _gemm_args()
    with pytest.raises(error, match=rf"^{name}\b"):
        fp8_linear(x, args["w_q"], args["w_scale"], bias)
