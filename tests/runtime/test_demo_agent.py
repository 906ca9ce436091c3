"""The shipped demo agent model (model_worker/demo_model): a checkpoint the normal loader serves, small
enough to ship, that does real agent work through the whole embedded runtime (orchestrator, model worker with
structured decoding, memory service, Redis) on held-out tasks it never saw in training."""

from __future__ import annotations

import asyncio

from model_worker.loading import load_model
from model_worker.tokenizer import Tokenizer
from model_worker.training.model_setup import demo_model_config
from runtime.evaluation import evaluate_agent, held_out_tasks
from runtime.local import DEMO_MODEL_DIR, LocalRuntime, trained_demo_model
from runtime.settings import Settings

MAX_BYTES = 30 * 1024 * 1024  # the ceiling for a shipped demo checkpoint


def test_the_shipped_checkpoint_is_the_training_architecture_and_small():
    assert trained_demo_model() == DEMO_MODEL_DIR
    assert sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir()) < MAX_BYTES
    tokenizer = Tokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = load_model(DEMO_MODEL_DIR)
    expected = demo_model_config(tokenizer, mhc=False)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "engram_layer_ids", "hc_mult",
                  "vocab_size", "kv_lora_rank"):
        assert getattr(model.config, field) == getattr(expected, field), field


def test_it_computes_with_the_calculator_and_remembers_the_result(tmp_path, redis_url):
    """Held-out arithmetic tasks, some with "remember the result": the answer holds the calculator's result
    and, where asked, a memory of the tenant holds the sentence (evaluate_agent checks both). At least 9 of
    10, the issue's bar (the model copies numbers into its tool calls, and now and then miscopies one)."""
    tasks = [t for t in held_out_tasks(80, seed=3) if t.kind in ("arithmetic", "arithmetic_remember")][:10]
    assert {t.kind for t in tasks} == {"arithmetic", "arithmetic_remember"} and len(tasks) == 10
    report = asyncio.run(evaluate_agent(None, tasks, data_dir=tmp_path, redis_url=redis_url))
    assert report.all_actions_valid
    failures = [(o.task.task, o.answer, o.note) for o in report.outcomes if not o.correct]
    assert len(failures) <= 1, failures


def test_an_answer_is_not_cut_by_a_bound_of_the_runtime(tmp_path, redis_url, key_prefix):
    """With the runtime's defaults, a string in an action has no length bound of its own: the demo's answer of
    52 characters and its saved result come whole. (A bound of 48 characters once cut this very answer to
    "50 multiplied by 916 is 45800. I saved it to  is": the grammar closed the string where it had to.)"""
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, key_prefix=key_prefix)

    async def scenario():
        async with LocalRuntime(settings) as runtime:
            state, _ = await runtime.run_task("Calculate 50 multiplied by 916. Remember the result.", tenant="t")
            memories = await runtime.memory.list("t", "assistant", limit=10)
            return state, [m.text for m in memories.items]

    state, memories = asyncio.run(scenario())
    assert state.final_answer == "50 multiplied by 916 is 45800. I saved it to memory."
    assert "50 multiplied by 916 is 45800." in memories
