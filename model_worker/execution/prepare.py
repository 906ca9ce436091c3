"""Preparing a loaded model for this host's kernels: the weight fusions, each layer's method and the copies
its kernel reads.

`arrange_weights` is what `CausalLM.arrange_weights` (called by the loader and by `cast`) runs: it builds the
fusions, gives every Linear, fusion, MoE block and the LM head its method (`execution.linear_methods`,
`execution.experts`, by `execution.policy`'s fixed rule) and lets the method prepare its weight once (the
panel kernel's packed copy). The model's values and `state_dict()` never change.
"""

from __future__ import annotations

import torch

from model_worker.execution.experts import TORCH_EXPERTS, experts_method_for
from model_worker.execution.fused import ConcatenatedWeight, fusions_of
from model_worker.execution.linear_methods import FP8_BLOCK, REFERENCE, method_for
from model_worker.layers.linear import Linear
from model_worker.layers.moe import MoE
from model_worker.model import CausalLM


def arrange_weights(model: CausalLM, pack: bool = True) -> CausalLM:
    """Choose and prepare every layer's method for this host. pack=False gives every float layer the
    reference method and releases the prepared copies (they double the packed weights' memory). Call it
    again after moving, casting or replacing weights by other means (an in-place update is noticed: the
    copy is remade on next use, `execution.weight_copies`)."""
    for module in model.modules():
        for fusion in fusions_of(module).values():
            fusion.get()
    release_weights(model)
    choose = method_for if pack else (lambda weight: REFERENCE)
    fused = _fused_members(model)
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            if module.is_fp8:
                module.method = FP8_BLOCK
            elif id(module) in fused or name.endswith("kv_b_proj") or module.weight.is_meta:
                module.method = REFERENCE  # runs only when its fusion cannot; kv_b is read per head (MLA)
            else:
                module.method = _prepared(choose(module.weight), module.weight)
        elif isinstance(module, MoE):
            module.experts_method = experts_method_for(module) if pack else TORCH_EXPERTS
            module.experts_method.prepare(module)
        for fusion in fusions_of(module).values():
            if isinstance(fusion, ConcatenatedWeight) and fusion.weight is not None:
                fusion.method = _prepared(choose(fusion.weight), fusion.weight)
    head = model.lm_head.weight
    model.head_method = REFERENCE if head.is_meta else _prepared(choose(head), head)
    return model


def _fused_members(model: CausalLM) -> set[int]:
    """ids of the Linears that are members of a built fusion (they run as part of it)."""
    return {id(member) for module in model.modules() for fusion in fusions_of(module).values()
            if fusion.get() is not None for member in fusion.members}


def _prepared(method, weight: torch.Tensor):
    method.prepare(weight)
    return method


def release_weights(model: CausalLM) -> None:
    """Drop every prepared copy of the model's weights (`arrange_weights` remakes what it needs)."""
    for module in model.modules():
        if isinstance(module, Linear) and not module.is_fp8:
            module.method.release(module.weight)
        elif isinstance(module, MoE):
            module.experts_method.release(module)
        for fusion in fusions_of(module).values():
            if isinstance(fusion, ConcatenatedWeight) and fusion.weight is not None:
                fusion.method.release(fusion.weight)
    model.head_method.release(model.lm_head.weight)


def layer_methods(model: CausalLM) -> dict[str, str]:
    """{layer name: its method's name} for every product that runs: each Linear outside a built fusion, each
    fusion, MoE block and the LM head (a fused Linear's own method runs only if its fusion cannot be built)."""
    methods = {}
    fused = _fused_members(model)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and id(module) not in fused:
            methods[name] = module.method.name
        elif isinstance(module, MoE):
            methods[f"{name}.experts"] = module.experts_method.name
        for attr, fusion in fusions_of(module).items():
            if isinstance(fusion, ConcatenatedWeight) and fusion.weight is not None:
                methods[f"{name}.{attr}"] = fusion.method.name
    methods["lm_head"] = model.head_method.name
    return methods


def decode_gemm_weights(model: CausalLM) -> list[tuple[str, torch.Tensor]]:
    """(name, weight [out, in]) of every float product a decode step runs as a GEMM: each built fusion's
    per-group views (`<module>.<fusion>[g]`: g is the expert of a MoE stack), then the Linears outside
    fusions but kv_b (the absorbed attention reads it per head), and the LM head."""
    weights = []
    for name, module in model.named_modules():
        for attr, fusion in fusions_of(module).items():
            if fusion.get() is not None:
                weights += [(f"{name}.{attr}[{g}]", view) for g, view in enumerate(fusion.per_group()[0])]
    fused = _fused_members(model)
    weights += [(name, module.weight) for name, module in model.named_modules()
                if isinstance(module, Linear) and id(module) not in fused and not name.endswith("kv_b_proj")]
    weights.append(("lm_head", model.lm_head.weight))
    return [(name, w) for name, w in weights if not w.is_meta and w.is_floating_point() and w.dtype.itemsize > 1]
