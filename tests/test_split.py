"""How a read is split into tasks along GOPs (asyncframes._split): pure, no decoder, no Ray."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncframes._index import FrameIndex
from asyncframes._split import Piece, gop_starts, split

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
