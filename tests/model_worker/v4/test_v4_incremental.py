"""V4 decoding with carried state (`V4CausalLM.forward(ids, state)`) equals full recompute: the logits of a
prompt fed in chunks that do not line up with the sliding window or the compression windows, then greedy
decode steps, equal those of recomputing the whole sequence each time (and so the tokens are the same);
a state copied after a shared prefix and continued two ways equals each sequence computed alone."""

from __future__ import annotations

import pytest
import torch

from tests.model_worker.v4.test_v4_parity import BASE, CONFIGS, DeepseekV4Config, _random_reference

pytestmark = pytest.mark.skipif(DeepseekV4Config is None, reason="this transformers has no deepseek_v4")


def _ours(config: dict, seed: int, tmp_path):
    from model_worker.v4 import load_v4_model

    _random_reference(config, seed).save_pretrained(tmp_path)
    return load_v4_model(tmp_path)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill_then_greedy_decode_equals_full_recompute(name, tmp_path):
    config, _ = CONFIGS[name]
    model = _ours(config, seed=11, tmp_path=tmp_path)
    prompt = torch.randint(0, config["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(3))
    state, pieces = model.new_state(), []
    with torch.no_grad():
        for start, stop in ((0, 5), (5, 18), (18, 19), (19, 29)):  # crosses windows of 4, 8, 16 and W
            pieces.append(model(prompt[:, start:stop], state))
        torch.testing.assert_close(torch.cat(pieces, dim=1), model(prompt), rtol=1e-4, atol=1e-4)
        sequence = prompt
        for _ in range(12):
            step = model(sequence[:, -1:], state) if sequence.shape[1] > prompt.shape[1] else pieces[-1][:, -1:]
            full = model(sequence)[:, -1:]
            torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
            sequence = torch.cat((sequence, step.argmax(-1)), dim=1)
    assert state.length == sequence.shape[1] - 1


def test_a_state_copied_after_a_shared_prefix_continues_both_ways(tmp_path):
    model = _ours(BASE, seed=5, tmp_path=tmp_path)
    g = torch.Generator().manual_seed(9)
    prefix = torch.randint(0, 128, (1, 21), generator=g)
    tails = [torch.randint(0, 128, (1, 11), generator=g) for _ in range(2)]
    with torch.no_grad():
        shared = model.new_state()
        model(prefix, shared)
        for tail in tails:
            state = shared.copy()
            got = model(tail, state)
            want = model(torch.cat((prefix, tail), dim=1))[:, prefix.shape[1]:]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert shared.length == prefix.shape[1]  # continuing the copies left the shared state as it was


@pytest.mark.parametrize("cache", ["lossless", "fp8 rows read back", "fp8 pages of one pool"])
def test_one_batched_decode_step_of_sequences_at_different_lengths(tmp_path, cache):
    """`decode` runs sequences of 3, 17 and 30 tokens (windows open and closed at different points) in one
    forward: each row's logits equal that sequence's own step (and, lossless, its full recompute). With FP8
    states in separate pools the rows are read back and padded; in one pool the attention reads the pages."""
    from model_worker.v4.kv_rows import model1_layout
    from model_worker.v4.page_pool import Model1PagePool

    model = _ours(BASE, seed=13, tmp_path=tmp_path)
    layout = model1_layout(model.config.head_dim, model.config.qk_rope_head_dim)
    fp8 = {"lossless": lambda: None, "fp8 rows read back": lambda: layout}.get(cache)
    shared = Model1PagePool(layout)
    g = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, 128, (1, length), generator=g) for length in (3, 17, 30)]
    nexts = torch.randint(0, 128, (3,), generator=g)
    with torch.no_grad():
        states = [model.new_state(fp8() if fp8 else shared) for _ in sequences]
        for seq, state in zip(sequences, states):
            model(seq, state)
        alone = [model(nexts[i].view(1, 1), state.copy())[0, -1] for i, state in enumerate(states)]
        together = model.decode(nexts, states)
        torch.testing.assert_close(together, torch.stack(alone), rtol=1e-4, atol=1e-4)
        if cache == "lossless":
            for i, seq in enumerate(sequences):
                full = model(torch.cat((seq, nexts[i].view(1, 1)), dim=1))[0, -1]
                torch.testing.assert_close(together[i], full, rtol=1e-4, atol=1e-4)
    assert [state.length for state in states] == [4, 18, 31]
