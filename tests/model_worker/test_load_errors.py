"""load_model on bad checkpoints: a clear error naming the problem, and no model returned."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model_worker import CheckpointError, ConfigError, load_model
from tests.model_worker.hf_checkpoints import write_hf_checkpoint


@pytest.fixture()
def checkpoint(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, "v3", "no_q_lora")
    return path


def test_truncated_weights_file(checkpoint):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(checkpoint)


def test_config_and_weights_disagree_on_shapes(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["kv_lora_rank"] = 48
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(checkpoint)
    message = str(err.value)
    assert "kv_a_proj_with_mqa" in message and "kv_b_proj" in message and "kv_a_layernorm" in message


def test_missing_layer_weights_are_listed(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\."):
        load_model(checkpoint)


def test_pickle_checkpoint_is_refused_without_unpickling(checkpoint, monkeypatch):
    (checkpoint / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, checkpoint / "pytorch_model.bin")

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle file was opened")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(checkpoint)


def test_bad_config_field_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_experts_per_tok"] = 99
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        load_model(checkpoint)


def test_missing_directory_and_bad_settings(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype"):
        load_model(checkpoint, dtype="int8")
    with pytest.raises(ValueError, match="fp8_mode"):
        load_model(checkpoint, fp8_mode="int4")


def test_engram_model_without_tables_is_refused(tmp_path):
    from model_worker import save_model
    from tests.model_worker.test_engram_mhc_model import _model

    save_model(_model(), tmp_path / "m")
    shutil.move(tmp_path / "m" / "engram_tables.safetensors", tmp_path / "tables")
    with pytest.raises(CheckpointError, match="engram_tables"):
        load_model(tmp_path / "m")
