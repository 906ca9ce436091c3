"""Read, validate, load and save model weights in safetensors checkpoints.

`read_checkpoint` reads a single file, a directory with `model.safetensors`, or a sharded directory
with `model.safetensors.index.json`, and refuses pickle checkpoints without ever unpickling them.
`load_state` maps checkpoint names 1:1 onto `model.state_dict()` names (our modules use Hugging Face
names), checks everything before changing anything, and turns DeepSeek FP8 weights
(`X.weight` e4m3 + `X.weight_scale_inv`) into float weights or FP8 `Linear` layers.
`save_state` writes the inverse. This module does not build models, rename tensors between naming
schemes, or quantize float weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from model_worker.errors import CheckpointError
from model_worker.layers.linear import FP8_WEIGHT_DTYPE, Linear, is_plain_float, weight_scale_shape

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
FP8_MODES = ("dequantize", "gemm")
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ----------------------------------------------------------------------------------------------- read


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (file, directory, or sharded directory), on CPU."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint path does not exist: {root}")
    if root.is_file():
        if root.suffix in PICKLE_SUFFIXES:
            raise _pickle_refused([root.name])
        if root.name.endswith(".index.json"):
            return _read_sharded(root)
        if root.suffix == ".safetensors":
            return _read_safetensors(root)
        raise CheckpointError(f"not a safetensors checkpoint (expected *.safetensors): {root}")
    index, single = root / INDEX_FILE, root / SINGLE_FILE
    if index.is_file() and single.is_file():
        raise CheckpointError(f"ambiguous checkpoint in {root}: both {SINGLE_FILE} and {INDEX_FILE}")
    if index.is_file():
        return _read_sharded(index)
    if single.is_file():
        return _read_safetensors(single)
    found = sorted(p.name for p in root.iterdir() if p.is_file())
    safetensors_files = [name for name in found if name.endswith(".safetensors")]
    if len(safetensors_files) == 1:
        return _read_safetensors(root / safetensors_files[0])
    if safetensors_files:
        raise CheckpointError(
            f"several safetensors files in {root} but no {INDEX_FILE} to say which tensor is where",
            safetensors_files,
        )
    pickles = [name for name in found if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise _pickle_refused(pickles)
    raise CheckpointError(f"no safetensors checkpoint in {root}")


def _pickle_refused(names: list[str]) -> CheckpointError:
    return CheckpointError(
        "pickle checkpoints are refused (never unpickled: loading one can run arbitrary code); "
        "convert them to safetensors",
        names,
    )


def _read_safetensors(file: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors `names` (all when None) of one safetensors file; missing names are simply absent."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            present = set(reader.keys())
            wanted = sorted(present) if names is None else [n for n in names if n in present]
            return {name: reader.get_tensor(name) for name in wanted}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read safetensors file {file} (truncated or corrupt?): {exc}") from exc


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    """Tensors listed in a `model.safetensors.index.json` weight_map, each from its shard."""
    weight_map = _read_weight_map(index)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    problems = [f"{shard}: not a plain file name" for shard in by_shard if Path(shard).name != shard]
    problems += [
        f"{shard}: shard file does not exist"
        for shard in by_shard
        if Path(shard).name == shard and not (index.parent / shard).is_file()
    ]
    if problems:
        raise CheckpointError(f"{index} refers to shards that cannot be read", problems)
    tensors: dict[str, torch.Tensor] = {}
    for shard, names in sorted(by_shard.items()):
        found = _read_safetensors(index.parent / shard, names)
        problems += [f"{name}: not in shard {shard}" for name in names if name not in found]
        tensors.update(found)
    if problems:
        raise CheckpointError(f"{index} lists tensors that are not in their shards", problems)
    return tensors


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read index file {index}: {exc}") from exc
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"index file {index} has no 'weight_map' object of tensor name -> shard file")
    return weight_map


# ----------------------------------------------------------------------------------------------- load


@dataclass
class _Update:
    """One planned change: `target` (a model tensor) becomes `make()`; `layer` set for Linear weights."""

    target: torch.Tensor
    make: Callable[[], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    layer: Linear | None = None  # the Linear whose weight this is
    fp8: bool = False  # make() returns (e4m3 weight, fp32 scales) for layer.to_fp8


def load_state(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    fp8_mode: str = "dequantize",
    dtype: torch.dtype = torch.float32,
    ignore: Callable[[str], bool] | None = None,
    activation_scale_fmt: str = "fp32",
) -> None:
    """Load checkpoint `tensors` into `model`, all or nothing.

    Float tensors become `dtype` (fp32 for names in `model.keep_fp32_names()`), on the device of the
    model tensor they replace (CPU for meta tensors). `X.weight` e4m3 + `X.weight_scale_inv`:
    fp8_mode "dequantize" -> a float weight; "gemm" -> the `Linear` at X keeps e4m3 + scales and quantizes
    its activations with `activation_scale_fmt` scales (the checkpoint's `quantization_config.scale_fmt`);
    other modules are dequantized. Tied parameters are filled from whichever alias the checkpoint has.
    Raises CheckpointError listing every missing, unexpected (unless `ignore(name)`), mis-shaped or
    mis-typed tensor before anything in the model changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    bad = [
        name for name, t in tensors.items() if not isinstance(name, str) or not isinstance(t, torch.Tensor)
    ]
    if bad:
        raise TypeError(f"tensors must map str -> torch.Tensor; bad entries: {bad[:10]}")
    if fp8_mode not in FP8_MODES:
        raise ValueError(f"fp8_mode must be one of {FP8_MODES}, got {fp8_mode!r}")
    if not isinstance(dtype, torch.dtype) or not is_plain_float(dtype):
        raise TypeError(f"dtype must be a float dtype such as torch.bfloat16, got {dtype!r}")
    if ignore is not None and not callable(ignore):
        raise TypeError("ignore must be a callable name -> bool or None")

    keep_fp32 = set(model.keep_fp32_names()) if hasattr(model, "keep_fp32_names") else set()
    planner = _Planner(model, tensors, fp8_mode, dtype, keep_fp32)
    updates = planner.plan()
    planner.problems += [
        f"{name}: unexpected (the model has no such tensor)"
        for name in tensors
        if name not in planner.used and not (ignore is not None and ignore(name))
    ]
    if planner.problems:
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}; nothing was loaded", planner.problems
        )
    made = [(update, update.make()) for update in updates]  # may fail (memory): model still untouched
    owners = _owners(model)
    for update, value in made:
        if update.fp8:
            update.layer.to_fp8(*value, activation_scale_fmt)
        elif update.layer is not None and update.layer.is_fp8:
            update.layer.to_float(value)  # back to float storage (a float layer goes through _replace)
        else:
            _replace(owners[id(update.target)], update.target, value)


class _Planner:
    """Validates a checkpoint against a model and plans the updates (changes nothing)."""

    def __init__(
        self,
        model: nn.Module,
        tensors: Mapping[str, torch.Tensor],
        fp8_mode: str,
        dtype: torch.dtype,
        keep_fp32: set[str],
    ) -> None:
        self.tensors, self.fp8_mode, self.dtype, self.keep_fp32 = tensors, fp8_mode, dtype, keep_fp32
        self.linears = {
            f"{prefix}.weight" if prefix else "weight": m
            for prefix, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, Linear)
        }
        state = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
        # An FP8 Linear's scales are optional: the checkpoint decides the layer's storage mode.
        fp8_scales = {w + SCALE_SUFFIX for w, layer in self.linears.items() if layer.is_fp8}
        self.aliases: dict[int, list[str]] = {}  # id(model tensor) -> its names (tied weights share one)
        self.targets: dict[int, torch.Tensor] = {}
        for name, value in state.items():
            if name not in fp8_scales:
                self.aliases.setdefault(id(value), []).append(name)
                self.targets[id(value)] = value
        self.used: set[str] = set()
        self.problems: list[str] = []

    def plan(self) -> list[_Update]:
        updates = []
        for key, names in self.aliases.items():
            present = [name for name in names if name in self.tensors]
            self.used.update(present)
            if not present:
                tied = f" (nor its tied aliases {names[1:]})" if len(names) > 1 else ""
                self.problems.append(f"{names[0]}: missing{tied}")
                continue
            update = self._plan_one(present[0], names, self.targets[key])
            if update is not None:
                updates.append(update)
        return updates

    def _plan_one(self, name: str, names: list[str], target: torch.Tensor) -> _Update | None:
        source = self.tensors[name]
        layer = next((self.linears[n] for n in names if n in self.linears), None)
        out_dtype = torch.float32 if any(n in self.keep_fp32 for n in names) else self.dtype
        device = source.device if target.is_meta else target.device
        scale_name = name + SCALE_SUFFIX
        self.used.add(scale_name)  # reported with its weight, not as unexpected
        if source.shape != target.shape:
            self.problems.append(
                f"{name}: shape mismatch, expected {list(target.shape)}, got {list(source.shape)}"
            )
            return None
        if scale_name in self.tensors:
            return self._plan_fp8(name, names, target, self.tensors[scale_name], layer, out_dtype, device)
        if layer is not None or is_plain_float(target.dtype):  # an FP8 Linear's weight is float at heart
            if not is_plain_float(source.dtype):
                self.problems.append(
                    f"{name}: dtype {source.dtype} needs {scale_name} (or a float dtype), and it is absent"
                )
                return None
            return _Update(target, lambda: source.to(device=device, dtype=out_dtype), layer)
        if source.dtype != target.dtype:
            self.problems.append(f"{name}: dtype mismatch, expected {target.dtype}, got {source.dtype}")
            return None
        return _Update(target, lambda: source.to(device=device))

    def _plan_fp8(
        self,
        name: str,
        names: list[str],
        target: torch.Tensor,
        scale: torch.Tensor,
        layer: Linear | None,
        out_dtype: torch.dtype,
        device: torch.device,
    ) -> _Update | None:
        weight, scale_name = self.tensors[name], name + SCALE_SUFFIX
        problems = []
        if weight.dtype != FP8_WEIGHT_DTYPE:
            problems.append(f"{name}: has {scale_name} so must be {FP8_WEIGHT_DTYPE}, got {weight.dtype}")
        if weight.dim() != 2:
            problems.append(f"{name}: FP8 block-scaled weights must be 2-D, got shape {list(weight.shape)}")
        elif tuple(scale.shape) != weight_scale_shape(*weight.shape):
            problems.append(
                f"{scale_name}: shape mismatch, expected {list(weight_scale_shape(*weight.shape))}, "
                f"got {list(scale.shape)}"
            )
        if not scale.dtype.is_floating_point:
            problems.append(f"{scale_name}: must be a float tensor, got {scale.dtype}")
        if problems:
            self.problems += problems
            return None
        if self.fp8_mode == "gemm" and layer is not None:
            if len(names) > 1:
                self.problems.append(f"{name}: tied to {names[1:]}, so it cannot stay FP8; use dequantize")
                return None
            return _Update(
                target,
                lambda: (weight.to(device=device), scale.to(device=device, dtype=torch.float32)),
                layer,
                fp8=True,
            )

        def dequantize() -> torch.Tensor:
            from engram_kernels.quant import dequantize_fp8_weight

            return dequantize_fp8_weight(
                weight.to(device=device), scale.to(device=device, dtype=torch.float32), dtype=out_dtype
            )

        return _Update(target, dequantize, layer)


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """id(tensor) -> every (module, attribute, is_parameter) slot that holds it."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for module in model.modules():
        for slots, is_param in ((module._parameters, True), (module._buffers, False)):
            for attr, value in slots.items():
                if value is not None:
                    owners.setdefault(id(value), []).append((module, attr, is_param))
    return owners


def _replace(slots: list[tuple[nn.Module, str, bool]], old: torch.Tensor, new: torch.Tensor) -> None:
    """Put `new` in every slot that held `old` (one new Parameter shared by all, so ties survive)."""
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(new, requires_grad=old.requires_grad and new.is_floating_point())
    for module, attr, is_param in slots:
        (module._parameters if is_param else module._buffers)[attr] = new


# ----------------------------------------------------------------------------------------------- save


def save_state(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 2 * 1024**3,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write `model.state_dict()` (+ `extra_tensors`) as safetensors into the directory `path`.

    One `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
    `max_shard_bytes` (a larger tensor gets a shard of its own) plus `model.safetensors.index.json`.
    FP8 `Linear`s are written as e4m3 `weight` + fp32 `weight_scale_inv`. Tensors sharing storage
    (tied weights) are cloned. Checkpoint files of ours left from an earlier save are removed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"path must be a directory (it is created if absent), got the file {directory}")
    tensors = _tensors_to_save(model, extra_tensors)
    shards = _split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        files = {SINGLE_FILE: shards[0]}
    else:
        files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    directory.mkdir(parents=True, exist_ok=True)
    for file, names in files.items():
        _write_atomically(
            directory / file,
            lambda tmp, names=names: save_file(
                {n: tensors[n] for n in names}, str(tmp), metadata={"format": "pt"}
            ),
        )
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
            "weight_map": {name: file for file, names in files.items() for name in names},
        }
        _write_atomically(directory / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    for stale in directory.iterdir():
        ours = stale.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(stale.name)
        if ours and stale.name not in files and not (stale.name == INDEX_FILE and len(files) > 1):
            stale.unlink()


def _tensors_to_save(model: nn.Module, extra: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """name -> contiguous CPU tensor owning its storage (safetensors refuses shared storage)."""
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra_tensors must be a mapping of name -> tensor, got {type(extra).__name__}")
        clash = sorted(set(extra) & set(state))
        if clash:
            raise ValueError(f"extra_tensors names clash with model tensors: {clash}")
        bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"extra_tensors must map str -> torch.Tensor; bad entries: {bad[:10]}")
        state.update(extra)
    meta = [name for name, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save tensors on the meta device (never loaded): {meta[:10]}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != _nbytes(t):
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _split_into_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names whose tensors add up to at most max_bytes (one oversized alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(t)
    return shards


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)
