"""LLMEngine: requests in, token/text deltas out, one scheduling step at a time.

Each `step()` asks the scheduler for a batch, runs it through the ModelRunner over the paged latent
cache, applies grammar masks and samples the sequences that reached their last token, then checks
stop conditions and reports what advanced. It is synchronous and single-threaded on purpose: the
async `ModelWorker` drives it from one background thread. Bad requests are refused in `add_request`
with a ValueError; a failure inside one request's post-processing finishes that request with an error
and leaves the rest of the batch running.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from model_worker.engine.block_manager import BlockManager
from model_worker.engine.detokenizer import IncrementalDetokenizer
from model_worker.engine.kv_cache import PagedLatentCache
from model_worker.engine.runner import ModelRunner
from model_worker.engine.sampling import Sampler, SamplingParams, make_generator
from model_worker.engine.scheduler import Scheduler
from model_worker.engine.sequence import Sequence
from model_worker.engine.structured import GrammarBackend
from model_worker.engine.v4_runner import V4Runner, v4_bytes_per_token
from model_worker.model import CausalLM
from model_worker.tokenizer import Tokenizer
from model_worker.v4.kv_rows import model1_layout


@dataclass
class EngineConfig:
    # "auto" (the model's own precision: fp32 for an fp32 model, lossless; else bf16), "bf16", "fp32" or
    # "fp8" (FlashMLA V3.2 layout)
    kv_cache_dtype: str = "auto"
    cache_budget_bytes: int = 256 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    block_size: int = 64


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    usage: Usage
    logprobs: list[dict] | None = None
    error: str | None = None


@dataclass
class _RequestState:
    """Per-request state the engine keeps beside the scheduler's Sequence."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer | None  # None: the model has no tokenizer (token ids only, no text)
    generator: torch.Generator | None
    grammar: object | None = None
    logprobs: list[dict] = field(default_factory=list)


def cache_format(kv_cache_dtype: str, model: CausalLM) -> str:
    """The cache row format for a `kv_cache_dtype` setting: "auto" follows the model's precision (fp32 rows
    for an fp32 model, so its cached decode equals a full recompute; bf16 rows otherwise)."""
    if kv_cache_dtype != "auto":
        return kv_cache_dtype  # checked by the cache layout ("bf16", "fp32", "fp8")
    return "fp32" if model.model.embed_tokens.weight.dtype == torch.float32 else "bf16"


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, config: EngineConfig | None = None,
                 model_name: str = "engram-model"):
        """tokenizer None: requests give and get token ids only (no text, stop strings or grammars)."""
        self.config = config or EngineConfig()
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        cfg = model.config
        self.max_model_len = cfg.max_position_embeddings
        self.kv_cache_format = cache_format(self.config.kv_cache_dtype, model)
        v4 = cfg.model_type == "deepseek_v4"  # carried per-sequence state, not the paged latent cache (v4_runner)
        if v4:
            if self.kv_cache_format not in ("fp8", cache_format("auto", model)):
                raise ValueError(f"kv_cache_dtype={self.config.kv_cache_dtype!r}: a DeepSeek-V4 model keeps its "
                                 "decoding state in the model's dtype ('auto') or in MODEL1 FP8 rows ('fp8')")
            fp8_layout = model1_layout(cfg.head_dim, cfg.qk_rope_head_dim) if self.kv_cache_format == "fp8" else None
            element = model.model.embed_tokens.weight.element_size()
            bytes_per_token = v4_bytes_per_token(cfg, element, fp8_layout)
        else:
            bytes_per_token = PagedLatentCache.bytes_per_token(cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                                               self.kv_cache_format) * cfg.num_hidden_layers
        num_blocks = BlockManager.blocks_for_budget(self.config.cache_budget_bytes, bytes_per_token,
                                                    self.config.block_size)
        device = next(model.parameters()).device
        self.block_manager = BlockManager(num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching and not v4)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs,
                                   self.config.max_num_batched_tokens, self.config.enable_chunked_prefill)
        if v4:
            pool_pages = 0
            if fp8_layout is not None:  # the budget, plus each running sequence's partly filled last pages
                pool_pages = self.config.cache_budget_bytes // fp8_layout.page_bytes + \
                    self.config.max_num_seqs * 2 * cfg.num_hidden_layers
            self.cache, self.runner = None, V4Runner(model, fp8_layout, pool_pages=pool_pages)
        else:
            self.cache = PagedLatentCache(cfg.num_hidden_layers, num_blocks, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                          fmt=self.kv_cache_format, block_size=self.config.block_size,
                                          device=device)
            self.runner = ModelRunner(model, self.cache)
        self.sampler = Sampler()
        self._grammars: GrammarBackend | None = None
        self._requests: dict[str, _RequestState] = {}
        self.eos_token_ids = _as_set(cfg.eos_token_id) | ({getattr(tokenizer, "eos_token_id", None)} - {None})
        self.preemptions = 0
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError (nothing queued) for anything the engine cannot serve."""
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError("prompt: must hold at least one token")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds the model's context of {self.max_model_len} tokens")
        pages_needed = -(-total // self.config.block_size)
        if pages_needed > self.block_manager.num_blocks:
            raise ValueError(f"prompt + max_tokens needs {pages_needed} cache pages; the cache holds "
                             f"{self.block_manager.num_blocks} (raise cache_budget_bytes)")
        if self.tokenizer is None and (params.stop or params.json_schema is not None or params.regex is not None):
            raise ValueError("stop strings and structured output need a tokenizer, and this model has none "
                             "(no tokenizer.json in its checkpoint)")
        grammar = None
        if params.json_schema is not None or params.regex is not None:
            compiled = self._grammar_backend().compile(json_schema=params.json_schema, regex=params.regex)
            grammar = self._grammar_backend().matcher(compiled)
        seq = Sequence(request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling=params, arrival=0)
        detokenizer = None if self.tokenizer is None else \
            IncrementalDetokenizer(self.tokenizer, list(prompt_token_ids), params.stop)
        state = _RequestState(seq, detokenizer, make_generator(params.seed), grammar)
        self._requests[request_id] = state
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)
            self.runner.forget(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _grammar_backend(self) -> GrammarBackend:
        if self._grammars is None:
            self._grammars = GrammarBackend(self.tokenizer, self.model.config.vocab_size)
        return self._grammars

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.preemptions += len(batch.preempted)
        failed = [self._failed_output(seq) for seq in batch.failed]
        if batch.is_empty:
            return failed
        seqs, logits = self.runner.execute(batch)
        states = [self._requests[seq.request_id] for seq in seqs]
        for row, state in enumerate(states):
            if state.grammar is not None:
                state.grammar.fill_mask(logits[row])
        result = self.sampler(logits, [s.seq.sampling for s in states], [s.generator for s in states])
        sampled = {seq.request_id: None for seq in batch.seqs}
        sampled.update({seq.request_id: tok for seq, tok in zip(seqs, result.token_ids)})
        self.scheduler.update(batch, sampled)
        outputs = failed
        for row, state in enumerate(states):
            outputs.append(self._advance(state, result.token_ids[row], result.logprobs[row], result.top_logprobs[row]))
        return outputs

    def _advance(self, state: _RequestState, token: int, logprob, top) -> RequestOutput:
        """Stop checks and text for one sampled token; a failure here ends only this request."""
        seq, params = state.seq, state.seq.sampling
        reason, error = None, None
        try:
            if state.grammar is not None:
                state.grammar.accept(token)
            delta, hit_stop = state.detokenizer.step([token]) if state.detokenizer is not None else ("", False)
            if params.logprobs is not None:
                state.logprobs.append({"token_id": token, "logprob": logprob, "top": top or []})
            if hit_stop or token in params.stop_token_ids:
                reason = "stop"
            elif token in self.eos_token_ids and not params.ignore_eos:
                reason = "stop"
            elif state.grammar is not None and state.grammar.is_terminated():
                reason = "stop"
            elif len(seq.output_token_ids) >= params.max_tokens:
                reason = "length"
        except Exception as exc:  # a bad token for one grammar must not take down the batch
            delta, reason, error = "", "error", f"{type(exc).__name__}: {exc}"
        if reason is not None and reason != "error" and state.detokenizer is not None and \
                not state.detokenizer.stopped:
            delta += state.detokenizer.flush()  # release text held back for a possible stop string
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._requests.pop(seq.request_id, None)
            self.runner.forget(seq.request_id)
        usage = Usage(seq.num_prompt_tokens, len(seq.output_token_ids), seq.num_cached_tokens)
        return RequestOutput(seq.request_id, [token], delta, reason is not None, reason, usage,
                             state.logprobs[-1:] if params.logprobs is not None else None, error)

    def _failed_output(self, seq: Sequence) -> RequestOutput:
        """The scheduler gave up on a request (it can never fit the cache or the step budget)."""
        self._requests.pop(seq.request_id, None)
        self.runner.forget(seq.request_id)
        usage = Usage(seq.num_prompt_tokens, len(seq.output_token_ids), seq.num_cached_tokens)
        return RequestOutput(seq.request_id, [], "", True, "error", usage, None,
                             "the request cannot be scheduled within the KV cache or the per-step token budget")

    @property
    def stats(self) -> dict:
        return {"computed_tokens": self.runner.computed_tokens, "preemptions": self.preemptions,
                "engram_lookups": self.runner.engram_lookups, "engram_lookup_tokens": self.runner.engram_lookup_tokens,
                **self.block_manager.stats}

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)
