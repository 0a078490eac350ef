"""How a read of many frames is split into tasks along keyframe (GOP) boundaries.

Everything that decides which task decodes which frames lives here, so that the rule
"each GOP is decoded by one task, and each requested frame comes out exactly once" has
one home and pure tests beside it (``tests/test_split.py``). No av, no Ray, no I/O: the
caller gives each video's selected frames and where its GOPs start, and gets the pieces
of work back. :mod:`asyncframes.ray` turns them into Ray Data read tasks.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import numpy as np

from ._index import FrameIndex


@attrs.frozen
class Piece:
    """Frames of one video that one task decodes: sorted, each once, with how many rows each gives.

    ``video`` is the video's position in the read's list; ``frames`` never straddle a GOP
    boundary that another piece of the same video also touches.
    """

    video: int
    frames: tuple[int, ...]
    repeats: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Rows this piece gives (a frame asked for twice gives two rows)."""
        return sum(self.repeats)


def gop_starts(index: FrameIndex) -> list[int]:
    """The frame indices where a decoder can start (one per keyframe), ``[0]`` first.

    An index that finds frames by counting (``sequential``) has one start: frame 0, since
    such a video can only be decoded from its beginning.
    """
    if index.sequential or not index.seek_pts:
        return [0]
    starts = sorted({index.first_at_or_after(pts) for pts in index.seek_pts} | {0})
    return [s for s in starts if s < index.frame_count]


#: The fewest frames to decode a read task is given while there is more to split: below that,
#: starting a task and opening its file cost more than spreading the work saves.
MIN_TASK_FRAMES = 120


def split(
    selections: Sequence[np.ndarray], starts: Sequence[Sequence[int]], tasks: int, min_frames: int = MIN_TASK_FRAMES
) -> list[list[Piece]]:
    """Split the selected frames of every video into at most about ``tasks`` tasks.

    Args:
        selections: per video, the frame indices asked for (any order, duplicates allowed).
        starts: per video, where its GOPs start (:func:`gop_starts`).
        tasks: how many tasks to aim for (Ray's parallelism); at least 1.
        min_frames: fewer tasks, if need be, so that each has about this many frames
            to decode (a short video is not cut into tasks of a GOP each).

    Returns:
        The tasks, each a list of pieces in video order. A GOP's frames all go to one
        task; tasks are balanced by frames to decode (from each GOP's start to the last
        frame needed in it); every selected frame is in exactly one piece, with its count.
    """
    units: list[tuple[int, np.ndarray, np.ndarray, int]] = []  # (video, frames, repeats, cost)
    for v, (selected, gop) in enumerate(zip(selections, starts)):
        frames, repeats = np.unique(np.asarray(selected, dtype=np.int64), return_counts=True)
        if not len(frames):
            continue
        begins = np.asarray(gop, dtype=np.int64)
        which = np.searchsorted(begins, frames, side="right") - 1
        cuts = np.flatnonzero(np.diff(which)) + 1
        for part, counts in zip(np.split(frames, cuts), np.split(repeats, cuts)):
            begin = int(begins[max(int(np.searchsorted(begins, part[0], side="right")) - 1, 0)])
            units.append((v, part, counts, int(part[-1]) - begin + 1))
    if not units:
        return []
    total = sum(cost for *_, cost in units)
    target = max(total / max(1, tasks), min_frames)
    out: list[list[Piece]] = []
    current: list[tuple[int, np.ndarray, np.ndarray]] = []
    load = 0
    for v, part, counts, cost in units:
        if current and load + cost / 2 > target:
            out.append(_pieces(current))
            current, load = [], 0
        current.append((v, part, counts))
        load += cost
    out.append(_pieces(current))
    return out


def split_clips(clips: Sequence[tuple[int, np.ndarray]], starts: Sequence[Sequence[int]], tasks: int) -> list[list[int]]:
    """Split clips into at most about ``tasks`` tasks, each clip whole in one task.

    Args:
        clips: ``(video, frame indices)`` of each clip (indices in the order wanted).
        starts: per video, where its GOPs start (:func:`gop_starts`).
        tasks: how many tasks to aim for; at least 1.

    Returns:
        Per task, the positions of its clips in ``clips``, ordered by video and first frame
        (so a task's decoder moves forward); every clip in exactly one task, balanced by
        frames to decode (from the GOP start of a clip's first frame to its last frame).
    """
    order = sorted(range(len(clips)), key=lambda k: (clips[k][0], int(np.min(clips[k][1])) if len(clips[k][1]) else -1))
    costs = {}
    for k in order:
        v, idxs = clips[k]
        if not len(idxs):
            costs[k] = 0
            continue
        begins = np.asarray(starts[v], dtype=np.int64)
        first, last = int(np.min(idxs)), int(np.max(idxs))
        begin = int(begins[max(int(np.searchsorted(begins, first, side="right")) - 1, 0)])
        costs[k] = last - begin + 1
    if not order:
        return []
    target = sum(costs.values()) / max(1, tasks)
    out: list[list[int]] = [[]]
    load = 0
    for k in order:
        if out[-1] and load + costs[k] / 2 > target:
            out.append([])
            load = 0
        out[-1].append(k)
        load += costs[k]
    return out


def _pieces(units: list[tuple[int, np.ndarray, np.ndarray]]) -> list[Piece]:
    """Units of one task as pieces, one per video (its GOPs joined)."""
    pieces: list[Piece] = []
    for v, part, counts in units:
        if pieces and pieces[-1].video == v:
            last = pieces[-1]
            pieces[-1] = Piece(v, last.frames + tuple(part.tolist()), last.repeats + tuple(counts.tolist()))
        else:
            pieces.append(Piece(v, tuple(part.tolist()), tuple(counts.tolist())))
    return pieces
