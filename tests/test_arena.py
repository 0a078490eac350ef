"""The memory a server keeps frames in: arena slots, the warmer, the recent-frames cache's spares, and a request's frame cache over an arena (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncframes._arena import FrameArena, Warmer
from asyncframes._pool import WARM_AHEAD_FRAMES, RecentFrames

FRAME = (48, 64, 3)  # 9 KiB: more than a page, so slots are page-released whole
FRAME_BYTES = int(np.prod(FRAME))


@pytest.fixture
def warmer():
    w = Warmer()
    yield w
    w.close()


def test_a_slot_given_back_is_the_next_one_taken():
    arena = FrameArena(FRAME, np.uint8, capacity=3)
    slot, view = arena.take()
    view[...] = 7
    arena.give_back(slot)
    again, same = arena.take_warm()
    assert again == slot and same is view and (same == 7).all()
    assert arena.used == 1 and arena.resident_bytes == arena.stride


def test_an_arena_hands_out_its_capacity_and_no_more():
    arena = FrameArena(FRAME, np.uint8, capacity=2)
    (a, va), (b, vb) = arena.take(), arena.take()
    assert a != b and not np.shares_memory(va, vb)
    assert arena.take() is None and arena.take_warm() is None
    with pytest.raises(ValueError, match="capacity must be at least 1, not 0"):
        FrameArena(FRAME, np.uint8, capacity=0)


def test_released_memory_no_longer_counts_and_reads_as_fresh():
    arena = FrameArena(FRAME, np.uint8, capacity=2)
    slot, view = arena.take()
    view[...] = 9
    arena.give_back(slot)
    assert arena.release() == arena.stride and arena.resident_bytes == 0
    assert arena.release() == 0  # nothing warm is left to give back
    again, same = arena.take()
    assert again == slot and not same.reshape(-1)[:8192].any()  # its whole pages were given back: zero-filled anew


def test_the_warmer_runs_a_step_until_it_says_it_is_done(warmer):
    done = []

    def step() -> bool:
        done.append(len(done))
        return len(done) < 5

    warmer.ask(step)
    assert warmer.wait_done(timeout=10)
    assert done == [0, 1, 2, 3, 4]
    warmer.ask(lambda: 1 / 0)  # a step that fails only stops itself
    assert warmer.wait_done(timeout=10)


def test_a_recent_cache_writes_spares_ahead_while_it_is_not_full(warmer):
    recent = RecentFrames(max_bytes=100 * FRAME_BYTES, warmer=warmer)
    recent.put("k", 0, np.full(FRAME, 1, np.uint8))
    assert warmer.wait_done(timeout=10)
    assert recent.spare_bytes == WARM_AHEAD_FRAMES * FRAME_BYTES
    spares = list(recent._spares[(FRAME, "|u1")])
    recent.put("k", 1, np.full(FRAME, 2, np.uint8))  # into a spare written ahead; the warmer writes another
    assert any(recent.get("k", 1) is spare for spare in spares) and (recent.get("k", 1) == 2).all()
    assert warmer.wait_done(timeout=10)
    assert recent.spare_bytes == WARM_AHEAD_FRAMES * FRAME_BYTES and recent.nbytes == 2 * FRAME_BYTES


def test_a_small_cache_writes_no_more_spares_than_its_budget(warmer):
    recent = RecentFrames(max_bytes=3 * FRAME_BYTES + 10, warmer=warmer)
    for i in range(5):
        recent.put("k", i, np.full(FRAME, i, np.uint8))
        assert warmer.wait_done(timeout=10)
        assert recent.nbytes + recent.spare_bytes <= recent.max_bytes
    assert len(recent) == 3 and [i for i in range(5) if recent.has("k", i)] == [2, 3, 4]
    assert [int(recent.get("k", i)[0, 0, 0]) for i in (2, 3, 4)] == [2, 3, 4]


def test_frames_of_a_new_shape_take_the_room_of_spares_first(warmer):
    small, large = (48, 64, 3), (96, 64, 3)
    recent = RecentFrames(max_bytes=4 * int(np.prod(small)), warmer=warmer)
    recent.put("a", 0, np.full(small, 7, np.uint8))
    assert warmer.wait_done(timeout=10) and recent.spare_bytes == 3 * int(np.prod(small))  # the rest of the budget
    recent.put("b", 0, np.full(large, 5, np.uint8))  # two spares go, frame "a" 0 stays
    assert recent.nbytes + recent.spare_bytes <= recent.max_bytes
    assert (recent.get("b", 0) == 5).all() and (recent.get("a", 0) == 7).all()


@st.composite
def _puts(draw):
    shapes = draw(st.lists(st.sampled_from([(8, 8, 3), (16, 8, 3), (48, 64, 3), (40, 40, 1)]), min_size=1, max_size=3, unique=True))
    return draw(st.lists(st.tuples(st.integers(0, len(shapes) - 1), st.integers(0, 12)), min_size=1, max_size=40)), shapes


@settings(max_examples=150, deadline=None)
@given(_puts(), st.integers(1, 6))
def test_the_recent_cache_keeps_exact_frames_within_its_budget(puts_shapes, frames_budget):
    """Whatever the shapes and order: every frame kept reads as it was put (memory reused
    never shows another frame's pixels), the least recently used go first, and the frames
    stay within the budget."""
    puts, shapes = puts_shapes
    max_bytes = frames_budget * 48 * 64 * 3
    recent = RecentFrames(max_bytes)
    model: dict[tuple[int, int], int] = {}  # (shape, frame) -> fill value, in use order
    for step, (s, i) in enumerate(puts):
        key = (s, i)
        frame = np.full(shapes[s], step % 251, np.uint8)
        if recent.has(shapes[s], i):
            assert (recent.get(shapes[s], i) == model[key]).all()
            model[key] = model.pop(key)  # used: now the most recent
            continue
        recent.put(shapes[s], i, frame)
        if frame.nbytes > max_bytes:
            assert not recent.has(shapes[s], i)
            continue
        model[key] = step % 251
        while sum(int(np.prod(shapes[k[0]])) for k in model) > max_bytes:
            del model[next(iter(model))]
        assert recent.nbytes <= max_bytes
        assert sorted((shapes[s_], j) for s_, j in model) == sorted(k for k in recent._frames)
        for (s_, j), value in model.items():
            assert (recent._frames[(shapes[s_], j)] == value).all()


# -- a request's frame cache over an arena ------------------------------------------------


def test_a_frame_cache_writes_a_new_frame_over_one_no_longer_wanted():
    from asyncframes._reader import FrameCache

    frames = [np.full(FRAME, i, np.uint8) for i in range(3)]
    cache = FrameCache(max_bytes=10 * FRAME_BYTES, finish_gops=False)
    cache.want(later=[0, 1])
    cache.offer(0, frames[0])
    cache.offer(1, frames[1])
    first = cache.get(0)
    assert (first == 0).all() and not np.shares_memory(first, frames[0])  # a copy, never the caller's buffer
    cache.want(later=[1, 2])  # frame 0 is let go of ...
    cache.offer(2, frames[2])
    assert cache.get(0) is None and np.shares_memory(cache.get(2), first)  # ... and frame 2 takes its memory
    assert (cache.get(2) == 2).all() and (cache.get(1) == 1).all() and cache.nbytes == 2 * FRAME_BYTES


def test_a_frame_given_a_place_is_kept_only_once_written():
    from asyncframes._reader import FrameCache

    cache = FrameCache(max_bytes=2 * FRAME_BYTES, finish_gops=False)
    cache.want(later=[4, 5, 6])
    place = cache.place(4, FRAME)
    assert place is not None and cache.get(4) is None and not cache.accepts(4, FRAME_BYTES)
    place[...] = 4
    cache.keep(4, place)
    assert (cache.get(4) == 4).all()
    spot = cache.place(5, FRAME)
    assert spot is not None and cache.place(6, FRAME) is None  # the budget counts a place given
    cache.abandon(5)  # its decoding failed: the place goes back
    assert cache.get(5) is None and cache.nbytes == FRAME_BYTES and cache.place(6, FRAME) is not None


def test_a_frame_cache_grown_past_its_arena_still_keeps_frames():
    from asyncframes._reader import FrameCache

    cache = FrameCache(max_bytes=FRAME_BYTES, finish_gops=False)
    cache.want(later=[0, 1, 2])
    cache.offer(0, np.full(FRAME, 0, np.uint8))
    cache.resize(3 * FRAME_BYTES)
    cache.offer(1, np.full(FRAME, 1, np.uint8))
    cache.offer(2, np.full(FRAME, 2, np.uint8))
    assert [int(cache.get(i)[0, 0, 0]) for i in range(3)] == [0, 1, 2]
    cache.want(later=[])
    assert len(cache) == 0 and cache.nbytes == 0
