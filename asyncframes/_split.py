"""How a read of many frames is split into tasks along keyframe (GOP) boundaries.

Everything that decides which task decodes which frames lives here, so that the rule
"each GOP is decoded by one task, and each requested frame comes out exactly once" has
one home and pure tests beside it (``tests/test_split.py``). No av, no Ray, no I/O: the
caller gives each video's selected frames and where its GOPs start, and gets the pieces
of work back. :mod:`asyncframes.ray` turns them into Ray Data read tasks.
"""

from __future__ import annotations

from typing import Optional, Sequence

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


def _gop_numbers(begins: np.ndarray, frames: "np.ndarray | int") -> np.ndarray:
    """The GOP holding each of ``frames``, numbered as ``begins`` (GOP start frames, sorted)
    counts them; -1 for a frame before the first start."""
    return np.searchsorted(begins, frames, side="right") - 1


def _gop_start(begins: np.ndarray, frame: int) -> int:
    """Where the GOP holding ``frame`` starts (the first start, for a frame before it)."""
    return int(begins[max(int(_gop_numbers(begins, frame)), 0)])


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
        which = _gop_numbers(begins, frames)
        cuts = np.flatnonzero(np.diff(which)) + 1
        for part, counts in zip(np.split(frames, cuts), np.split(repeats, cuts)):
            begin = _gop_start(begins, int(part[0]))
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


#: A chunk is spread over the server's decoder workers only when none of them would have more
#: than this share of its decoding. A chunk of frames from all over a video (random, shuffled)
#: splits evenly, and two decoders on 2 CPUs read it 1.04-1.36x (random) and 1.07-1.27x
#: (shuffled) as fast as one.
BALANCED_SHARE = 0.75


def chunk_shares(
    idxs: Sequence[int], starts: Sequence[int], workers: int, balanced: Optional[float] = BALANCED_SHARE
) -> dict[int, list[int]]:
    """Which positions of one chunk's ``idxs`` each of ``workers`` decoder workers reads.

    Args:
        idxs: the chunk's frame indices (any order, duplicates allowed).
        starts: where the video's GOPs start (:func:`gop_starts`), sorted (a list or an array).
        workers: decoder workers (1: the chunk is not split).
        balanced: the largest share of the decoding one worker may have for the chunk to be
            split (see :data:`BALANCED_SHARE`); None: split every chunk of several GOPs,
            in-order ones too (what the opt-in worker processes do).

    Returns:
        ``{worker: positions in idxs}``. GOP *g* always goes to worker *g mod workers*, so
        a GOP whose frames come in several chunks stays with one decoder. A worker's
        decoding is counted from each of its GOPs' start to the last frame it needs there.
        A chunk that would not split evenly enough stays whole, with worker 0, and so does
        a chunk of consecutive frames (an in-order stream): the decoder that read the
        chunk before goes on without seeking, where a split makes another one seek back to
        a GOP's start (on 2 CPUs, in-order streams split by GOP ran 0.92-0.96x of one decoder).
        Except where every frame of an in-order chunk is a keyframe (MJPEG, ProRes, an image
        sequence): no worker seeks back then, and the chunk goes in consecutive runs, one per
        worker, each read without a seek inside it (in process on 2 CPUs, two decoders on
        halves ran 1.45x one on MJPEG, 1.2x on ProRes, 1.0x on FFV1; by GOP, every other frame
        to each, 0.8-0.9x, each decoding the frames between its own).
    """
    whole = {0: list(range(len(idxs)))}
    if workers < 2 or len(idxs) < 2 or len(starts) < 2:
        return whole
    first = int(idxs[0])
    begins = np.asarray(starts, dtype=np.int64)
    if all(int(i) == first + k for k, i in enumerate(idxs)):
        if _all_keyframes(begins, first, len(idxs)):
            runs = np.array_split(np.arange(len(idxs)), min(workers, len(idxs)))
            return {worker: run.tolist() for worker, run in enumerate(runs)}
        if balanced is not None:
            return whole
    gops = _gop_numbers(begins, np.asarray(idxs, dtype=np.int64))
    last: dict[int, int] = {}
    for gop, i in zip(gops.tolist(), idxs):
        last[gop] = max(last.get(gop, -1), int(i))
    load = [0] * workers
    for gop, end in last.items():
        load[gop % workers] += end - int(begins[max(gop, 0)]) + 1
    if balanced is not None and max(load) > balanced * sum(load):
        return whole
    shares: dict[int, list[int]] = {}
    for pos, gop in enumerate(gops.tolist()):
        shares.setdefault(gop % workers, []).append(pos)
    return shares


def _all_keyframes(begins: np.ndarray, first: int, count: int) -> bool:
    """Whether each of the ``count`` frames from ``first`` on starts a GOP (``begins``: the
    sorted GOP starts, distinct)."""
    g = int(_gop_numbers(begins, first))
    return g >= 0 and int(begins[g]) == first and g + count <= len(begins) and int(begins[g + count - 1]) == first + count - 1


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
        begin = _gop_start(begins, first)
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
