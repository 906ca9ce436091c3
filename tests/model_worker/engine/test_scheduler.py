"""Scheduler: FIFO admission, token budget and chunked prefill, preemption by recompute, abort, no page leaks.

The randomized test drives the scheduler like the engine does, with a simulated paged KV cache: every
computed token is written to (page, offset) from the block table, every step reads the whole context
back through the block table and checks it against the sequence's tokens, and the "model" picks the next
token from the context it read. Outputs must equal a naive loop over the plain token list, which shows
that reuse, chunking and preemption never expose a wrong page.
"""

from __future__ import annotations

import random

import pytest

from model_worker.engine.block_manager import BlockManager
from model_worker.engine.scheduler import ScheduledBatch, Scheduler
from model_worker.engine.sequence import Sequence, SequenceStatus

BS = 4


def _next_token(context: list[int]) -> int:
    """Toy model: depends on every token and its position."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 2654435761 + len(context)) % 97


def _naive_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(_next_token(tokens))
    return tokens[len(prompt):]


class SimulatedRunner:
    """Writes (position, token) per computed token into pages; reads contexts back through block tables."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.pages: dict[int, list[tuple[int, int] | None]] = {}
        self.computed_tokens = 0

    def execute(self, batch: ScheduledBatch) -> dict[str, int | None]:
        sampled: dict[str, int | None] = {}
        bs = self.bm.block_size
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            assert 1 <= num_new and end <= seq.num_tokens and len(seq.block_table) * bs >= end
            for pos in range(start, end):
                page = seq.block_table[pos // bs]
                assert self.bm.ref_count(page) == 1, "a shared page must never be written"
                self.pages.setdefault(page, [None] * bs)[pos % bs] = (pos, seq.token_ids[pos])
            context = [self.pages[seq.block_table[p // bs]][p % bs] for p in range(end)]
            assert context == list(enumerate(seq.token_ids[:end])), f"{seq.request_id}: wrong KV read back"
            sampled[seq.request_id] = _next_token([t for _, t in context]) if end == seq.num_tokens else None
            self.computed_tokens += num_new
        return sampled


def _run_step(sched: Scheduler, runner: SimulatedRunner, max_tokens: dict[str, int]) -> ScheduledBatch:
    """One engine step: schedule, compute, update, then finish seqs that reached max_tokens."""
    batch = sched.schedule()
    sampled = runner.execute(batch)
    sched.update(batch, sampled)
    for seq in batch.seqs:
        if seq.status is SequenceStatus.RUNNING and sampled[seq.request_id] is not None \
                and len(seq.output_token_ids) >= max_tokens[seq.request_id]:
            sched.finish(seq, "length")
    return batch


def _engine(num_blocks: int = 64, prefix_caching: bool = True, **kwargs) -> tuple[Scheduler, SimulatedRunner]:
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=prefix_caching)
    return Scheduler(bm, **kwargs), SimulatedRunner(bm)


def _check_page_accounting(sched: Scheduler) -> None:
    """Each page's ref count equals the number of live seqs holding it; free count = the rest."""
    bm = sched.block_manager
    holders: dict[int, int] = {}
    for seq in sched.running:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for page in seq.block_table:
            holders[page] = holders.get(page, 0) + 1
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert all(bm.ref_count(p) == holders.get(p, 0) for p in range(bm.num_blocks))
    assert bm.num_free_blocks == bm.num_blocks - len(holders)


def test_waiting_seqs_are_admitted_in_arrival_order_and_stop_at_the_first_that_does_not_fit():
    sched, _ = _engine(num_blocks=4)
    a, b, c = Sequence("a", [1] * 8), Sequence("b", [2] * 12), Sequence("c", [3] * 2)
    for seq in (a, b, c):
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == [a] and [s.arrival for s in (a, b, c)] == [0, 1, 2]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]  # c would fit, but b is first


def test_chunked_prefill_stays_within_the_token_budget():
    sched, runner = _engine(max_num_batched_tokens=4)
    sched.add(Sequence("a", list(range(10))))
    chunks = []
    for _ in range(3):
        batch = sched.schedule()
        chunks.append(batch.num_new_tokens)
        sched.update(batch, runner.execute(batch))
    assert chunks == [[4], [4], [2]]
    seq = sched.running[0]
    assert seq.output_token_ids == [_next_token(list(range(10)))]
    decode = sched.schedule()
    assert decode.seqs == [seq] and decode.num_new_tokens == [1]


def test_decodes_come_first_and_prefills_share_the_rest_of_the_budget():
    sched, runner = _engine(max_num_batched_tokens=6)
    a = Sequence("a", [5, 6, 7])
    sched.add(a)
    sched.update(first := sched.schedule(), runner.execute(first))
    b, c = Sequence("b", list(range(20))), Sequence("c", [9, 9])
    sched.add(b)
    sched.add(c)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 5]  # budget spent: c waits its turn
    assert c.status is SequenceStatus.WAITING
    sched.update(batch, runner.execute(batch))
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 5]


def test_max_num_seqs_caps_the_running_batch():
    sched, _ = _engine(max_num_seqs=2)
    for i in range(3):
        sched.add(Sequence(f"s{i}", [i + 1] * 3))
    batch = sched.schedule()
    assert len(batch.seqs) == 2 and len(sched.running) == 2 and len(sched.waiting) == 1


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room_for_all_of_it():
    sched, runner = _engine(max_num_batched_tokens=8, enable_chunked_prefill=False)
    a = Sequence("a", [1, 2, 3])
    sched.add(a)
    sched.update(first := sched.schedule(), runner.execute(first))
    b = Sequence("b", list(range(8)))
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a] and b.status is SequenceStatus.WAITING  # 1 decode + 8 > 8
    sched.finish(a, "stop")
    assert sched.schedule().num_new_tokens == [8]


def test_prompt_longer_than_a_step_fails_when_chunking_is_off():
    sched, _ = _engine(max_num_batched_tokens=8, enable_chunked_prefill=False)
    seq = Sequence("long", list(range(9)))
    sched.add(seq)
    batch = sched.schedule()
    assert batch.failed == [seq] and seq.finish_reason == "error" and not sched.has_unfinished()


def test_running_out_of_pages_preempts_the_latest_arrival_which_keeps_its_tokens_and_goes_first():
    sched, runner = _engine(num_blocks=3)
    a, b = Sequence("a", [1, 2, 3, 4]), Sequence("b", [5, 6, 7, 8])
    sched.add(a)
    sched.add(b)
    sched.update(first := sched.schedule(), runner.execute(first))  # each holds 1 full page, 1 token sampled
    late = Sequence("late", [9])
    sched.add(late)
    b_tokens = list(b.token_ids)
    batch = sched.schedule()  # a takes the last page; b needs one too: b (latest running) is preempted
    assert batch.seqs == [a] and batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.token_ids == b_tokens and len(b.output_token_ids) == 1
    assert sched.waiting == [b, late] and sched.num_preemptions == 1
    sched.update(batch, runner.execute(batch))
    sched.finish(a, "stop")
    batch = sched.schedule()
    assert batch.seqs[0] is b and batch.num_new_tokens[0] == 1  # full page [5..8] reused from the cache
    sched.update(batch, runner.execute(batch))
    assert b.output_token_ids == _naive_output([5, 6, 7, 8], 2)


def test_a_seq_that_outgrows_the_whole_cache_is_preempted_then_fails():
    sched, runner = _engine(num_blocks=1)
    seq = Sequence("a", [1, 2, 3])
    sched.add(seq)
    for _ in range(2):
        sched.update(batch := sched.schedule(), runner.execute(batch))
    assert seq.num_tokens == 5
    batch = sched.schedule()
    assert batch.preempted == [seq] and batch.is_empty
    batch = sched.schedule()
    assert batch.failed == [seq] and seq.finish_reason == "error"
    assert sched.block_manager.num_free_blocks == 1 and not sched.has_unfinished()


@pytest.mark.parametrize("where", ["waiting", "mid_prefill", "decoding"])
def test_abort_from_any_state_frees_pages(where: str):
    sched, runner = _engine(num_blocks=8, max_num_batched_tokens=4)
    seq = Sequence("a", list(range(10)))
    sched.add(seq)
    if where != "waiting":
        sched.update(batch := sched.schedule(), runner.execute(batch))
    if where == "decoding":
        for _ in range(2):
            sched.update(batch := sched.schedule(), runner.execute(batch))
        assert seq.output_token_ids
    assert sched.abort("a") is seq
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "abort" and seq.block_table == []
    assert sched.block_manager.num_free_blocks == 8 and not sched.has_unfinished()
    assert sched.abort("a") is None and sched.abort("unknown") is None


def test_abort_between_schedule_and_update_is_skipped_by_update():
    sched, runner = _engine()
    sched.add(seq := Sequence("a", [1, 2]))
    batch = sched.schedule()
    sampled = runner.execute(batch)
    sched.abort("a")
    sched.update(batch, sampled)
    assert seq.token_ids == [1, 2] and seq.num_computed_tokens == 0


def test_second_request_with_shared_prefix_computes_only_its_new_tokens():
    sched, runner = _engine(num_blocks=64, max_num_batched_tokens=64)
    prefix = [(3 * i) % 50 for i in range(100)]
    tokens: dict[str, list[int]] = {}
    for rid, suffix in (("first", [1, 2, 3]), ("second", [4, 5, 6, 7, 8])):
        sched.add(Sequence(rid, prefix + suffix))
        before = runner.computed_tokens
        while sched.has_unfinished():
            _run_step(sched, runner, {rid: 3})
        tokens[rid] = runner.computed_tokens - before
    assert tokens["first"] == 103 + 2
    assert tokens["second"] == 105 - (100 // BS) * BS + 2


def test_update_rejects_a_missing_sampled_token():
    sched, _ = _engine()
    sched.add(Sequence("a", [1, 2]))
    with pytest.raises(ValueError, match="sampled"):
        sched.update(sched.schedule(), {"a": None})


def test_bad_arguments_are_rejected():
    bm = BlockManager(4, BS)
    with pytest.raises(TypeError, match="block_manager"):
        Scheduler(object())
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(bm, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(bm, max_num_batched_tokens=0)
    sched = Scheduler(bm)
    sched.add(Sequence("a", [1]))
    with pytest.raises(ValueError, match="request_id"):
        sched.add(Sequence("a", [2]))
    with pytest.raises(ValueError, match="reason"):
        sched.finish(sched.waiting[0], "done")


@pytest.mark.parametrize("seed", range(24))
def test_random_schedules_match_a_naive_loop_and_leak_no_pages(seed: int):
    rng = random.Random(seed)
    chunked = seed % 3 != 2
    num_blocks = rng.randint(10, 24)
    budget = rng.randint(6, 24) if chunked else num_blocks * BS
    sched, runner = _engine(num_blocks, prefix_caching=seed % 4 != 3, max_num_seqs=rng.randint(2, 6),
                            max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    shared = [[rng.randrange(97) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    arrivals: dict[int, list[Sequence]] = {}
    max_tokens: dict[str, int] = {}
    for i in range(16):
        prompt = rng.choice(shared) + [rng.randrange(97) for _ in range(rng.randint(1, 10))]
        max_tokens[f"r{i}"] = rng.randint(1, min(14, num_blocks * BS - len(prompt)))
        arrivals.setdefault(rng.randint(0, 30), []).append(Sequence(f"r{i}", prompt))
    seqs = [s for group in arrivals.values() for s in group]
    aborted = set()
    for step in range(2000):
        for seq in arrivals.get(step, []):
            sched.add(seq)
        if step > 30 and not sched.has_unfinished():
            break
        if rng.random() < 0.03 and (sched.running or sched.waiting):
            victim = rng.choice(sched.running + sched.waiting)
            sched.abort(victim.request_id)
            aborted.add(victim.request_id)
        batch = _run_step(sched, runner, max_tokens)
        assert batch.num_batched_tokens <= budget and len(batch.seqs) <= sched.max_num_seqs
        assert len({s.request_id for s in batch.seqs}) == len(batch.seqs) and not batch.failed
        _check_page_accounting(sched)
    assert not sched.has_unfinished(), "schedule did not drain"
    assert sched.block_manager.num_free_blocks == num_blocks
    for seq in seqs:
        assert seq.is_finished and seq.block_table == []
        if seq.request_id not in aborted:
            assert seq.finish_reason == "length"
            assert seq.output_token_ids == _naive_output(seq.prompt_token_ids, max_tokens[seq.request_id])


def test_random_schedules_exercise_preemption_and_prefix_hits():
    """Guards the randomized test above against silently covering neither path."""
    preemptions = hits = 0
    for seed in range(8):
        rng = random.Random(seed)
        sched, runner = _engine(12, max_num_seqs=6, max_num_batched_tokens=16)
        shared = [rng.randrange(97) for _ in range(8)]
        max_tokens = {}
        for i in range(8):
            sched.add(Sequence(f"r{i}", shared + [rng.randrange(97) for _ in range(rng.randint(1, 6))]))
            max_tokens[f"r{i}"] = rng.randint(4, 12)
        while sched.has_unfinished():
            _run_step(sched, runner, max_tokens)
        preemptions += sched.num_preemptions
        hits += sched.block_manager.stats["prefix_hit_tokens"]
        assert sched.block_manager.num_free_blocks == 12
    assert preemptions > 0 and hits > 0
