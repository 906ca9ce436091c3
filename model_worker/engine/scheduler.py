"""Continuous batching: which sequences run this step, and how many tokens each computes.

Every step: running sequences that finished their prompt decode one token each (first come, first
served); running sequences mid-prefill continue their prefill; then waiting sequences are admitted in
arrival order (FIFO: admission stops at the first one that does not fit). A step never computes more
than `max_num_batched_tokens` tokens nor runs more than `max_num_seqs` sequences; long prompts are
split into chunks across steps. When a decode needs a page and none is free, the latest-arrived running
sequence is preempted by recompute: its pages are freed, it keeps its generated tokens and goes back to
the front of the waiting queue, to be prefilled again (prefix-cache hits make that cheap).

This module does not run the model, sample, or check stop conditions: the engine does, then calls
`update` and `finish`.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

from model_worker.engine.block_manager import BlockManager
from model_worker.engine.sequence import FINISH_REASONS, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: seqs[i] computes num_new_tokens[i] tokens from seqs[i].num_computed_tokens on."""

    seqs: list[Sequence] = field(default_factory=list)  # decodes first, then prefill chunks
    num_new_tokens: list[int] = field(default_factory=list)  # 1 for a decode
    preempted: list[Sequence] = field(default_factory=list)  # pages freed this step; back in waiting
    failed: list[Sequence] = field(default_factory=list)  # finished with "error": can never be scheduled

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """FIFO continuous-batching scheduler over a `BlockManager`, with chunked prefill and preemption."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_chunked_prefill: bool = True) -> None:
        if not isinstance(block_manager, BlockManager):
            raise TypeError(f"block_manager: expected BlockManager, got {type(block_manager).__name__}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: expected an int >= 1, got {max_num_seqs!r}")
        if not isinstance(max_num_batched_tokens, int) or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: expected an int >= 1, got {max_num_batched_tokens!r}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = bool(enable_chunked_prefill)
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self._by_id: dict[str, Sequence] = {}
        self._next_arrival = 0
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new WAITING sequence (assigns seq.arrival)."""
        if not isinstance(seq, Sequence):
            raise TypeError(f"seq: expected Sequence, got {type(seq).__name__}")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"seq: {seq.request_id!r} must be a fresh WAITING sequence without pages")
        if seq.request_id in self._by_id:
            raise ValueError(f"request_id: {seq.request_id!r} is already scheduled")
        seq.arrival = self._next_arrival
        self._next_arrival += 1
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish the sequence with reason "abort" wherever it is; None when unknown or already finished."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark FINISHED, free its pages, drop it from the queues."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"reason: expected one of {FINISH_REASONS}, got {reason!r}")
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self._by_id.pop(seq.request_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Decide this step's batch (see the module docstring for the order)."""
        batch = ScheduledBatch()
        budget = self._schedule_decodes(batch, self.max_num_batched_tokens)
        budget = self._schedule_running_prefills(batch, budget)
        if not batch.preempted:  # pages are short: admitting now would only thrash
            self._admit_waiting(batch, budget)
        return batch

    def update(self, batch: ScheduledBatch, sampled: Mapping[str, int | None]) -> None:
        """Record a computed batch: advance num_computed_tokens, append sampled tokens, register full pages.

        `sampled[request_id]` is the new token of every seq whose computation reached the end of its
        token_ids (None or absent for mid-prefill chunks). Seqs finished since `schedule` are skipped.
        """
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if num_new > seq.num_uncomputed_tokens:
                raise ValueError(f"batch: {seq.request_id!r} has only {seq.num_uncomputed_tokens} tokens to compute")
            seq.num_computed_tokens += num_new
            self.block_manager.commit_full_pages(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                token = sampled.get(seq.request_id)
                if not isinstance(token, int) or token < 0:
                    raise ValueError(f"sampled: expected a token id for {seq.request_id!r}, got {token!r}")
                seq.token_ids.append(token)

    def _schedule_decodes(self, batch: ScheduledBatch, budget: int) -> int:
        """One token per running seq with exactly one uncomputed token, preempting when pages run out."""
        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            while not self.block_manager.ensure_slots(seq, seq.num_tokens):
                victim = self.running[-1]  # latest arrival (seq itself when it is the latest)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(1)
                budget -= 1
        return budget

    def _schedule_running_prefills(self, batch: ScheduledBatch, budget: int) -> int:
        """Next chunk of each running seq still mid-prefill (its pages were reserved at admission)."""
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed_tokens > 1:
                chunk = min(seq.num_uncomputed_tokens, budget)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(chunk)
                budget -= chunk
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """Admit waiting seqs in arrival order until one does not fit (pages, budget or seq count)."""
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_tokens > capacity or (
                    not self.enable_chunked_prefill and seq.num_tokens > self.max_num_batched_tokens):
                self.finish(seq, "error")  # would wait forever: the whole cache / a whole step is too small
                batch.failed.append(seq)
                continue
            if not self.enable_chunked_prefill:
                reused, _ = self.block_manager.match_prefix(seq.token_ids)
                if seq.num_tokens - len(reused) * self.block_manager.block_size > budget:
                    break
            if not self.block_manager.allocate_prompt(seq):
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self._insert_by_arrival(self.running, seq)
            chunk = min(seq.num_uncomputed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(chunk)
            budget -= chunk

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Free seq's pages and send it back to waiting (before every never-admitted seq), keeping its tokens."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._insert_by_arrival(self.waiting, seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    @staticmethod
    def _insert_by_arrival(queue: list[Sequence], seq: Sequence) -> None:
        queue.insert(bisect.bisect([s.arrival for s in queue], seq.arrival), seq)
