"""Training batches of the agent traces: drawn in chunks, and prepared ahead in worker processes on request.

A chunk is a pure function of (settings, chunk index, form), so batches made in another process are the
ones the training thread would have made: a GPU run keeps the device busy while the CPU renders and
tokenizes sessions, and its data stream stays that of a CPU run with the same seed.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from model_worker.tokenizer import Tokenizer
from model_worker.training import data
from model_worker.training.retrieval import retrieval_for

if TYPE_CHECKING:
    from model_worker.training.trainer import TrainSettings

BATCHES_PER_CHUNK = 8  # batches drawn together and bucketed by length (less padding)
CHUNKS_AHEAD = 6  # chunks of each form kept in preparation

_worker_tokenizer: Tokenizer | None = None


def settings_pieces(tokenizer: Tokenizer, settings: TrainSettings) -> data.pools.WordPieces | None:
    """The pieces made-up words are built from under `settings` (None: syllables only)."""
    return data.word_pieces(tokenizer, settings.piece_max_count) if settings.piece_words else None


def chunk_batches(tokenizer: Tokenizer, settings: TrainSettings, chunk: int,
                  short: bool = False) -> list[list[data.Tokenized]]:
    """Chunk `chunk` of a stream (full-form or short-form sessions): BATCHES_PER_CHUNK batches drawn from a
    generator seeded by (seed, chunk, form), sorted by length (less padding), split, and put in a seeded
    random order."""
    size = settings.short_batch_size if short else settings.batch_size
    pool = data.session_examples(BATCHES_PER_CHUNK * size, seed=settings.seed * 1_000_003 + chunk * 2 + short,
                                 short=short, weights=settings.kind_weights,
                                 pieces=settings_pieces(tokenizer, settings),
                                 retrieval=retrieval_for(settings.runtime_retrieval),
                                 same_form_results=settings.same_form_results,
                                 saved_results=settings.saved_results, answers=settings.answers)
    items = sorted(data.tokenize(tokenizer, pool), key=lambda item: len(item.ids))
    batches = [items[i * size:(i + 1) * size] for i in range(BATCHES_PER_CHUNK)]
    random.Random(chunk).shuffle(batches)
    return batches


def _start_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    _worker_tokenizer = Tokenizer.from_pretrained(tokenizer_dir)


def _worker_chunk(settings: TrainSettings, chunk: int, short: bool) -> list[list[data.Tokenized]]:
    assert _worker_tokenizer is not None
    return chunk_batches(_worker_tokenizer, settings, chunk, short)


class ChunkPrefetcher:
    """`workers` spawned processes (spawn, not fork: the trainer may hold a CUDA context) that prepare the
    next CHUNKS_AHEAD chunks of each form while the trainer trains on the current one."""

    def __init__(self, tokenizer_dir: Path, settings: TrainSettings, workers: int):
        self.settings = settings
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_worker, initargs=(str(tokenizer_dir),))
        self.pending: dict[tuple[bool, int], Future] = {}

    def get(self, chunk: int, short: bool) -> list[list[data.Tokenized]]:
        """Chunk `chunk` of the given form (waiting for it if it is not ready), queueing the ones after it."""
        for ahead in range(chunk, chunk + CHUNKS_AHEAD):
            if (short, ahead) not in self.pending:
                self.pending[(short, ahead)] = self.pool.submit(_worker_chunk, self.settings, ahead, short)
        for key in [key for key in self.pending if key[0] == short and key[1] < chunk]:
            self.pending.pop(key).cancel()
        return self.pending.pop((short, chunk)).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
