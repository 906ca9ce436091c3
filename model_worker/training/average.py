"""`python -m model_worker.training.average A B --weight W --out DIR`: the weights of two exported
checkpoints of one architecture and tokenizer, interpolated as (1 - W) * A + W * B, exported as a
servable checkpoint (bf16 weights, FP8 Engram tables, A's tokenizer).

Why: a fine-tuning round from A that moves one decision at the cost of another (docs/training.md,
stages 10 and 11) can land, interpolated back toward A, between the two (weight averaging of a
fine-tuned model with its start, as in WiSE-FT and model soups). The Engram tables are averaged
dequantized and quantized again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model_worker.config import ModelConfig
from model_worker.model import CausalLM
from model_worker.tokenizer import Tokenizer
from model_worker.training.model_setup import TrainableEngramTables, build_trainable, export_checkpoint, load_exported

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _load(checkpoint: Path, config: ModelConfig,
          tokenizer: Tokenizer) -> tuple[CausalLM, TrainableEngramTables | None]:
    model, tables = build_trainable(config, tokenizer, seed=0)
    load_exported(model, tables, checkpoint)
    return model, tables


def interpolate(first: Path, second: Path, weight: float, out_dir: Path) -> None:
    """Write (1 - weight) * first + weight * second to out_dir. Raises ValueError when the two are not
    checkpoints of one architecture and tokenizer, or weight is outside [0, 1]."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be between 0 and 1, got {weight}")
    for checkpoint in (first, second):
        if not (checkpoint / "model.safetensors").is_file():
            raise ValueError(f"{checkpoint}: no exported checkpoint (model.safetensors missing)")
    config = ModelConfig.from_pretrained(first)
    if config != ModelConfig.from_pretrained(second):
        raise ValueError(f"{first} and {second} have different configs (config.json)")
    if any((first / name).read_bytes() != (second / name).read_bytes() for name in TOKENIZER_FILES):
        raise ValueError(f"{first} and {second} have different tokenizers")
    tokenizer = Tokenizer.from_pretrained(first)
    model, tables = _load(first, config, tokenizer)
    other_model, other_tables = _load(second, config, tokenizer)
    with torch.no_grad():
        other_state = other_model.state_dict()
        done: set[int] = set()  # tied tensors (the embedding and the LM head) show under two names
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in done:
                continue
            done.add(tensor.data_ptr())
            if tensor.is_floating_point():
                tensor.lerp_(other_state[name], weight)
            elif not torch.equal(tensor, other_state[name]):  # e.g. the Engram token map
                raise ValueError(f"{first} and {second} differ in {name}, which cannot be averaged")
        if tables is not None and other_tables is not None:
            for layer, table in tables.tables.items():
                table.lerp_(other_tables.tables[layer], weight)
    export_checkpoint(model, tables, first, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_worker.training.average",
                                     description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("first", type=Path, help="exported checkpoint A (its tokenizer is written out)")
    parser.add_argument("second", type=Path, help="exported checkpoint B, same architecture and tokenizer")
    parser.add_argument("--weight", type=float, default=0.5, help="share of B, between 0 and 1 (default 0.5)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the averaged checkpoint")
    args = parser.parse_args(argv)
    if args.out.resolve() in (args.first.resolve(), args.second.resolve()):
        parser.error("--out must not be one of the checkpoints averaged")
    try:
        interpolate(args.first, args.second, args.weight, args.out)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"wrote {args.out}: {1 - args.weight:g} x {args.first} + {args.weight:g} x {args.second}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
