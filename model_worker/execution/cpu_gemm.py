"""How this host's CPU GEMM likes its operands, measured once per host.

torch's fp32 CPU GEMM (MKL) runs the same product at very different speeds depending on the operand
order and the weight's memory order, and which is fastest differs between CPUs. On the AMD EPYC (AVX2)
host of benchmarks/weight_layout.py, for decode-sized batches:

- one row `x @ W^T` reads a wide weight (out >= in) 1.1-1.6x faster stored input-major ([in, out]
  memory, `execution.layout`) than output-major;
- 4 and 16 rows run 2.3-3.5x and 1.15-1.6x faster as `(W @ x^T)^T` (the weight as the tall left
  operand) than as `x @ W^T` for an output-major weight; for an input-major weight from about 16 rows for
  the LM head (below that this form is several times slower).

A third choice replaces the kernel: oneDNN with prepacked weights (`execution.packed_gemm`), up to 1.9x faster
than the best of the forms on the AMD EPYC (Zen 4) host of benchmarks/weight_layout.py (16 rows; slower for
some small weights at 1 or 4 rows), at the cost of a second copy of each packed weight. A fourth is our own
C kernel for a few rows (`engram_kernels.cpu_decode.decode_gemm`, built on this machine), which reads small
output-major weights closer to the memory bandwidth than either library at 1 row; where it wins, wide
weights stay output-major (it reads that order), so `input_major_one_row` is then False.

Rather than assume those hold elsewhere, `cpu_gemm_preferences()` times each choice on a V3-sized
weight the first time it is asked (a fraction of a second) and enables it only where it wins here; where
the winner depends on the shape (the wide form for input-major weights, packed weights), `choice_wins`
decides per shape and row count on the first such product.
`set_cpu_gemm_preferences` pins a choice (tests pin one so they do not depend on the host's timing).
Measured answers are kept per host on disk (`host_choices`): the first process measures, every later one
on the host reads the same answers, so all of them run the same kernels and compute the same logits.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_worker.execution import host_choices

_MARGIN = 1.1  # a choice must be this much faster than torch's default to be taken


@dataclass(frozen=True)
class CpuGemmPreferences:
    """input_major_one_row: store wide fp32 weights input-major (`execution.layout`).
    wide_min_rows_*: fewest rows run as (W @ x^T)^T for an output-/input-major weight; None disables it.
    pack_weights: keep oneDNN-packed copies of decode weights (`execution.packed_gemm`) and use them.
    native_max_rows: most rows run through the C decode kernel (`engram_kernels.cpu_decode`); 0 disables it.
    panel_weights: keep panel-packed copies of fp32 weights for our C panel kernel (`execution.panel_packs`)
    instead of oneDNN-packed ones, and run every fp32 product of them through it."""

    input_major_one_row: bool
    wide_min_rows_output_major: int | None
    wide_min_rows_input_major: int | None
    tune_input_major_wide: bool = True  # confirm the wide form per weight shape and row count (wide_wins)
    pack_weights: bool = False
    tune_packed: bool = True  # confirm the packed kernel per weight shape, dtype and row count (choice_wins)
    native_max_rows: int = 0
    tune_native: bool = True  # confirm the C kernel per weight shape and row count (choice_wins)
    panel_weights: bool = False


_pinned: CpuGemmPreferences | None = None
_measured: CpuGemmPreferences | None = None
_choices: dict[tuple, bool] = {}  # (choice, shape..., row bucket) -> the candidate won (choice_wins)


def wide_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, in], weight [out, in] -> (W @ x^T) [out, M]: the product with the weight as the tall left operand."""
    return torch.mm(weight, x.t())


def set_cpu_gemm_preferences(preferences: CpuGemmPreferences | None) -> None:
    """Use these preferences instead of measuring (None: measure everything again on next use)."""
    global _pinned, _measured
    _pinned, _measured = preferences, None
    if preferences is None:
        _choices.clear()


TORCH_DEFAULTS = CpuGemmPreferences(input_major_one_row=False, wide_min_rows_output_major=None,
                                    wide_min_rows_input_major=None, tune_input_major_wide=False)


CPU_GEMM_ENV = "ENGRAM_CPU_GEMM"
CPU_GEMM_MODES = ("measure", "torch", "packed")


def cpu_gemm_preferences() -> CpuGemmPreferences:
    """The pinned preferences, else this host's, measured on first use. The environment variable
    ENGRAM_CPU_GEMM overrides the measurement for deployments that want a fixed kernel choice: "torch"
    (torch's defaults: no layout change, no product forms, no packing), "packed" (the measured layout and
    forms, and packed weights for every shape without timing them), or "measure" (the default)."""
    global _measured
    if _pinned is not None:
        return _pinned
    if _measured is None:
        mode = os.environ.get(CPU_GEMM_ENV, "measure").strip().lower() or "measure"
        if mode not in CPU_GEMM_MODES:
            raise ValueError(f"{CPU_GEMM_ENV}={mode!r}: expected one of {', '.join(CPU_GEMM_MODES)}")
        if mode == "torch":
            _measured = TORCH_DEFAULTS
        else:
            recorded = host_choices.recorded_or_measured(
                "preferences", lambda: dataclasses.asdict(measure_cpu_gemm_preferences()))
            _measured = CpuGemmPreferences(**recorded)
            if mode == "packed":
                _measured = dataclasses.replace(_measured, pack_weights=True, tune_packed=False)
    return _measured


def measure_cpu_gemm_preferences(rounds: int = 5) -> CpuGemmPreferences:
    """Time each choice against torch's default, alternating the two over `rounds` rounds: the weight order
    at 1 row, the wide form at 4 rows, and packed weights at 1, 4 and 16 rows against the better of the
    others, on a [4096, 768] fp32 weight (three copies, about 38 MB, so reads come from memory as a decode
    step's do); then the C decode kernel at 1 row against each library kernel this host would use, on an
    expert-sized weight (`_native_wins_one_row`). Packing is taken if it wins at any of the three (it
    decides the engine's speed most, so it gets the most evidence: in weight_layout.py it ties at 1 row and
    wins by 1.3x and 1.9x at 4 and 16). The wide form for input-major weights, packed weights and the C
    kernel are then confirmed per shape and row count (`choice_wins`)."""
    from engram_kernels.cpu_decode import decode_gemm_available
    from model_worker.execution import packed_gemm

    gen = torch.Generator().manual_seed(0)
    output_major = [torch.randn(4096, 768, generator=gen) for _ in range(3)]
    input_major = [w.t().contiguous().t() for w in output_major]
    one, four, sixteen = torch.randn(1, 768), torch.randn(4, 768), torch.randn(16, 768)

    one_row = _faster(F.linear, output_major, F.linear, input_major, one, rounds)
    wide_out = _faster(F.linear, output_major, wide_product, output_major, four, rounds)
    pack = False
    if packed_gemm.packable(output_major[0]):
        packs = [packed_gemm.pack_copy(w) for w in output_major]
        best_one = (F.linear, input_major if one_row else output_major)
        best_wide = (wide_product, output_major) if wide_out else (F.linear, output_major)
        pack = any(_faster(*best, packed_gemm.packed_linear, packs, x, rounds)
                   for best, x in ((best_wide, sixteen), (best_wide, four), (best_one, one)))
    native = decode_gemm_available() and _native_wins_one_row(one_row, pack, rounds)
    panels = decode_gemm_available() and _panels_win(native, one_row, pack, wide_out, rounds)
    return CpuGemmPreferences(input_major_one_row=one_row and not (native or panels),
                              wide_min_rows_output_major=2 if wide_out else None, wide_min_rows_input_major=16,
                              pack_weights=pack, native_max_rows=NATIVE_MAX_ROWS if native else 0,
                              panel_weights=panels)


def _expert_sized_weights(count: int = 16) -> list[torch.Tensor]:
    """count [768, 768] fp32 weights (16: about 38 MB, read mostly from memory, as a decode step reads its
    experts)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(768, 768, generator=gen) for _ in range(count)]


def _torch_one_row(weights: list[torch.Tensor], input_major: bool) -> tuple[Callable, list[torch.Tensor]]:
    """torch's one-row product with the weights in the order this host measured faster for it."""
    return F.linear, [w.t().contiguous().t() for w in weights] if input_major else weights


def _native_wins_one_row(input_major_one_row: bool, pack: bool, rounds: int) -> bool:
    """Whether the C decode kernel beats every library kernel this host would use at one row on expert-sized
    weights (`_expert_sized_weights`): the small weights are where it gains most (the large ones are then
    confirmed per shape)."""
    from engram_kernels.cpu_decode import decode_gemm
    from model_worker.execution import packed_gemm

    weights = _expert_sized_weights()
    one = torch.randn(1, 768)
    rivals = [_torch_one_row(weights, input_major_one_row)]
    if pack:
        rivals.append((packed_gemm.packed_linear, [packed_gemm.pack_copy(w) for w in weights]))
    return all(_faster(*rival, decode_gemm, weights, one, rounds) for rival in rivals)


def _panels_win(native: bool, input_major_one_row: bool, pack: bool, wide: bool, rounds: int) -> bool:
    """Whether our C panel kernel (`engram_kernels.cpu_decode.panel_gemm`) is kept: unless, on 32 expert-sized
    weights (75 MB, beyond the caches), the kernel this host would use otherwise beats it by _MARGIN at 1 row
    (our dot-product kernel where it won, else torch's in the measured order) or at 16 rows (oneDNN's packed
    one, else torch's in the measured form). The burden of proof is on the rivals: the panel kernel read
    faster than all of them at every row count on both hosts of benchmarks/decode.py and weight_layout.py,
    its copies replace the oneDNN ones (no extra memory), and a close call decided by this host's noise
    would flip the whole process's kernels from run to run."""
    from engram_kernels.cpu_decode import decode_gemm, panel_gemm, panel_pack
    from model_worker.execution import packed_gemm

    weights = _expert_sized_weights(32)
    panels = [panel_pack(w) for w in weights]
    one, sixteen = torch.randn(1, 768), torch.randn(16, 768)

    def panel(x, packed):
        return panel_gemm(x, packed, 768)

    if pack:
        sixteen_rival = (packed_gemm.packed_linear, [packed_gemm.pack_copy(w) for w in weights])
    else:
        sixteen_rival = (wide_product if wide else F.linear, weights)
    one_rival = (decode_gemm, weights) if native else _torch_one_row(weights, input_major_one_row)
    return not any(_faster(panel, panels, *rival, x, rounds) for rival, x in ((sixteen_rival, sixteen),
                                                                             (one_rival, one)))


NATIVE_MAX_ROWS = 8  # beyond this oneDNN's packed GEMM is faster on the benchmark host (weight_layout.py)


def row_bucket(rows: int) -> int:
    """rows rounded down to a power of two: measured choices are kept per bucket."""
    return 1 << (rows.bit_length() - 1)


def choice_wins(key: tuple, contenders: Callable[[], tuple[Callable[[], object], Callable[[], object]]]) -> bool:
    """Whether the candidate beats the default by _MARGIN, timed the first time `key` is asked and remembered
    (key names the choice and the operand shapes, e.g. ("packed", out, in, dtype, row bucket)).
    contenders() -> (default, candidate), zero-argument calls; it is only called to measure, so the hot path
    is one dict lookup."""
    won = _choices.get(key)
    if won is None:
        def measure() -> bool:
            default, candidate = contenders()
            return _faster(lambda _x, _w: default(), [None], lambda _x, _w: candidate(), [None], None, rounds=5)

        won = _choices[key] = bool(host_choices.recorded_or_measured(repr(key), measure))
    return won


def wide_wins(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """For an input-major weight [out, in] and x [..., in] holding `rows` rows: whether (W @ x^T)^T beats
    F.linear for this shape and row count (rounded down to a power of two), timed on these operands the
    first time and remembered. For these weights the winner depends on the shape: on the benchmark host the form is
    1.35x faster for a [32000, 768] LM head at 16 rows (benchmarks/weight_layout.py) and slower for
    [16384, 768] (an ad-hoc check)."""
    def contenders():
        x2d = x.reshape(rows, x.shape[-1])
        return lambda: F.linear(x2d, weight), lambda: wide_product(x2d, weight)

    return choice_wins(("wide", weight.shape[0], weight.shape[1], row_bucket(rows)), contenders)


def _faster(default: Callable, default_weights: list, candidate: Callable, candidate_weights: list,
            x: torch.Tensor | None, rounds: int, margin: float = _MARGIN) -> bool:
    """Whether candidate(x, w) beats default(x, w) by margin in median time per call."""
    samples: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        default(x, default_weights[0]), candidate(x, candidate_weights[0])  # warm-up
        for _ in range(rounds):
            for times, fn, weights in ((samples[0], default, default_weights),
                                       (samples[1], candidate, candidate_weights)):
                start = time.perf_counter()
                for w in weights:
                    fn(x, w)
                times.append(time.perf_counter() - start)
    return statistics.median(samples[1]) * margin < statistics.median(samples[0])
