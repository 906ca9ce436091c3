"""The C decode GEMM (`engram_kernels.cpu_decode`) against its torch definition in float64, its operand checks,
and its build: cached per machine, rebuilt when the cache is damaged, refused cleanly without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engram_kernels.cpu_decode import (
    decode_gemm,
    decode_gemm_available,
    decode_gemm_ref,
    decode_gemm_supports,
    grouped_decode_gemm,
    grouped_decode_gemm_ref,
    native,
)

ROOT = Path(__file__).resolve().parents[2]
HOST_HAS_KERNEL_ISA = "avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False

needs_kernel = pytest.mark.skipif(not decode_gemm_available(), reason=f"no C kernel: {native.unavailable_reason()}")


def test_the_kernel_builds_wherever_a_compiler_and_avx2_are_present():
    """Guards the skips below: on an x86-64 machine with gcc and AVX2 the kernel must really build."""
    if HOST_HAS_KERNEL_ISA and native._compilers():
        assert decode_gemm_available(), native.unavailable_reason()


def _expected(x, weight, addend=None, alpha=1.0):
    return decode_gemm_ref(x.double(), weight.double(), None if addend is None else addend.double(), alpha)


def _tolerance(k: int) -> dict:
    return dict(rtol=1e-5, atol=2e-6 * max(k, 1) ** 0.5 * 4)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (3, 17), (4, 16), (5, 31), (33, 100), (768, 768),
                                                      (130, 8)])
def test_decode_gemm_equals_float64_for_every_tail(rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    x = torch.randn(rows, in_features, generator=g)
    weight = torch.randn(out_features, in_features, generator=g)
    torch.testing.assert_close(decode_gemm(x, weight).double(), _expected(x, weight), **_tolerance(in_features))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 6])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (5, 31), (33, 100), (768, 768), (9, 64)])
def test_bf16_decode_gemm_accumulates_in_fp32_and_rounds_once(rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows * 7 + out_features + in_features)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g)
    got = decode_gemm(x, weight, bias, alpha=0.5)
    assert got.dtype == torch.bfloat16
    exact = _expected(x, weight, bias, 0.5)  # the bf16 values, multiplied and summed in float64
    torch.testing.assert_close(got.double(), exact, rtol=8e-3, atol=1e-5 * in_features ** 0.5 + 8e-3)
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    assert decode_gemm(x, weight, bias, alpha=0.5, out=out) is out
    assert torch.equal(out, got)


@needs_kernel
def test_bias_row_accumulate_in_place_alpha_and_strided_operands():
    g = torch.Generator().manual_seed(7)
    wide_x = torch.randn(6, 200, generator=g)
    x = wide_x[1:5, 10:110]  # [4, 100] rows 200 apart
    big_weight = torch.randn(40, 150, generator=g)
    weight = big_weight[3:37, 20:120]  # [34, 100] rows 150 apart
    bias = torch.randn(34, generator=g)
    assert not x.is_contiguous() and not weight.is_contiguous()
    tol = _tolerance(100)
    torch.testing.assert_close(decode_gemm(x, weight, bias).double(), _expected(x, weight, bias), **tol)
    out = torch.randn(4, 34, generator=g)
    before = out.clone()
    result = decode_gemm(x, weight, out, alpha=-0.25, out=out)  # out += -0.25 x W^T, in place
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.double(), _expected(x, weight, before, -0.25), **tol)
    whole = torch.zeros(4, 50)
    target = whole[:, 5:39]  # writes into a strided view, leaves the rest alone
    decode_gemm(x, weight, out=target)
    torch.testing.assert_close(target.double(), _expected(x, weight), **tol)
    assert whole[:, :5].abs().sum() == 0 and whole[:, 39:].abs().sum() == 0


@needs_kernel
def test_thread_count_does_not_change_a_single_bit():
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(5, 300, generator=g), torch.randn(257, 300, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_gemm(x, weight)
        torch.set_num_threads(max(2, threads))
        many = decode_gemm(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_kernel
def test_empty_operands_give_empty_or_addend_results():
    assert decode_gemm(torch.randn(0, 8), torch.randn(4, 8)).shape == (0, 4)
    assert decode_gemm(torch.randn(3, 8), torch.randn(0, 8)).shape == (3, 0)
    bias = torch.randn(4)
    torch.testing.assert_close(decode_gemm(torch.randn(2, 0), torch.randn(4, 0), bias), bias.expand(2, 4))


@needs_kernel
def test_operands_the_kernel_does_not_take_are_refused_with_their_shapes():
    x, weight = torch.randn(2, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match="both fp32 or both bf16"):
        decode_gemm(x.half(), weight.half())
    with pytest.raises(ValueError, match="both fp32 or both bf16"):
        decode_gemm(x.bfloat16(), weight)
    with pytest.raises(ValueError, match="out must be torch.bfloat16"):
        decode_gemm(x.bfloat16(), weight.bfloat16(), out=torch.empty(2, 8))
    with pytest.raises(ValueError, match=r"\[2, 12\]"):
        decode_gemm(torch.randn(2, 12), weight)
    with pytest.raises(ValueError, match="strides"):
        decode_gemm(x, torch.randn(16, 8).t())  # input-major weight: its K stride is not 1
    with pytest.raises(ValueError, match="out must be"):
        decode_gemm(x, weight, out=torch.empty(2, 9))
    with pytest.raises(ValueError, match="addend must be"):
        decode_gemm(x, weight, torch.randn(3, 8))
    with pytest.raises(ValueError, match="addend must be fp32"):
        decode_gemm(x, weight, torch.randn(8, dtype=torch.float64))
    wants_grad = weight.clone().requires_grad_()
    assert not decode_gemm_supports(x, wants_grad)
    with torch.no_grad():
        assert decode_gemm_supports(x, wants_grad)


@needs_kernel
@pytest.mark.parametrize("counts", [[4, 0, 3, 5, 1, 9], [1], [0, 0, 2], [0, 0, 0], [2] * 16])
@pytest.mark.parametrize("out_features,in_features", [(37, 100), (768, 384), (6, 5)])
def test_grouped_decode_gemm_equals_float64_group_by_group(counts, out_features, in_features):
    g = torch.Generator().manual_seed(len(counts) + out_features)
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    x = torch.randn(offsets[-1], in_features, generator=g)
    weight = torch.randn(len(counts), out_features, in_features, generator=g)
    got = grouped_decode_gemm(x, offsets, weight)
    assert got.shape == (offsets[-1], out_features)
    torch.testing.assert_close(got.double(), grouped_decode_gemm_ref(x.double(), offsets, weight.double()),
                               **_tolerance(in_features))


@needs_kernel
def test_grouped_decode_gemm_refuses_bad_offsets_and_weights():
    x, weight = torch.randn(5, 16), torch.randn(3, 8, 16)
    for offsets in ([0, 2, 5], [1, 2, 3, 5], [0, 3, 2, 5], [0, 1, 2, 4]):
        with pytest.raises(ValueError, match="offsets must be 4 non-decreasing"):
            grouped_decode_gemm(x, offsets, weight)
    with pytest.raises(ValueError, match="unit stride"):
        grouped_decode_gemm(x, [0, 1, 2, 5], weight.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="weight \\[G, N, K\\]"):
        grouped_decode_gemm(x, [0, 5], weight[0])


_CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()


@needs_kernel
@pytest.mark.parametrize("march,isa,needs", [("haswell", 256, {"avx2", "fma"}),
                                             ("skylake-avx512", 512, {"avx512f", "avx512bw"}),
                                             ("cooperlake", 512, {"avx512f", "avx512bw", "avx512_bf16"})])
def test_every_isa_path_of_the_source_computes_the_same_products(tmp_path, march, isa, needs):
    """AVX2, AVX-512 without bf16 instructions (bf16 widened to fp32) and AVX-512 with vdpbf16ps, each built
    for its -march and run here, where the CPU has them."""
    if not needs <= _CPU_FLAGS:
        pytest.skip(f"this CPU lacks {sorted(needs - _CPU_FLAGS)}")
    lib = native.build_for(march, tmp_path / f"{march}.so")
    assert lib.engram_decode_gemm_isa() == isa
    g = torch.Generator().manual_seed(5)
    for dtype, gemm, tol in ((torch.float32, lib.engram_decode_gemm_f32, 1e-4),
                             (torch.bfloat16, lib.engram_decode_gemm_bf16, 8e-3)):
        x = torch.randn(5, 77, generator=g).to(dtype)
        weight = torch.randn(38, 77, generator=g).to(dtype)
        y = torch.empty(5, 38)
        gemm(x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0), None, 0, y.data_ptr(), y.stride(0),
             5, 38, 77, 1.0, 2)
        torch.testing.assert_close(y.double(), _expected(x, weight), rtol=tol, atol=tol)


def _load_in_subprocess(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    code = ("from engram_kernels.cpu_decode import native\n"
            "lib = native.load()\n"
            "print('OK' if lib else 'NONE', native.unavailable_reason())\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "ENGRAM_KERNEL_CACHE": str(tmp_path), **env})


@needs_kernel
def test_a_build_is_cached_and_a_damaged_cache_entry_is_rebuilt(tmp_path):
    first = _load_in_subprocess(tmp_path)
    assert first.stdout.startswith("OK"), first.stderr
    [built] = list(tmp_path.glob("decode_gemm-*.so"))
    stamp = built.stat().st_mtime_ns
    assert _load_in_subprocess(tmp_path).stdout.startswith("OK")
    assert built.stat().st_mtime_ns == stamp  # loaded from the cache, not compiled again
    built.write_bytes(b"not a shared library")
    third = _load_in_subprocess(tmp_path)
    assert third.stdout.startswith("OK"), third.stderr
    assert built.read_bytes()[:4] == b"\x7fELF"  # rebuilt in place
    assert not list(tmp_path.glob("*.tmp.so"))  # no temporary files left behind


@pytest.mark.skipif(not HOST_HAS_KERNEL_ISA, reason="x86-64 with AVX2 only")
def test_a_failing_compiler_leaves_the_kernel_unavailable_with_the_reason(tmp_path):
    done = _load_in_subprocess(tmp_path, CC="/bin/false")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("NONE") and "could not build" in done.stdout
    assert not list(tmp_path.glob("*.so"))


@needs_kernel
def test_a_cc_that_cannot_build_falls_back_to_gcc(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cc").write_text("#!/bin/sh\necho 'no OpenMP here' >&2\nexit 1\n")
    (fake / "cc").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "CC"}
    code = ("from engram_kernels.cpu_decode import native\n"
            "print('OK' if native.load() else native.unavailable_reason())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**env, "PATH": f"{fake}:{env['PATH']}", "ENGRAM_KERNEL_CACHE": str(tmp_path / "cache")})
    assert done.stdout.startswith("OK"), done.stdout + done.stderr
