"""ModelRunner: turns a scheduled batch into tensors and runs one model step over the paged cache.

A step is a flat batch of tokens from several sequences: decode tokens (one per sequence) and prefill
chunks (several tokens). Every token's latent goes into its cache slot; then decode tokens attend
through the paged MLA decode kernel and prefill chunks attend over their sequence's gathered context
(causal within the chunk). The decode kernel is the Triton one on GPU; elsewhere the batched-torch
form (`paged_mla_decode_gathered`) runs, with the step's page walk built once and shared by all
layers. Engram rows for the step are looked up as soon as the step's tokens are known, before any
layer runs: on a background thread when the model runs on a GPU, so the fetch overlaps the layers
below the first Engram layer; inline on CPU-only hosts, where a second thread of torch work only
competes with the intra-op thread pool. A table client with `lookup_many({layer: hash_ids})` (rows served
by another process) gets one request for all Engram layers per step, sent before the layers run so the
transfer overlaps the layers below the first Engram layer: from the engine thread itself on a CPU host when
the client can send without waiting (`start_lookup_many`), else from a background thread. The runner returns the
logits of each sequence whose computation reached its last token; sampling is the engine's job.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from engram_kernels.dispatch import use_triton
from engram_kernels.mla_decode import DecodeGather, paged_mla_decode, paged_mla_decode_gathered
from model_worker.engine.kv_cache import PagedLatentCache
from model_worker.engine.scheduler import ScheduledBatch
from model_worker.engine.sequence import Sequence
from model_worker.model import CausalLM


@dataclass
class PrefillSpan:
    """A chunk of `length` new tokens at flat rows [start, start + length), ending at context_len."""

    start: int
    length: int
    context_len: int
    block_table: torch.Tensor  # int32 [num_pages]


@dataclass
class StepPlan:
    """Tensors of one step. N = new tokens in the step."""

    input_ids: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # int64 [N]
    slot_mapping: torch.Tensor  # int64 [N]
    decode_rows: torch.Tensor  # int64 [Bd] flat rows of decode tokens
    decode_block_tables: torch.Tensor  # int32 [Bd, max_pages]
    decode_context_lens: torch.Tensor  # int32 [Bd]
    decode_max_len: int  # longest decode context (0 without decode tokens)
    decode_min_len: int  # shortest decode context (0 without decode tokens)
    all_decode: bool  # every token of the step is a decode token, in flat order
    prefill_spans: list[PrefillSpan] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)  # flat row of the last token, per sampled seq
    sampled_seqs: list[Sequence] = field(default_factory=list)
    _gather: DecodeGather | None = None

    def decode_gather(self, block_size: int) -> DecodeGather:
        """The decode tokens' page walk, built on first use and shared by every layer of the step."""
        if self._gather is None:
            self._gather = DecodeGather.build(self.decode_block_tables, self.decode_context_lens, block_size,
                                              self.decode_max_len, self.decode_min_len)
        return self._gather


def build_plan(batch: ScheduledBatch, block_size: int, device: torch.device) -> StepPlan:
    """Flatten the scheduled sequences' new tokens into step tensors."""
    ids, positions, slots = [], [], []
    decode_rows, decode_tables, decode_lens, spans = [], [], [], []
    logits_rows, sampled = [], []
    max_pages = max((len(seq.block_table) for seq in batch.seqs), default=1)
    for seq, n_new in zip(batch.seqs, batch.num_new_tokens):
        start, flat = seq.num_computed_tokens, len(ids)
        ctx_len = start + n_new
        table = seq.block_table
        for pos in range(start, ctx_len):
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        if n_new == 1 and start > 0:
            decode_rows.append(flat)
            decode_tables.append(table + [0] * (max_pages - len(table)))
            decode_lens.append(ctx_len)
        else:
            spans.append(PrefillSpan(flat, n_new, ctx_len, torch.tensor(table, dtype=torch.int32, device=device)))
        if ctx_len == seq.num_tokens:
            logits_rows.append(flat + n_new - 1)
            sampled.append(seq)
    as_long = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    return StepPlan(
        input_ids=as_long(ids), positions=as_long(positions), slot_mapping=as_long(slots),
        decode_rows=as_long(decode_rows),
        decode_block_tables=torch.tensor(decode_tables or [[0]], dtype=torch.int32, device=device)[: len(decode_rows)],
        decode_context_lens=torch.tensor(decode_lens, dtype=torch.int32, device=device),
        decode_max_len=max(decode_lens, default=0), decode_min_len=min(decode_lens, default=0), all_decode=not spans,
        prefill_spans=spans, logits_rows=logits_rows, sampled_seqs=sampled)


class LayerPagedAttention:
    """`PagedAttention` (model_worker.layers.mla) for one layer in one step."""

    def __init__(self, cache: PagedLatentCache, layer: int, plan: StepPlan):
        self.cache, self.layer, self.plan = cache, layer, plan

    def write(self, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        self.cache.write(self.layer, self.plan.slot_mapping, latent, k_rope, check_slots=False)  # checked per step

    def attend(self, q_lat: torch.Tensor, q_rope: torch.Tensor, scale: float) -> torch.Tensor:
        """q_lat [N, H, r], q_rope [N, H, rope] -> o_lat [N, H, r] fp32."""
        plan, cache = self.plan, self.cache
        if plan.all_decode:
            return self._decode(q_lat, q_rope, scale)
        out = torch.empty(q_lat.shape, dtype=torch.float32, device=q_lat.device)
        if len(plan.decode_rows):
            rows = plan.decode_rows
            out[rows] = self._decode(q_lat[rows], q_rope[rows], scale)
        for span in plan.prefill_spans:
            rows = slice(span.start, span.start + span.length)
            latent, k_rope = cache.gather(self.layer, span.block_table, span.context_len)  # [L, r], [L, rope]
            out[rows] = _causal_latent_attention(q_lat[rows].float(), q_rope[rows].float(), latent, k_rope, scale)
        return out

    def _decode(self, q_lat: torch.Tensor, q_rope: torch.Tensor, scale: float) -> torch.Tensor:
        """The decode tokens' queries [Bd, H, r], [Bd, H, rope] -> o_lat [Bd, H, r] fp32."""
        plan, cache = self.plan, self.cache
        storage = cache.layer_storage(self.layer)
        if use_triton(storage):
            return paged_mla_decode(q_lat, q_rope, storage, plan.decode_block_tables, plan.decode_context_lens, scale,
                                    cache.kv_lora_rank, cache.rope_dim, fmt=cache.fmt, block_size=cache.block_size)
        return paged_mla_decode_gathered(q_lat, q_rope, storage, plan.decode_gather(cache.block_size), scale,
                                         cache.layout)


def _causal_latent_attention(q_lat, q_rope, latent, k_rope, scale: float) -> torch.Tensor:
    """Queries are the last n of L context tokens. q_lat [n, H, r], q_rope [n, H, e], latent [L, r],
    k_rope [L, e] -> [n, H, r]."""
    n, L = q_lat.shape[0], latent.shape[0]
    scores = (torch.einsum("nhr,lr->hnl", q_lat, latent) + torch.einsum("nhe,le->hnl", q_rope, k_rope)) * scale
    query_pos = torch.arange(L - n, L, device=latent.device)[:, None]
    allowed = torch.arange(L, device=latent.device)[None, :] <= query_pos  # [n, L]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("hnl,lr->nhr", probs, latent)


class ModelRunner:
    """Runs one step of the model for a ScheduledBatch; owns the paged cache."""

    def __init__(self, model: CausalLM, cache: PagedLatentCache):
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        # Overlapping the Engram fetch with compute pays off when the layers run on a GPU (or the rows come
        # from another process). On a CPU-only host a second thread of torch work fights the intra-op
        # thread pool: benchmarks/engram_lookup.py measured an Engram cost of 65% with the background fetch
        # and 8% inline (2 cores).
        self._engram_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch") \
            if model.config.uses_engram and self.device.type == "cuda" else None
        self._batch_pool: ThreadPoolExecutor | None = None  # started on the first step with a batched client
        self.computed_tokens = 0  # tokens run through the model since start (prefix-cache hits excluded)
        self.engram_lookups = 0  # Engram table lookups issued (one per Engram layer per step)
        self.engram_lookup_tokens = 0  # tokens whose Engram rows were looked up, summed over layers
        self.engram_wait_s = 0.0  # time the model waited for Engram rows not there yet (the exposed fetch)
        self.engram_fetch_s = 0.0  # batched client: time from a step's request to its rows, summed over steps
        self.engram_send_s = 0.0  # batched client sent from the engine thread: its time spent sending
        self._unresolved = None  # the current step's lookup sent from the engine thread, not yet waited for

    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """-> (sequences to sample for, their logits [S, vocab] fp32)."""
        engram = self._prefetch_engram_rows(batch)  # first: the rows travel while the step is planned
        plan = build_plan(batch, self.cache.block_size, self.device)
        self.cache.check_slot_range(plan.slot_mapping)  # once for every layer's write
        logits_index = torch.tensor(plan.logits_rows, dtype=torch.int64, device=self.device)
        logits = self.model.forward_step(
            plan.input_ids, plan.positions, lambda layer: LayerPagedAttention(self.cache, layer, plan),
            lambda layer: self._engram_rows(engram[layer]), logits_index)
        self.computed_tokens += len(plan.input_ids)
        return plan.sampled_seqs, logits

    def _engram_rows(self, future: Future) -> torch.Tensor:
        """A layer's rows (waiting for a request the engine thread sent, if that is how they come), counting
        the time the model had to wait for them."""
        if future.done():
            return future.result()
        start = time.perf_counter()
        try:
            resolve, self._unresolved = self._unresolved, None
            if resolve is not None:
                resolve()
            return future.result()
        finally:
            self.engram_wait_s += time.perf_counter() - start

    def _prefetch_engram_rows(self, batch: ScheduledBatch) -> dict[int, Future]:
        """Start the Engram lookups of every Engram layer for this step's tokens. -> {layer: Future[N, C*hd]}.

        All sequences are hashed in one call and looked up in one call per layer: each sequence contributes a
        window of its new tokens plus the (max_ngram - 1) tokens before them, right-padded (padding comes
        after real tokens, so it never enters a real token's n-grams)."""
        model, cfg = self.model, self.model.config
        self._unresolved = None
        if not cfg.uses_engram:
            return {}
        context = cfg.engram_max_ngram_size - 1
        windows, kept = [], []
        for seq, n_new in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            lo = max(0, start - context)
            windows.append(seq.token_ids[lo : start + n_new])
            kept.append((start - lo, n_new))
        width = max(len(w) for w in windows)
        ids = torch.zeros(len(windows), width, dtype=torch.int64)
        valid = torch.zeros(len(windows), width, dtype=torch.bool)
        rows, cols = [], []
        for i, (window, (skip, n_new)) in enumerate(zip(windows, kept)):
            ids[i, : len(window)] = torch.tensor(window, dtype=torch.int64)
            valid[i, : len(window)] = True
            rows += [i] * n_new
            cols += range(skip, skip + n_new)
        ids, valid = ids.to(self.device), valid.to(self.device)
        compressed = model.model.engram_token_map[ids]
        pick = (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device))

        def lookup(layer_id: int) -> torch.Tensor:
            hash_ids = model.engram_hasher.hash(layer_id, compressed, valid)[pick]  # [N, C]
            return model.engram_tables.lookup(layer_id, hash_ids).flatten(-2)  # [N, C * head_dim]

        self.engram_lookups += len(cfg.engram_layer_ids)
        self.engram_lookup_tokens += len(rows) * len(cfg.engram_layer_ids)
        if callable(getattr(model.engram_tables, "lookup_many", None)):
            return self._prefetch_batched(compressed, valid, pick)
        if self._engram_pool is not None:
            return {layer: self._engram_pool.submit(lookup, layer) for layer in cfg.engram_layer_ids}
        done = {}
        for layer in cfg.engram_layer_ids:  # inline, still before any layer runs
            done[layer] = Future()
            done[layer].set_result(lookup(layer))
        return done

    def _prefetch_batched(self, compressed: torch.Tensor, valid: torch.Tensor,
                          pick: tuple[torch.Tensor, torch.Tensor]) -> dict[int, Future]:
        """One `lookup_many` request for every Engram layer. -> {layer: Future[N, C*hd]}, all settled together
        (with the rows, or the request's error).

        On a CPU host, with a client that can send without waiting (`start_lookup_many`), the engine thread
        hashes, sends and goes on; the first Engram layer waits for the answer (`_engram_rows`). No second
        thread: on a CPU its Python work (sending, decoding) took the GIL and cores from the layers, which
        cost more than the wait it hid (benchmarks/engram_remote.py, docs/capacity.md §8). Otherwise the
        request runs on a background thread, hashing there too on a GPU (its ids go to the host for the
        transfer)."""
        model = self.model
        layers = list(model.config.engram_layer_ids)
        tables = model.engram_tables
        futures = {layer: Future() for layer in layers}

        def hash_all() -> dict[int, torch.Tensor]:
            return {layer: model.engram_hasher.hash(layer, compressed, valid)[pick] for layer in layers}  # [N, C]

        def checked(got: dict, hash_ids: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            missing = [layer for layer in layers if layer not in got]
            if missing:  # never compute with missing rows
                raise RuntimeError(f"Engram lookup_many returned no rows for layer(s) {missing}")
            out = {}
            for layer in layers:
                rows = got[layer]
                if tuple(rows.shape[:-1]) != tuple(hash_ids[layer].shape):
                    raise RuntimeError(f"Engram lookup_many returned rows {tuple(rows.shape)} for layer {layer}'s "
                                       f"hash ids {tuple(hash_ids[layer].shape)}")
                out[layer] = rows.to(self.device).flatten(-2)  # [N, C * head_dim]
            return out

        def settle(rows: dict[int, torch.Tensor] | None, error: BaseException | None) -> None:
            for layer, future in futures.items():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(rows[layer])

        if self.device.type != "cuda" and callable(getattr(tables, "start_lookup_many", None)):
            hash_ids = hash_all()
            sent = time.perf_counter()
            pending = tables.start_lookup_many(hash_ids)
            self.engram_send_s += time.perf_counter() - sent

            def resolve() -> None:
                try:
                    rows = checked(pending.result(), hash_ids)
                except Exception as exc:
                    settle(None, exc)
                else:
                    settle(rows, None)
                finally:
                    self.engram_fetch_s += time.perf_counter() - sent

            self._unresolved = resolve
            return futures

        def fetch(hash_ids: dict[int, torch.Tensor] | None) -> dict[int, torch.Tensor]:
            start = time.perf_counter()
            if hash_ids is None:
                hash_ids = hash_all()
            try:
                return checked(tables.lookup_many(hash_ids), hash_ids)
            finally:
                self.engram_fetch_s += time.perf_counter() - start

        if self._batch_pool is None:
            self._batch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-fetch")
        step = self._batch_pool.submit(fetch, None if self.device.type == "cuda" else hash_all())
        step.add_done_callback(lambda done: settle(None, done.exception()) if done.exception() is not None
                               else settle(done.result(), None))
        return futures

    def forget(self, request_id: str) -> None:
        """Nothing to drop: a request's pages are the block manager's, freed by the scheduler."""

    def close(self) -> None:
        for pool in (self._engram_pool, self._batch_pool):
            if pool is not None:
                pool.shutdown(wait=False)
