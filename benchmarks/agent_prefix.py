"""Agent-loop prefix reuse: time per step of a simulated 20-step agent conversation, with and without
prefix caching.

Every step re-sends the whole conversation (a system prompt, then for each earlier step the model's
action and a tool observation) and generates a short action, as an agent orchestrator does. With
prefix caching only the tokens added since the previous step are computed, so the step time should
stay nearly flat while the history grows; without it every step recomputes the whole history.

    python benchmarks/agent_prefix.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ByteTokenizer, machine_line, save_hf_v3  # noqa: E402


def run_conversation(model, steps: int, prefix_caching: bool, system_len: int, observation_len: int,
                     action_len: int) -> list[tuple[int, float, int]]:
    """-> per step: (prompt tokens, seconds, tokens the engine computed)."""
    from model_worker.engine.engine import EngineConfig, LLMEngine
    from model_worker.engine.sampling import SamplingParams

    engine = LLMEngine(model, ByteTokenizer(model.config.vocab_size),
                       EngineConfig(enable_prefix_caching=prefix_caching, cache_budget_bytes=512 * 2**20))
    gen = torch.Generator().manual_seed(0)
    history = torch.randint(0, model.config.vocab_size, (system_len,), generator=gen).tolist()
    params = SamplingParams(max_tokens=action_len, temperature=0.0, ignore_eos=True)
    results = []
    for step in range(steps):
        before = engine.stats["computed_tokens"]
        start = time.perf_counter()
        engine.add_request(f"step{step}", history, params)
        action = []
        while engine.has_unfinished():
            for out in engine.step():
                action += out.new_token_ids
        elapsed = time.perf_counter() - start
        results.append((len(history), elapsed, engine.stats["computed_tokens"] - before))
        observation = torch.randint(0, model.config.vocab_size, (observation_len,), generator=gen).tolist()
        history = history + action + observation
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 8 if args.quick else 20
    system_len, observation_len, action_len = (256, 48, 16) if args.quick else (512, 96, 24)

    from model_worker import load_model

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_v3(Path(tmp))
        model = load_model(tmp)
    run_conversation(model, 2, True, system_len, observation_len, action_len)  # warm-up, discarded
    cached = run_conversation(model, steps, True, system_len, observation_len, action_len)
    plain = run_conversation(model, steps, False, system_len, observation_len, action_len)
    print(f"agent conversation: {steps} steps, system prompt {system_len} tokens, +{action_len} action and "
          f"+{observation_len} observation tokens per step, ~100M-parameter V3-shaped model fp32")
    print(machine_line())
    print(f"{'step':>4}{'prompt tokens':>15}{'cached s':>10}{'computed':>10}{'uncached s':>12}{'computed':>10}"
          f"{'speedup':>9}")
    for step, ((n, t_c, c_c), (_, t_u, c_u)) in enumerate(zip(cached, plain)):
        print(f"{step:>4}{n:>15}{t_c:>10.3f}{c_c:>10}{t_u:>12.3f}{c_u:>10}{t_u / t_c:>9.2f}")
    growth = lambda rows: rows[-1][1] / rows[1][1]  # noqa: E731  (step 0 is the same for both)
    print(f"last/second step time: cached {growth(cached):.2f}x, uncached {growth(plain):.2f}x")


if __name__ == "__main__":
    main()
