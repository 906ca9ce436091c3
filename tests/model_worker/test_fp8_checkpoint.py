"""DeepSeek FP8 checkpoints (e4m3 weights + 128x128 `weight_scale_inv`) through both load paths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engram_kernels.quant import dequantize_fp8_weight_ref, quantize_fp8_weight_ref
from model_worker import load_model
from tests.model_worker.hf_checkpoints import write_hf_checkpoint

QUANTIZED = ("_proj.weight",)  # DeepSeek quantizes attention/MLP/expert projections only


def _quantize_checkpoint(src, dst, scale_fmt=None):
    """Rewrite an fp32 checkpoint in DeepSeek's FP8 format; returns the dequantized tensors."""
    tensors = load_file(str(src / "model.safetensors"))
    out, dequantized = {}, {}
    for name, t in tensors.items():
        if name.endswith(QUANTIZED) and t.dim() == 2:
            q, scale = quantize_fp8_weight_ref(t)
            out[name], out[name + "_scale_inv"] = q, scale
            dequantized[name] = dequantize_fp8_weight_ref(q, scale)
        else:
            out[name] = dequantized[name] = t
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    if scale_fmt is not None:
        config["quantization_config"]["scale_fmt"] = scale_fmt  # as DeepSeek-V3.1's config.json
    (dst / "config.json").write_text(json.dumps(config))
    save_file(out, str(dst / "model.safetensors"))
    return dequantized


def _inputs(vocab):
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, vocab, (3, 24), generator=gen)


# Stated tolerances against the bf16 original (random weights, unit-gain projections): relative RMS logit
# error <= 15% for a dense model; <= 40% with top-1 agreement >= 70% for a small MoE, where FP8 noise
# also flips expert choices. The exactness checks below pin the arithmetic itself.
TOLERANCE = {"dense_bigger": (0.15, 0.75), "moe_grouped": (0.40, 0.70)}


@pytest.mark.parametrize("variant", sorted(TOLERANCE))
def test_fp8_checkpoint_logits_track_the_bf16_original(tmp_path, variant):
    src, hf_model = write_hf_checkpoint(tmp_path, "v3", variant)
    dequantized = _quantize_checkpoint(src, tmp_path / "fp8")
    ids = _inputs(hf_model.config.vocab_size)

    deq = load_model(tmp_path / "fp8", fp8_mode="dequantize")
    gemm = load_model(tmp_path / "fp8", fp8_mode="gemm")
    assert gemm.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    assert deq.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32
    logits_deq, logits_gemm = deq(ids), gemm(ids)

    # Dequantize path == the same math on the dequantized weights, run by transformers.
    from transformers import DeepseekV3ForCausalLM

    (tmp_path / "deq").mkdir()
    (tmp_path / "deq" / "config.json").write_text((src / "config.json").read_text())
    save_file(dequantized, str(tmp_path / "deq" / "model.safetensors"))
    hf_deq = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "deq", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (logits_deq - hf_deq(ids).logits).abs().max().item() <= 1e-4
        original = hf_model.to(torch.bfloat16)(ids).logits.float()

    max_rel_rms, min_top1 = TOLERANCE[variant]
    for logits in (logits_deq, logits_gemm):
        rel_rms = ((logits - original).norm() / original.norm()).item()
        top1 = (logits.argmax(-1) == original.argmax(-1)).float().mean().item()
        assert rel_rms <= max_rel_rms and top1 >= min_top1, (rel_rms, top1)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_gemm_path_quantizes_activations_per_token(tmp_path, scale_fmt):
    """In gemm mode a layer's output equals the block-scaled GEMM of per-token-quantized activations, with the
    activation scales in the checkpoint's `quantization_config.scale_fmt` (fp32 when it names none)."""
    from engram_kernels.gemm import fp8_gemm_ref
    from engram_kernels.quant import quantize_fp8_block_ref

    src, _ = write_hf_checkpoint(tmp_path, "v3", "no_q_lora")
    _quantize_checkpoint(src, tmp_path / "fp8", scale_fmt)
    layer = load_model(tmp_path / "fp8", fp8_mode="gemm").model.layers[1].self_attn.q_proj
    x = torch.randn(5, layer.in_features) * torch.linspace(0.1, 3.0, layer.in_features)
    a_q, a_scale = quantize_fp8_block_ref(x, block=128, scale_fmt=scale_fmt or "fp32")
    expected = fp8_gemm_ref(a_q, a_scale, layer.weight, layer.weight_scale_inv)
    assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)
    other = quantize_fp8_block_ref(x, block=128, scale_fmt="fp32" if scale_fmt else "ue8m0")
    assert not torch.allclose(layer(x), fp8_gemm_ref(*other, layer.weight, layer.weight_scale_inv), atol=1e-5)


def test_an_unknown_scale_format_is_a_config_error(tmp_path):
    from model_worker import ConfigError

    src, _ = write_hf_checkpoint(tmp_path, "v3", "no_q_lora")
    _quantize_checkpoint(src, tmp_path / "fp8", "e5m2")
    with pytest.raises(ConfigError, match="scale_fmt"):
        load_model(tmp_path / "fp8", fp8_mode="gemm")


def test_absorbed_kv_b_of_an_fp8_layer_is_the_dequantized_weight_computed_once(tmp_path):
    src, _ = write_hf_checkpoint(tmp_path, "v3", "moe_grouped")
    _quantize_checkpoint(src, tmp_path / "fp8")
    gemm = load_model(tmp_path / "fp8", fp8_mode="gemm").model.layers[0].self_attn
    deq = load_model(tmp_path / "fp8", fp8_mode="dequantize").model.layers[0].self_attn
    for got, want in zip(gemm.kv_b_weights(), deq.kv_b_weights()):
        assert torch.equal(got, want)
    assert gemm.kv_b_weights()[0].data_ptr() == gemm.kv_b_weights()[0].data_ptr()  # cached, not redone per step
