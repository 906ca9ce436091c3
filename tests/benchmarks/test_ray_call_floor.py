"""benchmarks/ray_call_floor.py: the payloads are one engine step's Engram rows in the engram_remote.py
geometry (checked against the capacity model's bytes per token), FP8 rows survive the trip as bytes, and a
too-small --calls is refused before Ray starts."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.benchmarks import load_script

floor = load_script("ray_call_floor")
EngramGeometry = load_script("engram_capacity").EngramGeometry


def test_payloads_are_a_steps_engram_rows():
    server = floor.RowServer()
    geometry = EngramGeometry(floor.LAYERS, 4, 8, floor.ROW_VALUES)  # n-grams 2..4, 8 heads: 24 rows a layer
    for tokens, dtype in floor.PAYLOADS:
        rows = server.step_rows(tokens, dtype)
        assert sorted(rows) == list(range(floor.LAYERS))
        sent = sum(r.numel() * r.element_size() for r in rows.values())
        if dtype == torch.uint8:  # FP8 values without their block scales
            assert sent == tokens * geometry.rows_per_token * floor.ROW_VALUES
        else:
            assert sent == tokens * geometry.bytes_per_token("fp32")
        assert server.dispatch(("step_rows", tokens, dtype)) is rows  # the compiled graph's entry point
    assert server.dispatch(("noop",)) is None


def test_fp8_rows_travel_as_their_bytes():
    rows = floor._rows(16, torch.uint8)
    assert rows.dtype == torch.uint8
    values = rows.view(torch.float8_e4m3fn).float()
    assert torch.isfinite(values).all() and values.abs().max() <= 448


def test_too_few_calls_are_refused_in_one_line():
    done = subprocess.run([sys.executable, str(floor.__file__), "--calls", "3"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--calls must be at least 10")
