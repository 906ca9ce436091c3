"""BlockManager: budget sizing, reference counts, chained-hash prefix reuse and LRU eviction.

Small pages (4 tokens) keep the hand-worked cases readable; expected page counts and reuse lengths are
worked out from the rules (ceil(tokens / page), whole matching pages only, at least one token left).
"""

from __future__ import annotations

import pytest

from model_worker.engine.block_manager import BLOCK_SIZE, BlockManager
from model_worker.engine.sequence import Sequence, SequenceStatus

BS = 4


def _seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, list(tokens))


def _computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """Pretend the runner computed every token of seq, then register its full pages."""
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_full_pages(seq)
    return seq


def _admit(bm: BlockManager, request_id: str, tokens: list[int]) -> Sequence:
    seq = _seq(request_id, tokens)
    assert bm.allocate_prompt(seq)
    return seq


def test_blocks_for_budget_is_floor_of_budget_over_page_bytes():
    assert BlockManager.blocks_for_budget(656 * 61 * 64 * 10 + 5, 656 * 61) == 10
    assert BlockManager.blocks_for_budget(1000, 10, block_size=4) == 25
    with pytest.raises(ValueError, match="budget_bytes"):
        BlockManager.blocks_for_budget(656 * 64 - 1, 656)
    with pytest.raises(ValueError, match="bytes_per_token"):
        BlockManager.blocks_for_budget(10**6, 0)


def test_bad_constructor_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, block_size=0)


def test_fresh_prompt_gets_ceil_pages_and_nothing_computed():
    bm = BlockManager(8, BS)
    seq = _admit(bm, "a", list(range(9)))
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    assert bm.num_free_blocks == 5
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)


def test_second_request_reuses_shared_full_pages_and_refcounts_them():
    bm = BlockManager(16, BS)
    a = _computed(bm, _admit(bm, "a", list(range(10))))  # pages [0..3], [4..7] full; [8, 9] partial
    b = _admit(bm, "b", list(range(8)) + [50, 51, 52])
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert [bm.ref_count(p) for p in b.block_table] == [2, 2, 1]
    assert bm.stats["prefix_hit_tokens"] == 8 and bm.stats["prefix_queries_tokens"] == 10 + 11


def test_same_page_tokens_under_a_different_prefix_do_not_match():
    bm = BlockManager(16, BS)
    _computed(bm, _admit(bm, "a", [9, 9, 9, 9, 5, 6, 7, 8, 0]))
    b = _admit(bm, "b", [5, 6, 7, 8, 1])  # b's first page has the tokens of a's second page
    assert b.num_computed_tokens == 0 and bm.stats["prefix_hit_tokens"] == 0


def test_a_fully_cached_prompt_still_computes_its_last_page():
    bm = BlockManager(16, BS)
    a = _computed(bm, _admit(bm, "a", list(range(12))))
    b = _admit(bm, "b", list(range(8)))  # both pages cached: the last one must be recomputed
    assert b.num_computed_tokens == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] not in a.block_table
    c = _admit(bm, "c", list(range(12)))
    assert c.num_computed_tokens == 8 and c.num_uncomputed_tokens == 4


def test_preempted_sequence_reuses_pages_of_its_generated_tokens():
    bm = BlockManager(16, BS)
    seq = _seq("a", [1, 2, 3])
    seq.token_ids += [4, 5, 6, 7, 8]  # 5 generated tokens
    assert bm.allocate_prompt(seq)
    _computed(bm, seq)
    bm.free(seq)
    seq.num_computed_tokens = 0
    seq.token_ids.append(9)
    assert bm.allocate_prompt(seq)
    assert seq.num_computed_tokens == 8 and seq.num_cached_tokens == 3  # only prompt tokens count as cached


def test_allocate_prompt_failure_changes_nothing():
    bm = BlockManager(4, BS)
    a = _computed(bm, _admit(bm, "a", list(range(8))))
    bm.free(a)  # 2 evictable cached pages + 2 free
    held = _admit(bm, "held", [90, 91, 92, 93, 94])  # takes the 2 free pages
    stats = dict(bm.stats)
    big = _seq("big", list(range(8)) + list(range(100, 112)))  # reuses 2 cached pages, needs 3 fresh
    assert not bm.allocate_prompt(big)
    assert big.block_table == [] and big.num_computed_tokens == 0
    assert bm.num_free_blocks == 2 and bm.stats == stats and bm.num_cached_blocks == 2
    assert all(bm.ref_count(p) == 1 for p in held.block_table)


def test_reused_evictable_pages_do_not_count_as_free_for_the_rest():
    bm = BlockManager(3, BS)
    a = _computed(bm, _admit(bm, "a", list(range(9))))  # 2 registered pages + 1 partial
    bm.free(a)  # all 3 free for allocation (2 of them evictable)
    assert bm.num_free_blocks == 3
    b = _seq("b", list(range(8)) + list(range(20, 28)))  # reuses 2 pages, needs 2 fresh: only 1 left
    assert not bm.allocate_prompt(b)
    c = _seq("c", list(range(8)) + [20, 21, 22])  # reuses 2, needs 1 fresh
    assert bm.allocate_prompt(c) and c.num_computed_tokens == 8 and bm.num_free_blocks == 0


def test_eviction_takes_free_pages_first_then_lru_unreferenced_cached_pages():
    bm = BlockManager(4, BS)
    a = _computed(bm, _admit(bm, "a", list(range(8))))  # 2 full pages: p0 = [0..3], p1 = [4..7]
    p0, p1 = a.block_table
    bm.free(a)
    b = _admit(bm, "b", [50] * 12)  # the 2 free pages, then evicts a's tail page (LRU end of the chain)
    assert set(b.block_table) == {p1} | (set(range(4)) - {p0, p1}) and bm.stats["evictions"] == 1
    bm.free(b)  # b computed nothing: its pages go straight back to the free list
    c = _admit(bm, "c", list(range(4)) + [60])  # a's first page is still cached
    assert c.block_table[0] == p0 and c.num_computed_tokens == 4
    assert bm.ensure_slots(c, 16) and bm.num_free_blocks == 0
    # every page is referenced now, cached p0 included: allocation fails instead of stealing one
    assert not bm.allocate_prompt(_seq("d", [70]))
    assert bm.ref_count(p0) == 1 and bm.stats["evictions"] == 1


def test_reused_page_becomes_most_recently_used():
    bm = BlockManager(4, BS)
    x = _computed(bm, _admit(bm, "x", [1, 1, 1, 1, 1]))
    y = _computed(bm, _admit(bm, "y", [2, 2, 2, 2, 2]))
    x_page, y_page = x.block_table[0], y.block_table[0]
    bm.free(x)
    bm.free(y)  # LRU order: x's page, then y's
    x2 = _admit(bm, "x2", [1, 1, 1, 1, 7])
    assert x2.block_table[0] == x_page
    bm.free(x2)  # x's page is now the most recent
    z = _admit(bm, "z", [3] * 12)  # 2 free pages + 1 eviction: y's page goes, x's stays cached
    assert y_page in z.block_table and x_page not in z.block_table and bm.stats["evictions"] == 1
    bm.free(z)
    assert _admit(bm, "x3", [1, 1, 1, 1, 8]).num_computed_tokens == 4


def test_ensure_slots_appends_pages_or_changes_nothing():
    bm = BlockManager(3, BS)
    seq = _admit(bm, "a", [1, 2, 3])
    assert bm.ensure_slots(seq, 4) and len(seq.block_table) == 1
    assert bm.ensure_slots(seq, 9) and len(seq.block_table) == 3
    table = list(seq.block_table)
    assert not bm.ensure_slots(seq, 13) and seq.block_table == table
    with pytest.raises(ValueError, match="num_tokens"):
        bm.ensure_slots(seq, -1)


def test_shared_page_survives_one_owner_being_freed():
    bm = BlockManager(8, BS)
    a = _computed(bm, _admit(bm, "a", list(range(6))))
    b = _admit(bm, "b", list(range(6)))
    shared = a.block_table[0]
    assert b.block_table[0] == shared and bm.ref_count(shared) == 2
    bm.free(a)
    assert bm.ref_count(shared) == 1 and a.block_table == []
    assert bm.num_free_blocks == 8 - 2
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.ref_count(shared) == 0


def test_duplicate_page_content_is_not_registered_twice():
    bm = BlockManager(8, BS)
    a = _admit(bm, "a", list(range(6)))
    b = _admit(bm, "b", list(range(6)))  # admitted before a committed: no reuse
    assert b.num_computed_tokens == 0 and b.block_table[0] != a.block_table[0]
    _computed(bm, a)
    _computed(bm, b)
    assert bm.num_cached_blocks == 1
    a_page = a.block_table[0]
    bm.free(b)
    bm.free(a)
    c = _admit(bm, "c", list(range(6)))
    assert c.block_table[0] == a_page and c.num_computed_tokens == 4


def test_prefix_caching_disabled_never_reuses():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = _computed(bm, _admit(bm, "a", list(range(9))))
    b = _admit(bm, "b", list(range(9)))
    assert b.num_computed_tokens == 0 and not set(a.block_table) & set(b.block_table)
    assert bm.num_cached_blocks == 0 and bm.stats["prefix_queries_tokens"] == 0


def test_thousand_token_prefix_is_reused_with_default_pages():
    bm = BlockManager(64)
    prefix = [(7 * i) % 1000 for i in range(1000)]
    _computed(bm, _admit(bm, "a", prefix + [1, 2, 3]))
    b = _admit(bm, "b", prefix + [4, 5, 6, 7])
    assert BLOCK_SIZE == 64 and b.num_computed_tokens == (1000 // 64) * 64
    assert b.num_uncomputed_tokens == 1004 - 960


def test_allocating_a_sequence_that_holds_pages_is_an_error():
    bm = BlockManager(8, BS)
    seq = _admit(bm, "a", [1, 2])
    with pytest.raises(ValueError, match="seq"):
        bm.allocate_prompt(seq)


def test_sequence_starts_as_a_copy_of_its_prompt_and_validates_input():
    prompt = [5, 6, 7]
    seq = Sequence("r", prompt)
    seq.token_ids.append(8)
    assert prompt == [5, 6, 7] and seq.output_token_ids == [8] and seq.num_uncomputed_tokens == 4
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Sequence("r", [])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Sequence("r", [1, -2])
    with pytest.raises(ValueError, match="request_id"):
        Sequence("", [1])
    with pytest.raises(TypeError, match="sampling"):
        Sequence("r", [1], sampling={"max_tokens": 3})
