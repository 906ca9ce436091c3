"""Prefill throughput: our model vs transformers' DeepseekV3ForCausalLM on the same weights and inputs.

Builds a DeepSeek-V3-shaped config of about 100M parameters (MLA with q/kv LoRA, MoE with grouped
routing and a shared expert, first layer dense), saves random weights with transformers'
`save_pretrained`, loads them through our `load_model`, and times a batched forward pass of both in
fp32 and bf16 on the same inputs. Prints tokens/s, the ratio, and the logit difference (a sanity
check that both computed the same thing).

    python benchmarks/prefill.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, median_time, save_hf_v3  # noqa: E402


def _rel_rms(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits.float() - reference).norm() / reference.norm()).item()


def _compare(ours, theirs, ids: torch.Tensor, repeats: int, reference: torch.Tensor) -> tuple[float, ...]:
    """(our tokens/s, transformers tokens/s, our error, their error); errors are relative RMS logit
    differences from the fp32 transformers run, so bf16 rounding shows up on both sides alike."""
    with torch.inference_mode():
        t_ours = median_time(lambda: ours(ids), repeats)
        t_theirs = median_time(lambda: theirs(ids, use_cache=False).logits, repeats)
        ours_err = _rel_rms(ours(ids), reference)
        theirs_err = _rel_rms(theirs(ids, use_cache=False).logits, reference)
    return ids.numel() / t_ours, ids.numel() / t_theirs, ours_err, theirs_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    args = parser.parse_args()
    batch = args.batch or (2 if args.quick else 4)
    seq = args.seq or (128 if args.quick else 512)
    repeats = 2 if args.quick else 5

    from model_worker import load_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = save_hf_v3(Path(tmp))
        n_params = sum(p.numel() for p in hf_model.parameters())
        ids = torch.randint(0, hf_model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            reference = hf_model(ids, use_cache=False).logits.float()
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ours = load_model(tmp, dtype=dtype)
            rows.append((dtype_name, *_compare(ours, hf_model.to(dtype), ids, repeats, reference)))

    print(f"prefill, DeepSeek-V3-shaped model: {n_params / 1e6:.1f}M parameters, batch {batch} x {seq} tokens")
    print(machine_line())
    print("error = relative RMS logit difference from transformers in fp32")
    print(f"{'dtype':<6}{'ours tok/s':>12}{'transformers tok/s':>20}{'ratio':>8}{'ours error':>12}{'their error':>13}")
    for name, ours_tps, theirs_tps, ours_err, theirs_err in rows:
        print(f"{name:<6}{ours_tps:>12.1f}{theirs_tps:>20.1f}{ours_tps / theirs_tps:>8.2f}"
              f"{ours_err:>12.2e}{theirs_err:>13.2e}")


if __name__ == "__main__":
    main()
