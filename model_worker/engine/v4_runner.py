"""Running a DeepSeek-V4 model (`model_worker.v4`) in the engine: each sequence carries its own `V4State`
(the sliding window's last keys, the compressed entries, the compressors' open windows) between steps,
kept here by request id, instead of pages of the latent cache that V2/V3 use. A step's decodes run as one
batched forward. The engine's scheduler, sampling, structured decoding and streaming are the same; the
block manager only accounts memory (`v4_bytes_per_token`). A preempted sequence's state is dropped (a
snapshot is kept, `v4_prefixes`); when it runs again it continues from the longest stored prefix of its
tokens, as does every new sequence (an agent's next step re-sends its history).

With `kv_cache_dtype="fp8"` the window keys and compressed entries are kept as MODEL1 FP8 rows in pages of 64
tokens from one pool shared by every sequence (`v4.page_pool`). Not yet: batching prefill chunks, the block
manager's page-level prefix cache (off for V4: snapshots stand in for it).
"""

from __future__ import annotations

import torch

from model_worker.engine.scheduler import ScheduledBatch
from model_worker.engine.sequence import Sequence
from model_worker.engine.v4_prefixes import StateSnapshots
from model_worker.v4.config import CSA, SLIDING
from model_worker.v4.page_pool import Model1PagePool


def v4_bytes_per_token(config, element_bytes: int, fp8_layout=None) -> int:
    """State bytes a token costs, counted as if every token kept its sliding-window key (an upper bound: only
    the last W - 1 are kept) plus its share of the compressed entries and of the CSA indexer's keys. A row is
    head_dim values in the model's dtype, or a MODEL1 FP8 row (`fp8_layout`: 584 bytes for V4); the indexer's
    keys stay in the model's dtype."""
    row = fp8_layout.bytes_per_token if fp8_layout is not None else config.head_dim * element_bytes
    total = 0.0
    for layer_type in config.layer_types:
        total += row
        if layer_type != SLIDING:
            total += row / config.rate(layer_type)
        if layer_type == CSA:
            total += config.index_head_dim * element_bytes / config.rate(layer_type)
    return int(-(-total // 1))


class V4Runner:
    """The engine's runner for V4 models: one forward per scheduled sequence, with its carried state."""

    def __init__(self, model, fp8_layout=None, snapshots: int = 32, pool_pages: int = 0):
        """fp8_layout: keep FP8 rows in one pool of `pool_pages` MODEL1 pages shared by every sequence."""
        self.model = model
        self.device = next(model.parameters()).device
        self.pool = Model1PagePool(fp8_layout, pool_pages, self.device) if fp8_layout is not None else None
        self._states: dict[str, object] = {}  # request id -> V4State
        self._tokens: dict[str, list[int]] = {}  # request id -> its token ids (the list the sequence extends)
        self.prefixes = StateSnapshots(snapshots)
        if self.pool is not None:
            self.pool.on_exhausted = self.prefixes.evict_oldest
        self.computed_tokens = 0
        self.engram_lookups = 0  # V4 has no Engram layers (V4.1's tables are not read yet)
        self.engram_lookup_tokens = 0

    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """-> (sequences to sample for, their logits [S, vocab] fp32). The step's decodes (one token of a
        sequence whose state is current) run as one batched forward (`V4CausalLM.decode`); prefill chunks
        run one sequence each."""
        logits: dict[str, torch.Tensor] = {}
        for seq in batch.preempted:  # its memory goes back to the pool: keep only a snapshot (bounded)
            self.forget(seq.request_id)
        with torch.inference_mode():
            decodes = [seq for seq, n_new in zip(batch.seqs, batch.num_new_tokens) if n_new == 1 and
                       seq.num_computed_tokens and self._current(seq)]
            if decodes:
                ids = torch.tensor([seq.token_ids[seq.num_computed_tokens] for seq in decodes], device=self.device)
                rows = self.model.decode(ids, [self._states[seq.request_id] for seq in decodes])
                logits.update((seq.request_id, row) for seq, row in zip(decodes, rows))
                self.computed_tokens += len(decodes)
            batched = {seq.request_id for seq in decodes}
            for seq, n_new in zip(batch.seqs, batch.num_new_tokens):
                if seq.request_id in batched:
                    continue
                stop = seq.num_computed_tokens + n_new
                state = self._state_for(seq)
                if state.length >= stop:
                    continue  # a stored prefix already holds this chunk, and no token is sampled after it
                ids = torch.tensor([seq.token_ids[state.length:stop]], dtype=torch.int64, device=self.device)
                logits[seq.request_id] = self.model(ids, state)[0, -1]
                self.computed_tokens += ids.shape[1]
                if stop == seq.num_prompt_tokens:
                    self.prefixes.store(seq.token_ids[:stop], state)
        sampled = [seq for seq, n_new in zip(batch.seqs, batch.num_new_tokens)
                   if seq.num_computed_tokens + n_new == seq.num_tokens]
        vocab = self.model.config.vocab_size
        return sampled, (torch.stack([logits[seq.request_id] for seq in sampled]) if sampled
                         else torch.empty(0, vocab, device=self.device))

    def _current(self, seq: Sequence) -> bool:
        state = self._states.get(seq.request_id)
        return state is not None and state.length == seq.num_computed_tokens

    def _state_for(self, seq: Sequence):
        """The sequence's state: its own, else (new, or resumed after preemption) a copy of the longest stored
        prefix of its tokens short of the last one (whose logits are needed), else an empty one. It may hold
        more tokens than the scheduler has had computed (then the chunks it holds cost nothing)."""
        state = self._states.get(seq.request_id)
        if state is None:
            state = self.prefixes.longest(seq.token_ids, seq.num_tokens - 1) or self.model.new_state(self.pool)
            self._states[seq.request_id], self._tokens[seq.request_id] = state, seq.token_ids
        return state

    def forget(self, request_id: str) -> None:
        """Drop a finished or aborted request's state, keeping a snapshot of what it computed."""
        state, tokens = self._states.pop(request_id, None), self._tokens.pop(request_id, None)
        if state is not None and tokens is not None:
            self.prefixes.store(tokens[: state.length], state)
            state.release()

    def close(self) -> None:
        for state in self._states.values():
            state.release()
        self._states.clear()
        self._tokens.clear()
        self.prefixes.clear()
