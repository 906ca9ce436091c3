"""The measured mode of `execution.cpu_gemm`: whatever this host's timings choose, every projection must
compute the same function; choices are made once and remembered."""

from __future__ import annotations

import pytest
import torch

from model_worker.execution import cpu_gemm
from model_worker.execution.cpu_gemm import CpuGemmPreferences, set_cpu_gemm_preferences
from model_worker.execution.gemm import linear
from model_worker.execution.layout import arranged, is_input_major
from tests.conftest import PINNED_CPU_GEMM


@pytest.fixture
def measured():
    set_cpu_gemm_preferences(None)
    yield
    set_cpu_gemm_preferences(PINNED_CPU_GEMM)


def test_host_preferences_are_measured_once_and_kept(measured):
    first = cpu_gemm.cpu_gemm_preferences()
    assert isinstance(first, CpuGemmPreferences) and first.wide_min_rows_input_major == 16
    assert cpu_gemm.cpu_gemm_preferences() is first  # not measured again
    assert arranged(torch.randn(96, 64)).is_contiguous() != first.input_major_one_row


@pytest.mark.parametrize("rows", [1, 3, 16, 31, 64])
def test_measured_choices_compute_x_at_w_transposed_in_either_order(measured, rows):
    g = torch.Generator().manual_seed(rows)
    for weight in (torch.randn(160, 48, generator=g), torch.randn(48, 160, generator=g).t()):
        x = torch.randn(rows, 48, generator=g)
        want = x.double() @ weight.double().t()
        torch.testing.assert_close(linear(x, weight).double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x, weight).double(), want, rtol=1e-5, atol=1e-5)  # remembered choice


def test_the_input_major_choice_is_made_per_shape_and_power_of_two_row_bucket(measured):
    weight = torch.randn(48, 160).t()  # input-major [160, 48]
    assert is_input_major(weight)
    for rows in (16, 31, 17):
        linear(torch.randn(rows, 48), weight)
    assert set(cpu_gemm._choices) == {("wide", 160, 48, 16)}
    linear(torch.randn(32, 48), weight)
    assert set(cpu_gemm._choices) == {("wide", 160, 48, 16), ("wide", 160, 48, 32)}


def test_packed_weights_give_the_same_products_whatever_the_host_chooses_and_choose_per_bucket(measured):
    from model_worker.execution import packed_gemm

    weight = torch.randn(160, 48)
    if not packed_gemm.pack(weight):
        pytest.skip("torch without oneDNN")
    for rows in (1, 3, 16, 17):
        x = torch.randn(rows, 48)
        with torch.inference_mode():
            got = linear(x, weight)
        torch.testing.assert_close(got.double(), x.double() @ weight.double().t(), rtol=1e-5, atol=1e-5)
    prefs = cpu_gemm.cpu_gemm_preferences()
    packed_keys = {key for key in cpu_gemm._choices if key[0] == "packed"}
    if prefs.pack_weights:
        # One fp32 row goes to the C kernel untimed where the host measurement enabled it (layers.linear).
        from engram_kernels.cpu_decode import decode_gemm_available

        buckets = (2, 16) if prefs.native_max_rows and decode_gemm_available() else (1, 2, 16)
        assert packed_keys == {("packed", 160, 48, torch.float32, bucket) for bucket in buckets}
    else:
        assert not packed_keys  # packing measured slower here: never timed per shape, never used


@pytest.mark.parametrize("mode", ["torch", "packed", "bogus"])
def test_the_environment_fixes_the_kernel_choice_or_is_refused(measured, monkeypatch, mode):
    monkeypatch.setenv(cpu_gemm.CPU_GEMM_ENV, mode)
    if mode == "bogus":
        with pytest.raises(ValueError, match="ENGRAM_CPU_GEMM='bogus'"):
            cpu_gemm.cpu_gemm_preferences()
        return
    prefs = cpu_gemm.cpu_gemm_preferences()
    if mode == "torch":
        assert prefs == cpu_gemm.TORCH_DEFAULTS
    else:
        assert prefs.pack_weights and not prefs.tune_packed


def test_the_c_kernel_is_measured_only_where_it_builds_and_then_keeps_weights_output_major(measured, monkeypatch):
    import engram_kernels.cpu_decode as cpu_decode

    prefs = cpu_gemm.cpu_gemm_preferences()
    assert prefs.native_max_rows in (0, cpu_gemm.NATIVE_MAX_ROWS)
    if prefs.native_max_rows or prefs.panel_weights:  # torch then reads no fp32 weight in decode: output-major
        assert not prefs.input_major_one_row and arranged(torch.randn(96, 64)).is_contiguous()
    monkeypatch.setattr(cpu_decode, "decode_gemm_available", lambda: False)
    without = cpu_gemm.measure_cpu_gemm_preferences(rounds=1)
    assert without.native_max_rows == 0 and not without.panel_weights
