"""Checkpoint reading, strict loading and saving (`model_worker.weights`) and the FP8 `Linear`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from model_worker.errors import CheckpointError
from model_worker.layers.linear import Linear
from model_worker.weights import INDEX_FILE, SINGLE_FILE, load_state, read_checkpoint, save_state


class Toy(nn.Module):
    """Two Linears (one with a partial 128-block), an fp32-only parameter, int and scratch buffers."""

    def __init__(self, seed: int = 0, device: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = Linear(256, 136, bias=True, device=device)  # scales [2, 2]
        self.out = Linear(136, 40, device=device)  # scales [1, 2]
        self.mix_scale = nn.Parameter(torch.randn(3, device=device))
        self.register_buffer("positions", torch.arange(5, device=device) + seed)
        self.register_buffer("scratch", torch.zeros(4, device=device), persistent=False)

    def keep_fp32_names(self) -> set[str]:
        return {"mix_scale"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.proj(x)))


class TiedToy(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(10, 8)
        self.head = Linear(8, 10)
        self.head.weight = self.embed.weight


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def _quantize_layer(layer: Linear) -> None:
    from engram_kernels.quant import quantize_fp8_weight_ref

    layer.to_fp8(*quantize_fp8_weight_ref(layer.weight.detach()))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make every unpickling entry point fail loudly, so a test fails if the loader uses one."""

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint loader must never unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


# ------------------------------------------------------------------------------------------ round trips


def test_float_round_trip_is_bit_exact(tmp_path: Path, no_unpickling) -> None:
    saved = Toy(seed=1)
    save_state(saved, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    fresh = Toy(seed=2)
    load_state(fresh, read_checkpoint(tmp_path))
    _assert_bit_equal(_state(fresh), _state(saved))
    x = torch.randn(3, 256)
    # Same bits, other addresses: torch's CPU GEMM rounds differently for weights that are not 16-byte
    # aligned (a loaded checkpoint's tensors need not be), so the outputs agree to float rounding.
    torch.testing.assert_close(fresh(x), saved(x), rtol=1e-6, atol=1e-6)


def test_sharded_round_trip_writes_index_and_is_bit_exact(tmp_path: Path, no_unpickling) -> None:
    saved = Toy(seed=1)
    _quantize_layer(saved.proj)
    save_state(saved, tmp_path, max_shard_bytes=40_000)  # proj.weight (34,816 B) fits; the rest spills
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (tmp_path / SINGLE_FILE).exists()
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert weight_map.keys() == saved.state_dict().keys() and set(weight_map.values()) == set(shards)
    fresh = Toy(seed=2)
    load_state(fresh, read_checkpoint(tmp_path), fp8_mode="gemm")
    assert fresh.proj.is_fp8 and not fresh.out.is_fp8
    _assert_bit_equal(_state(fresh), _state(saved))


def test_fp8_layer_is_saved_as_e4m3_weight_plus_fp32_scales(tmp_path: Path) -> None:
    model = Toy()
    _quantize_layer(model.out)
    save_state(model, tmp_path)
    tensors = read_checkpoint(tmp_path / SINGLE_FILE)
    assert tensors["out.weight"].dtype == torch.float8_e4m3fn
    assert tensors["out.weight_scale_inv"].dtype == torch.float32
    assert tensors["out.weight_scale_inv"].shape == (1, 2)
    assert "proj.weight_scale_inv" not in tensors and "scratch" not in tensors


def test_resaving_unsharded_removes_the_stale_index(tmp_path: Path) -> None:
    save_state(Toy(seed=1), tmp_path, max_shard_bytes=10_000)
    assert (tmp_path / INDEX_FILE).exists()
    latest = Toy(seed=3)
    save_state(latest, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    fresh = Toy()
    load_state(fresh, read_checkpoint(tmp_path))
    _assert_bit_equal(_state(fresh), _state(latest))


def test_tied_weights_save_and_load_from_either_alias(tmp_path: Path) -> None:
    saved = TiedToy(seed=1)
    save_state(saved, tmp_path)  # safetensors refuses shared storage unless we clone
    tensors = read_checkpoint(tmp_path)
    assert torch.equal(tensors["embed.weight"], tensors["head.weight"])
    for dropped in ("embed.weight", "head.weight"):
        fresh = TiedToy(seed=2)
        load_state(fresh, {k: v for k, v in tensors.items() if k != dropped})
        assert fresh.head.weight is fresh.embed.weight
        assert torch.equal(fresh.embed.weight, saved.embed.weight)


def test_extra_tensors_are_saved_and_must_not_clash(tmp_path: Path) -> None:
    extra = {"engram_token_map": torch.arange(7)}
    save_state(Toy(), tmp_path, extra_tensors=extra)
    assert torch.equal(read_checkpoint(tmp_path)["engram_token_map"], extra["engram_token_map"])
    with pytest.raises(ValueError, match="mix_scale"):
        save_state(Toy(), tmp_path, extra_tensors={"mix_scale": torch.zeros(3)})


# ------------------------------------------------------------------------------------ strict loading


def test_missing_unexpected_and_misshaped_tensors_are_all_reported_and_nothing_changes() -> None:
    tensors = _state(Toy(seed=1))
    del tensors["out.weight"]
    tensors["bogus.weight"] = torch.zeros(2)
    tensors["proj.bias"] = torch.zeros(135)
    tensors["positions"] = tensors["positions"].float()  # int buffer given as float
    target = Toy(seed=2)
    before = _state(target)
    with pytest.raises(CheckpointError) as info:
        load_state(target, tensors)
    problems = "\n".join(info.value.problems)
    assert "out.weight: missing" in problems
    assert "bogus.weight: unexpected" in problems
    assert "proj.bias: shape mismatch, expected [136], got [135]" in problems
    assert "positions: dtype mismatch" in problems
    assert len(info.value.problems) == 4 and all(p in str(info.value) for p in info.value.problems)
    _assert_bit_equal(_state(target), before)


def test_ignore_silences_only_unexpected_names() -> None:
    tensors = _state(Toy(seed=1))
    tensors["layers.99.mlp.weight"] = torch.zeros(1)
    load_state(Toy(), tensors, ignore=lambda name: name.startswith("layers.99."))
    del tensors["out.weight"]
    with pytest.raises(CheckpointError, match="out.weight: missing"):
        load_state(Toy(), tensors, ignore=lambda name: True)


def test_fp8_scale_of_wrong_shape_is_rejected_before_loading(tmp_path: Path) -> None:
    source = Toy(seed=1)
    _quantize_layer(source.proj)
    tensors = _state(source)
    tensors["proj.weight_scale_inv"] = torch.ones(2, 3)
    target = Toy(seed=2)
    before = _state(target)
    with pytest.raises(CheckpointError, match=r"proj.weight_scale_inv: shape mismatch, expected \[2, 2\]"):
        load_state(target, tensors, fp8_mode="gemm")
    _assert_bit_equal(_state(target), before)


def test_e4m3_weight_without_its_scale_is_rejected() -> None:
    source = Toy(seed=1)
    _quantize_layer(source.out)
    tensors = _state(source)
    del tensors["out.weight_scale_inv"]
    with pytest.raises(CheckpointError, match="out.weight: dtype torch.float8_e4m3fn needs out.weight_scale"):
        load_state(Toy(), tensors)


def test_keep_fp32_names_stay_fp32_and_the_rest_becomes_dtype() -> None:
    model = Toy()
    load_state(model, _state(Toy(seed=1)), dtype=torch.bfloat16)
    assert model.mix_scale.dtype == torch.float32
    assert model.proj.weight.dtype == model.proj.bias.dtype == model.out.weight.dtype == torch.bfloat16
    assert model.positions.dtype == torch.int64
    assert model.scratch.dtype == torch.float32  # not persistent: not in the checkpoint, not touched


def test_model_built_on_meta_device_is_materialised_on_cpu() -> None:
    source = Toy(seed=1)
    with torch.device("meta"):
        model = Toy(device="meta")
    load_state(model, _state(source))
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    _assert_bit_equal(_state(model), _state(source))


def test_float_checkpoint_switches_an_fp8_layer_back_to_float() -> None:
    model = Toy(seed=2)
    _quantize_layer(model.proj)
    source = Toy(seed=1)
    load_state(model, _state(source))
    assert not model.proj.is_fp8 and model.proj.weight_scale_inv is None
    _assert_bit_equal(_state(model), _state(source))


def test_bad_arguments_raise_naming_the_argument(tmp_path: Path) -> None:
    tensors = _state(Toy())
    with pytest.raises(ValueError, match="fp8_mode"):
        load_state(Toy(), tensors, fp8_mode="fast")
    with pytest.raises(TypeError, match="dtype"):
        load_state(Toy(), tensors, dtype=torch.int8)
    with pytest.raises(TypeError, match="tensors"):
        load_state(Toy(), {"proj.weight": [1.0]})
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_state(Toy(), tmp_path, max_shard_bytes=0)


# ------------------------------------------------------------------------------------ bad files


def _saved(tmp_path: Path, **kwargs) -> Path:
    save_state(Toy(), tmp_path, **kwargs)
    return tmp_path


def test_truncated_file_is_a_checkpoint_error_naming_it(tmp_path: Path, no_unpickling) -> None:
    file = _saved(tmp_path) / SINGLE_FILE
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"cannot read safetensors file {file}"):
        read_checkpoint(tmp_path)


def test_garbage_header_is_a_checkpoint_error_naming_the_file(tmp_path: Path, no_unpickling) -> None:
    file = tmp_path / SINGLE_FILE
    file.write_bytes(b"\xff" * 8 + b"not a safetensors header at all" * 4)
    with pytest.raises(CheckpointError, match=f"cannot read safetensors file {file}"):
        read_checkpoint(file)


def test_index_pointing_to_a_missing_shard_is_rejected(tmp_path: Path, no_unpickling) -> None:
    shards = sorted(_saved(tmp_path, max_shard_bytes=10_000).glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name}: shard file does not exist"):
        read_checkpoint(tmp_path)


def test_index_listing_a_tensor_absent_from_its_shard_is_rejected(tmp_path: Path) -> None:
    index = _saved(tmp_path, max_shard_bytes=10_000) / INDEX_FILE
    content = json.loads(index.read_text())
    first_shard = sorted(set(content["weight_map"].values()))[0]
    content["weight_map"]["ghost.weight"] = first_shard
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=f"ghost.weight: not in shard {first_shard}"):
        read_checkpoint(tmp_path)


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path: Path, monkeypatch) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    loads = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    for path in (tmp_path, tmp_path / "pytorch_model.bin"):
        with pytest.raises(CheckpointError, match="pickle checkpoints are refused") as info:
            read_checkpoint(path)
        assert "pytorch_model.bin" in str(info.value)
    assert loads == []


def test_directory_without_checkpoint_and_missing_path_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "absent")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "part-a.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "part-b.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        read_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------ FP8


def _fp8_checkpoint(tmp_path: Path) -> tuple[Toy, dict[str, torch.Tensor]]:
    source = Toy(seed=1)
    _quantize_layer(source.proj)
    save_state(source, tmp_path)
    return source, read_checkpoint(tmp_path)


def test_fp8_checkpoint_dequantize_mode_equals_linear_with_dequantized_weight(tmp_path: Path) -> None:
    from engram_kernels.quant import dequantize_fp8_weight

    source, tensors = _fp8_checkpoint(tmp_path)
    w = dequantize_fp8_weight(tensors["proj.weight"], tensors["proj.weight_scale_inv"])
    model = Toy(seed=2)
    load_state(model, tensors, fp8_mode="dequantize")
    assert not model.proj.is_fp8 and model.proj.weight.dtype == torch.float32
    assert torch.equal(model.proj.weight, w)
    x = torch.randn(4, 256)  # `linear` runs 4 rows as (W @ x^T)^T: same function, other rounding than F.linear
    torch.testing.assert_close(model.proj(x), F.linear(x, w, tensors["proj.bias"]), rtol=1e-6, atol=1e-6)


def test_fp8_checkpoint_gemm_mode_is_within_activation_quantization_error(tmp_path: Path) -> None:
    source, tensors = _fp8_checkpoint(tmp_path)
    dequantized, gemm = Toy(seed=2), Toy(seed=3)
    load_state(dequantized, tensors, fp8_mode="dequantize")
    load_state(gemm, tensors, fp8_mode="gemm")
    assert gemm.proj.is_fp8 and gemm.proj.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(5, 256)
    expected = dequantized.proj(x)
    # The same product with x quantized per token per 128 channels (scale = max(amax, 1e-4) / 448).
    blocks = x.view(5, 2, 128)
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
    x_q = ((blocks / scale).to(torch.float8_e4m3fn).float() * scale).view(5, 256)
    formula = F.linear(x_q, dequantized.proj.weight, dequantized.proj.bias)
    got = gemm.proj(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert (got - formula).norm() / formula.norm() < 1e-3
    assert (got - expected).norm() / expected.norm() < 0.06  # e4m3 activations: ~2-3% error
    assert not torch.equal(got, expected)  # activations really were quantized


def test_tied_weight_cannot_stay_fp8_in_gemm_mode() -> None:
    from engram_kernels.quant import quantize_fp8_weight_ref

    w_q, scale = quantize_fp8_weight_ref(torch.randn(10, 8))
    tensors = {"embed.weight": w_q, "embed.weight_scale_inv": scale}
    with pytest.raises(CheckpointError, match="cannot stay FP8"):
        load_state(TiedToy(), tensors, fp8_mode="gemm")


def test_moving_an_fp8_linear_to_bfloat16_keeps_its_fp8_storage() -> None:
    layer = Linear(256, 136, bias=True)
    _quantize_layer(layer)
    w_q, scale = layer.weight.detach().clone(), layer.weight_scale_inv.detach().clone()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale_inv.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), w_q.view(torch.uint8))
    assert torch.equal(layer.weight_scale_inv, scale)
    assert list(layer.state_dict()) == ["weight", "bias", "weight_scale_inv"]


def test_linear_rejects_bad_fp8_inputs() -> None:
    layer = Linear(256, 136)
    with pytest.raises(TypeError, match="weight_q"):
        layer.to_fp8(torch.zeros(136, 256), torch.ones(2, 2))
    with pytest.raises(ValueError, match="scale_inv"):
        layer.to_fp8(torch.zeros(136, 256).to(torch.float8_e4m3fn), torch.ones(2, 1))
    with pytest.raises(ValueError, match="x"):
        layer(torch.zeros(2, 255))
