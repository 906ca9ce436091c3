"""Preparing a loaded model's weights for this host's kernels: memory order, fusions and packed copies.

`arrange_weights` is what `CausalLM.arrange_weights` (called by the loader and by `cast`) runs; the model's
values and `state_dict()` never change, only how the weights are laid out and which copies exist.
"""

from __future__ import annotations

import torch

from model_worker.execution import packed_gemm, panel_packs
from model_worker.execution.cpu_gemm import cpu_gemm_preferences
from model_worker.execution.fused import StackedWeight, fusions_of
from model_worker.execution.layout import arranged
from model_worker.layers.linear import Linear
from model_worker.model import CausalLM


def arrange_weights(model: CausalLM, input_major: bool = True, pack: bool = True) -> CausalLM:
    """Prepare every weight that decode runs as a GEMM for this host's kernels, building the weight
    fusions: store it in the memory order torch's kernels read fastest (`execution.layout`: input-major for
    fp32 on CPU where out >= in), and, if `pack`, keep a copy of it in the layout of the kernel this host
    measured fastest (`execution.cpu_gemm`): panel-packed for our C panel kernel (`execution.panel_packs`; an
    expert stack packed whole), else oneDNN-packed (`execution.packed_gemm`); pack=False releases the
    copies. Values and `state_dict()` do not change; packing doubles the packed
    weights' memory. input_major=False stores them all output-major (nn.Linear's order; benchmarks
    compare the two). load_model and cast call this; call it again after moving or replacing weights
    by other means (it copies only weights not already in their order)."""
    for module in model.modules():
        for fusion in fusions_of(module).values():
            fusion.input_major = input_major
            fusion.get()
    with torch.inference_mode(False), torch.no_grad():
        for name, weight in _unfused_gemm_weights(model):
            if name == "lm_head" and model.config.tie_word_embeddings:
                continue  # a tied head is the embedding table, gathered by row: keep its order
            weight.data = arranged(weight.data) if input_major else weight.data.contiguous()
    # The host's CPU measurement is only worth taking for a model on the CPU (packs are CPU-only).
    on_cpu = pack and model.lm_head.weight.device.type == "cpu"
    prefs = cpu_gemm_preferences() if on_cpu else None
    panels = on_cpu and prefs.panel_weights
    stacked = set()
    for module in model.modules():
        for fusion in fusions_of(module).values():
            if isinstance(fusion, StackedWeight) and fusion.get() is not None:
                views = fusion.per_group()[0]
                if panels and panel_packs.pack_stack(fusion.get(), views):
                    stacked.update(id(view) for view in views)
                else:
                    panel_packs.unpack(fusion.get())
    for _, weight in decode_gemm_weights(model):
        if panels and (id(weight) in stacked or panel_packs.pack(weight)):
            packed_gemm.unpack(weight)  # the panel kernel takes it: no oneDNN copy as well
            continue
        panel_packs.unpack(weight)
        if on_cpu and prefs.pack_weights:
            packed_gemm.pack(weight)
        else:
            packed_gemm.unpack(weight)
    return model


def decode_gemm_weights(model: CausalLM) -> list[tuple[str, torch.Tensor]]:
    """(name, weight [out, in]) of every float product a decode step runs as a GEMM, as `linear` gets it:
    each built fusion's per-group views (`<module>.<fusion>[g]`: g is the expert of a MoE stack), then
    the Linears outside fusions and the LM head (`_unfused_gemm_weights`)."""
    weights = []
    for name, module in model.named_modules():
        for attr, fusion in fusions_of(module).items():
            if fusion.get() is not None:
                weights += [(f"{name}.{attr}[{g}]", view) for g, view in enumerate(fusion.per_group()[0])]
    return weights + _unfused_gemm_weights(model)


def _unfused_gemm_weights(model: CausalLM) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of float Linears no fusion holds, but kv_b (the absorbed attention reads it per head,
    `MLA.kv_b_weights`), and of the LM head; call after building the fusions."""
    fused = {id(member) for module in model.modules() for fusion in fusions_of(module).values()
             if fusion.get() is not None for member in fusion.members}
    weights = [(name, module.weight) for name, module in model.named_modules()
               if isinstance(module, Linear) and id(module) not in fused and not name.endswith("kv_b_proj")]
    return [(name, w) for name, w in [*weights, ("lm_head", model.lm_head.weight)]
            if not w.is_meta and w.is_floating_point() and w.dtype.itemsize > 1]
