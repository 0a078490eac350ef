"""How a read is split into tasks along GOPs (asyncframes._split): pure, no decoder, no Ray."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncframes._index import FrameIndex
from asyncframes._split import BALANCED_SHARE, Piece, chunk_shares, gop_starts, split

pytestmark = pytest.mark.pure


def test_gop_starts_are_the_frames_each_keyframe_presents():
    # B-frames: a keyframe's pts may come after frames shown before it; frame 0 is a start
    index = FrameIndex(pts=list(range(0, 100, 10)), seek_pts=[0, 40, 70])
    assert gop_starts(index) == [0, 4, 7]


def test_a_video_read_by_counting_has_one_start():
    assert gop_starts(FrameIndex(pts=[5, 1, 9], seek_pts=[], sequential=True, reason="no timestamps")) == [0]


def test_a_long_video_spreads_over_the_tasks_one_gop_never_split():
    tasks = split([np.arange(300)], [list(range(0, 300, 25))], tasks=4, min_frames=0)
    assert len(tasks) == 4
    gops = [{f // 25 for piece in task for f in piece.frames} for task in tasks]
    assert all(not (a & b) for k, a in enumerate(gops) for b in gops[k + 1 :])  # each GOP in one task


def test_a_short_video_is_not_cut_into_tasks_smaller_than_the_minimum():
    tasks = split([np.arange(300)], [list(range(0, 300, 60))], tasks=8, min_frames=120)
    assert len(tasks) == 3  # not 5 tasks of one GOP each: 120, 120, 60 frames
    assert [sum(len(p.frames) for p in task) for task in tasks] == [120, 120, 60]
    assert len(split([np.arange(3000)], [list(range(0, 3000, 60))], tasks=8, min_frames=120)) in (8, 9)  # long: about as asked


def test_duplicates_are_decoded_once_and_give_their_rows():
    (task,) = split([np.array([7, 3, 7, 7, 0])], [[0]], tasks=3)
    assert task == [Piece(0, (0, 3, 7), (1, 1, 3))]


def test_small_videos_share_a_task():
    tasks = split([np.arange(5), np.arange(5), np.arange(90)], [[0], [0], [0, 30, 60]], tasks=4)
    assert [p.video for p in tasks[0]][:2] == [0, 1] and len(tasks) <= 4


def test_nothing_asked_gives_no_task():
    assert split([np.array([], dtype=np.int64)], [[0]], tasks=2) == []


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    videos=st.integers(1, 4),
    tasks=st.integers(1, 9),
)
def test_every_requested_frame_comes_out_exactly_once_and_no_gop_is_split(data, videos, tasks):
    selections, starts = [], []
    for _ in range(videos):
        n = data.draw(st.integers(1, 200))
        gop = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=10)) if n > 1 else []) | {0})
        selections.append(np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=300)), dtype=np.int64))
        starts.append(gop)
    out = split(selections, starts, tasks)
    rows = [Counter() for _ in range(videos)]
    owner: dict[tuple[int, int], int] = {}
    for t, task in enumerate(out):
        for piece in task:
            assert list(piece.frames) == sorted(set(piece.frames))
            for f, r in zip(piece.frames, piece.repeats):
                rows[piece.video][f] += r
                gop = int(np.searchsorted(starts[piece.video], f, side="right")) - 1
                assert owner.setdefault((piece.video, gop), t) == t, "a GOP went to two tasks"
    assert rows == [Counter(s.tolist()) for s in selections]
    assert len(out) <= max(1, tasks) * 2  # about as many as asked: never one task per frame


@settings(max_examples=100, deadline=None)
@given(data=st.data(), videos=st.integers(1, 3), tasks=st.integers(1, 6))
def test_every_clip_goes_whole_to_exactly_one_task(data, videos, tasks):
    from asyncframes._split import split_clips

    n = 100
    starts = [list(range(0, n, data.draw(st.integers(1, 50)))) for _ in range(videos)]
    clips = [(data.draw(st.integers(0, videos - 1)), np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8))))
             for _ in range(data.draw(st.integers(0, 30)))]
    out = split_clips(clips, starts, tasks)
    assert sorted(k for task in out for k in task) == list(range(len(clips)))
    for task in out:  # a task's decoder moves forward: its clips by video, then first frame
        keys = [(clips[k][0], int(clips[k][1].min())) for k in task]
        assert keys == sorted(keys)


# -- one chunk over the server's decoder workers (chunk_shares) ---------------------------

GOP60 = list(range(0, 900, 60))


def test_a_chunk_of_an_in_order_stream_stays_with_one_decoder():
    # 64 frames of 60-frame GOPs, wherever the GOP boundary falls: the decoder that read the
    # chunk before goes on; a split would make the other seek back to a GOP's start
    for start in (0, 448, 832):
        assert chunk_shares(list(range(start, start + 64)), GOP60, workers=2) == {0: list(range(64))}


def test_an_in_order_chunk_of_keyframes_only_goes_in_consecutive_runs_one_per_worker():
    every_frame = list(range(300))  # MJPEG, ProRes, an image sequence
    assert chunk_shares(list(range(64, 128)), every_frame, workers=2) == {0: list(range(32)), 1: list(range(32, 64))}
    assert chunk_shares(list(range(296, 300)), np.arange(300), workers=3) == {0: [0, 1], 1: [2], 2: [3]}
    assert chunk_shares([5, 6], every_frame, workers=4) == {0: [0], 1: [1]}
    assert chunk_shares(list(range(64, 128)), every_frame, workers=2, balanced=None) == {0: list(range(32)), 1: list(range(32, 64))}
    # One frame in the chunk is not a keyframe: the rule for in-order chunks holds
    mostly = [s for s in every_frame if s != 100]
    assert chunk_shares(list(range(64, 128)), mostly, workers=2) == {0: list(range(64))}


def test_a_chunk_from_all_over_the_video_is_split_by_gop():
    idxs = [700, 10, 130, 65, 250, 11, 700, 190]  # GOPs 11, 0, 2, 1, 4, 0, 11, 3
    shares = chunk_shares(idxs, GOP60, workers=2)
    assert shares == {1: [0, 3, 6, 7], 0: [1, 2, 4, 5]}  # GOP g to worker g mod 2; duplicates together


def test_a_chunk_mostly_in_one_gop_stays_whole():
    # worker 0 would decode 60 of the 62 frames: a second decoder only competes for the CPUs
    idxs = [59, 58, 57, 56, 61] + list(range(0, 56))[::-1]
    assert chunk_shares(idxs, GOP60, workers=2) == {0: list(range(len(idxs)))}
    # counted from each GOP's start: frame 59 alone costs 60 frames of decoding, 62 costs 3
    assert chunk_shares([59, 62, 61, 60], GOP60, workers=2) == {0: [0, 1, 2, 3]}
    assert chunk_shares([59, 119], GOP60, workers=2) == {0: [0], 1: [1]}


def test_one_worker_one_frame_or_one_gop_is_never_split():
    assert chunk_shares([700, 10, 130], GOP60, workers=1) == {0: [0, 1, 2]}
    assert chunk_shares([700], GOP60, workers=4) == {0: [0]}
    assert chunk_shares([700, 10, 130], [0], workers=4) == {0: [0, 1, 2]}  # a video read by counting: one start


@settings(max_examples=200, deadline=None)
@given(data=st.data(), workers=st.integers(1, 5))
def test_every_position_goes_to_one_worker_and_a_gop_never_to_two(data, workers):
    n = data.draw(st.integers(1, 500))
    starts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=12)) if n > 1 else []) | {0})
    idxs = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=80))
    shares = chunk_shares(idxs, starts, workers)
    assert sorted(p for share in shares.values() for p in share) == list(range(len(idxs)))
    assert set(shares) <= set(range(workers))
    in_order = idxs == list(range(idxs[0], idxs[0] + len(idxs)))
    if in_order and set(idxs) <= set(starts) and len(idxs) > 1 and workers > 1:  # every frame a keyframe
        runs = [shares[w] for w in sorted(shares)]
        assert [p for run in runs for p in run] == list(range(len(idxs)))  # consecutive runs, in worker order
        assert len(runs) == min(workers, len(idxs)) and max(map(len, runs)) - min(map(len, runs)) <= 1
        return
    for worker, share in shares.items():
        if len(shares) > 1:
            gops = {int(np.searchsorted(starts, idxs[p], side="right")) - 1 for p in share}
            assert all(g % workers == worker for g in gops)
    if len(shares) > 1:  # split: evenly enough, counted from each GOP's start to its last frame needed
        load = Counter()
        last: dict[int, int] = {}
        for i in idxs:
            g = int(np.searchsorted(starts, i, side="right")) - 1
            last[g] = max(last.get(g, -1), i)
        for g, end in last.items():
            load[g % workers] += end - starts[g] + 1
        assert max(load.values()) <= BALANCED_SHARE * sum(load.values())


def test_worker_processes_split_every_chunk_of_several_gops():
    # balanced=None: in order or lopsided, by GOP all the same (the opt-in processes' way)
    assert chunk_shares(list(range(448, 512)), GOP60, workers=2, balanced=None) == {1: list(range(32)), 0: list(range(32, 64))}
    assert chunk_shares([59, 62, 61, 60], GOP60, workers=2, balanced=None) == {0: [0], 1: [1, 2, 3]}
