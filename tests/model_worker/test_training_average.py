"""Interpolating two exported demo checkpoints (model_worker/training/average.py) against the formula
(1 - w) * A + w * B, computed here from the files, and its refusals of checkpoints that cannot be averaged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_worker.engram_tables import EngramTable
from model_worker.loading import load_engram_tables, load_model
from model_worker.tokenizer import Tokenizer
from model_worker.training.average import interpolate, main
from model_worker.training.model_setup import build_trainable, demo_model_config, export_checkpoint

SHIPPED = Path(__file__).resolve().parents[2] / "model_worker" / "demo_model"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("average")
    tokenizer = Tokenizer.from_pretrained(SHIPPED)
    config = demo_model_config(tokenizer, engram=True, mhc=False)
    for seed in (1, 2):
        model, tables = build_trainable(config, tokenizer, seed)
        export_checkpoint(model, tables, SHIPPED, root / f"seed{seed}")
    return root / "seed1", root / "seed2"


def test_weights_and_tables_are_the_interpolation(two_checkpoints, tmp_path):
    first, second = two_checkpoints
    interpolate(first, second, 0.25, tmp_path / "mix")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    mixed = load_file(tmp_path / "mix" / "model.safetensors")
    assert set(mixed) == set(a)
    moved = 0
    for name, tensor in mixed.items():
        if tensor.is_floating_point():
            expected = a[name].float().lerp(b[name].float(), 0.25).to(tensor.dtype)
            assert torch.equal(tensor, expected), name
            moved += not torch.equal(tensor, a[name])
        else:
            assert torch.equal(tensor, a[name]), name
    assert moved > 10  # the two random checkpoints differ, so the mix is neither
    config = load_model(first).config
    tables_a, tables_b = load_engram_tables(first, config), load_engram_tables(second, config)
    tables_mix = load_engram_tables(tmp_path / "mix", config)
    for layer, table in tables_mix.tables.items():
        expected = tables_a.tables[layer].dequantize().lerp(tables_b.tables[layer].dequantize(), 0.25)
        assert torch.equal(table.dequantize(), EngramTable.from_float(expected, "fp8").dequantize())
    assert (tmp_path / "mix" / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    load_model(tmp_path / "mix")  # servable through the normal loader


def test_checkpoints_that_cannot_be_averaged_are_refused(two_checkpoints, tmp_path):
    first, second = two_checkpoints
    with pytest.raises(ValueError, match="between 0 and 1"):
        interpolate(first, second, 1.5, tmp_path / "out")
    other = tmp_path / "other"
    shutil.copytree(second, other)
    (other / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="different tokenizers"):
        interpolate(first, other, 0.5, tmp_path / "out")
    with pytest.raises(ValueError, match="model.safetensors missing"):
        interpolate(first, tmp_path / "nowhere", 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_one_line(two_checkpoints, tmp_path, capsys):
    first, _ = two_checkpoints
    for argv in ([str(first), str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
                 [str(first), str(first), "--weight", "2", "--out", str(tmp_path / "out")],
                 [str(first), str(first), "--out", str(first)]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()[-1]) > 0
    assert not (tmp_path / "out").exists()
