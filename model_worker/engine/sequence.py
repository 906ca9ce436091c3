"""One request as the engine sees it: its tokens, how many are in the KV cache, and its page table.

A `Sequence` is plain state. The scheduler moves it between WAITING, RUNNING and FINISHED, the block
manager fills `block_table` / `block_hashes`, the runner reads them. It does not sample, detokenize or
check stop conditions (the engine does).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from model_worker.engine.sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort", "error")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds pages; prefilling or decoding
    FINISHED = "finished"  # done; holds no pages


@dataclass(eq=False)
class Sequence:
    """A request: prompt + generated tokens, cache progress and physical pages (logical order)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival: int = -1  # FIFO order, assigned by Scheduler.add
    token_ids: list[int] = field(default_factory=list)  # prompt + generated; empty -> copy of the prompt
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (prefix-cache hits included)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the latest admission
    block_table: list[int] = field(default_factory=list)  # physical page ids; page i holds tokens [i*B, (i+1)*B)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the leading full pages
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # one of FINISH_REASONS once FINISHED

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id: expected a non-empty string, got {self.request_id!r}")
        if not isinstance(self.prompt_token_ids, list) or not self.prompt_token_ids:
            raise ValueError("prompt_token_ids: expected a non-empty list of token ids")
        for token in self.prompt_token_ids:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise ValueError(f"prompt_token_ids: token ids must be non-negative ints, got {token!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling: expected SamplingParams, got {type(self.sampling).__name__}")
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        elif self.token_ids[: len(self.prompt_token_ids)] != self.prompt_token_ids:
            raise ValueError("token_ids: must start with prompt_token_ids")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
