"""Clip samplers in torchcodec's shape: clips of frames at random or regular places, by index or by time.

>>> import asyncframes
>>> from asyncframes.samplers import clips_at_random_indices
>>> with asyncframes.open("clip.mp4") as reader:
...     clips = clips_at_random_indices(reader, num_clips=4, num_frames_per_clip=8, seed=0)
...     clips.data.shape          # (4, 8, h, w, c)

A clip is ``num_frames_per_clip`` frames, ``num_indices_between_frames`` apart (by index) or
``seconds_between_frames`` apart (by time: the frames played at those times). Where clips
start is chosen by a pure function of the video's length or times (``clip_indices_*``,
``clip_times_*``, no I/O); the frames of every clip are then fetched in one chunked request,
each distinct frame once. Clips come in order of their start; frames within a clip in order.

A clip that would run past the end follows ``policy``: ``"repeat_last"`` (default) repeats
its last frame inside the video, ``"wrap"`` repeats its frames inside the video from its start,
``"error"`` raises.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._frame_reader import FrameBatch, FrameReader
from ._times import FrameTimes, indices_played_at

__all__ = [
    "clip_indices_random",
    "clip_indices_regular",
    "clip_times_random",
    "clip_times_regular",
    "clips_at_random_indices",
    "clips_at_random_timestamps",
    "clips_at_regular_indices",
    "clips_at_regular_timestamps",
]

POLICIES = ("repeat_last", "wrap", "error")


# -- which frames (pure) ----------------------------------------------------------------------


def clip_indices_random(
    num_frames: int,
    *,
    num_clips: int = 1,
    num_frames_per_clip: int = 1,
    num_indices_between_frames: int = 1,
    sampling_range_start: int = 0,
    sampling_range_end: Optional[int] = None,
    policy: str = "repeat_last",
    generator: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """Frame indices of ``num_clips`` clips starting at random (uniformly, with replacement).

    Args:
        num_frames: the video's frame count.
        num_clips: how many clips (>= 1).
        num_frames_per_clip: frames per clip (>= 1).
        num_indices_between_frames: stride within a clip (>= 1).
        sampling_range_start: the first index a clip may start at (negative: from the end).
        sampling_range_end: clips start before this index (negative: from the end; None: the
            last start whose clip fits in the video).
        policy: ``"repeat_last"``, ``"wrap"`` or ``"error"``, for clips that run past the end.
        generator: the random source (None: a fresh unseeded one).

    Returns:
        An int64 array ``(num_clips, num_frames_per_clip)``, clips sorted by start.

    Raises:
        ValueError: a count or stride below 1, an empty sampling range, an unknown policy, or
            (policy ``"error"``) a clip past the end; each names the value and what is allowed.
    """
    start, end = _index_range(num_frames, num_frames_per_clip, num_indices_between_frames, sampling_range_start, sampling_range_end)
    _positive(num_clips, "num_clips")
    rng = generator if generator is not None else np.random.default_rng()
    starts = np.sort(rng.integers(start, end, size=num_clips, dtype=np.int64))
    return _clips_from_starts(starts, num_frames, num_frames_per_clip, num_indices_between_frames, policy)


def clip_indices_regular(
    num_frames: int,
    *,
    num_clips: int = 1,
    num_frames_per_clip: int = 1,
    num_indices_between_frames: int = 1,
    sampling_range_start: int = 0,
    sampling_range_end: Optional[int] = None,
    policy: str = "repeat_last",
) -> np.ndarray:
    """Frame indices of ``num_clips`` clips whose starts are spread evenly over the sampling range
    (``linspace(start, end - 1, num_clips)``, rounded down).

    Args: as :func:`clip_indices_random`, without ``generator``.

    Returns:
        An int64 array ``(num_clips, num_frames_per_clip)``, clips sorted by start.

    Raises:
        ValueError: as :func:`clip_indices_random`.
    """
    start, end = _index_range(num_frames, num_frames_per_clip, num_indices_between_frames, sampling_range_start, sampling_range_end)
    _positive(num_clips, "num_clips")
    starts = np.floor(np.linspace(start, end - 1, num_clips)).astype(np.int64)
    return _clips_from_starts(starts, num_frames, num_frames_per_clip, num_indices_between_frames, policy)


def clip_times_random(
    times: FrameTimes,
    *,
    num_clips: int = 1,
    num_frames_per_clip: int = 1,
    seconds_between_frames: Optional[float] = None,
    sampling_range_start: Optional[float] = None,
    sampling_range_end: Optional[float] = None,
    policy: str = "repeat_last",
    generator: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """Times (seconds) of the frames of ``num_clips`` clips starting at uniformly random times.

    Args:
        times: the video's frame times.
        num_clips: how many clips (>= 1).
        num_frames_per_clip: frames per clip (>= 1).
        seconds_between_frames: time between a clip's frames (> 0; None: the average frame
            duration).
        sampling_range_start: the earliest start (None: the first frame's pts).
        sampling_range_end: clips start before this time (None: the last start whose clip
            ends inside the video).
        policy: for clip times at or past the video's end (see the module).
        generator: the random source (None: a fresh unseeded one).

    Returns:
        A float64 array ``(num_clips, num_frames_per_clip)`` of times, each played by a frame.

    Raises:
        ValueError: a count below 1, a non-positive spacing, an empty sampling range, an
            unknown policy, or (``"error"``) a time past the end.
    """
    _positive(num_clips, "num_clips")
    start, end, between = _time_range(times, num_frames_per_clip, seconds_between_frames, sampling_range_start, sampling_range_end)
    rng = generator if generator is not None else np.random.default_rng()
    starts = np.sort(rng.uniform(start, end, size=num_clips))
    return _clip_times_from_starts(starts, times, num_frames_per_clip, between, policy)


def clip_times_regular(
    times: FrameTimes,
    *,
    seconds_between_clip_starts: float,
    num_frames_per_clip: int = 1,
    seconds_between_frames: Optional[float] = None,
    sampling_range_start: Optional[float] = None,
    sampling_range_end: Optional[float] = None,
    policy: str = "repeat_last",
) -> np.ndarray:
    """Times of the frames of clips starting every ``seconds_between_clip_starts`` from the
    sampling range's start, while before its end.

    Args: as :func:`clip_times_random`, with ``seconds_between_clip_starts`` (> 0) instead of
        ``num_clips`` and ``generator``.

    Returns:
        A float64 array ``(num_clips, num_frames_per_clip)``.

    Raises:
        ValueError: as :func:`clip_times_random`, or a non-positive ``seconds_between_clip_starts``.
    """
    if not float(seconds_between_clip_starts) > 0:
        raise ValueError(f"seconds_between_clip_starts must be > 0, got {seconds_between_clip_starts!r}")
    start, end, between = _time_range(times, num_frames_per_clip, seconds_between_frames, sampling_range_start, sampling_range_end)
    count = int(np.ceil((end - start) / float(seconds_between_clip_starts)))
    starts = start + np.arange(max(count, 1), dtype=np.float64) * float(seconds_between_clip_starts)
    starts = starts[starts < end]
    return _clip_times_from_starts(starts, times, num_frames_per_clip, between, policy)


# -- clips (one request each) ---------------------------------------------------------------


def clips_at_random_indices(
    reader: FrameReader,
    *,
    num_clips: int = 1,
    num_frames_per_clip: int = 1,
    num_indices_between_frames: int = 1,
    sampling_range_start: int = 0,
    sampling_range_end: Optional[int] = None,
    policy: str = "repeat_last",
    seed: Optional[int] = None,
    generator: Optional[np.random.Generator] = None,
) -> FrameBatch:
    """Clips starting at random frame indices.

    Args:
        reader: an open :class:`FrameReader` (``asyncframes.open(video)``).
        num_clips, num_frames_per_clip, num_indices_between_frames, sampling_range_start,
            sampling_range_end, policy: as :func:`clip_indices_random`.
        seed: seeds a fresh generator (ignored when ``generator`` is given).
        generator: a ``numpy.random.Generator`` to draw from.

    Returns:
        A :class:`FrameBatch` with ``data`` ``(num_clips, num_frames_per_clip, h, w, c)`` and
        ``pts_seconds``, ``duration_seconds``, ``indices`` ``(num_clips, num_frames_per_clip)``.

    Raises:
        ValueError: as :func:`clip_indices_random`.
        VideoError, ServerError, ...: what reading the frames raised.
    """
    idxs = clip_indices_random(
        len(reader),
        num_clips=num_clips,
        num_frames_per_clip=num_frames_per_clip,
        num_indices_between_frames=num_indices_between_frames,
        sampling_range_start=sampling_range_start,
        sampling_range_end=sampling_range_end,
        policy=policy,
        generator=_rng(seed, generator),
    )
    return _fetch(reader, idxs)


def clips_at_regular_indices(
    reader: FrameReader,
    *,
    num_clips: int = 1,
    num_frames_per_clip: int = 1,
    num_indices_between_frames: int = 1,
    sampling_range_start: int = 0,
    sampling_range_end: Optional[int] = None,
    policy: str = "repeat_last",
) -> FrameBatch:
    """Clips whose starts are spread evenly over the sampling range (see :func:`clip_indices_regular`).

    Returns:
        A :class:`FrameBatch` as :func:`clips_at_random_indices`.

    Raises:
        ValueError: as :func:`clip_indices_random`.
    """
    idxs = clip_indices_regular(
        len(reader),
        num_clips=num_clips,
        num_frames_per_clip=num_frames_per_clip,
        num_indices_between_frames=num_indices_between_frames,
        sampling_range_start=sampling_range_start,
        sampling_range_end=sampling_range_end,
        policy=policy,
    )
    return _fetch(reader, idxs)


def clips_at_random_timestamps(
    reader: FrameReader,
    *,
    num_clips: int = 1,
    num_frames_per_clip: int = 1,
    seconds_between_frames: Optional[float] = None,
    sampling_range_start: Optional[float] = None,
    sampling_range_end: Optional[float] = None,
    policy: str = "repeat_last",
    seed: Optional[int] = None,
    generator: Optional[np.random.Generator] = None,
) -> FrameBatch:
    """Clips starting at random times; each clip holds the frames played at its times.

    Args:
        reader: an open :class:`FrameReader`.
        num_clips, num_frames_per_clip, seconds_between_frames, sampling_range_start,
            sampling_range_end, policy: as :func:`clip_times_random`.
        seed: seeds a fresh generator (ignored when ``generator`` is given).
        generator: a ``numpy.random.Generator`` to draw from.

    Returns:
        A :class:`FrameBatch` as :func:`clips_at_random_indices` (``pts_seconds`` are the
        frames' own times, not the sampled times).

    Raises:
        ValueError: as :func:`clip_times_random`.
    """
    t = clip_times_random(
        reader.frame_times,
        num_clips=num_clips,
        num_frames_per_clip=num_frames_per_clip,
        seconds_between_frames=seconds_between_frames,
        sampling_range_start=sampling_range_start,
        sampling_range_end=sampling_range_end,
        policy=policy,
        generator=_rng(seed, generator),
    )
    return _fetch(reader, _indices_at(reader, t))


def clips_at_regular_timestamps(
    reader: FrameReader,
    *,
    seconds_between_clip_starts: float,
    num_frames_per_clip: int = 1,
    seconds_between_frames: Optional[float] = None,
    sampling_range_start: Optional[float] = None,
    sampling_range_end: Optional[float] = None,
    policy: str = "repeat_last",
) -> FrameBatch:
    """Clips starting every ``seconds_between_clip_starts`` (see :func:`clip_times_regular`).

    Returns:
        A :class:`FrameBatch` as :func:`clips_at_random_indices`.

    Raises:
        ValueError: as :func:`clip_times_regular`.
    """
    t = clip_times_regular(
        reader.frame_times,
        seconds_between_clip_starts=seconds_between_clip_starts,
        num_frames_per_clip=num_frames_per_clip,
        seconds_between_frames=seconds_between_frames,
        sampling_range_start=sampling_range_start,
        sampling_range_end=sampling_range_end,
        policy=policy,
    )
    return _fetch(reader, _indices_at(reader, t))


# -- helpers --------------------------------------------------------------------------------


def _rng(seed: Optional[int], generator: Optional[np.random.Generator]) -> np.random.Generator:
    return generator if generator is not None else np.random.default_rng(seed)


def _positive(value: object, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _integer(value: object, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer frame index, got {value!r}")
    return int(value)


def _policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    return policy


def _index_range(
    num_frames: int, per_clip: int, between: int, start: int, end: Optional[int]
) -> tuple[int, int]:
    """The half-open range of clip starts, checked."""
    per_clip = _positive(per_clip, "num_frames_per_clip")
    between = _positive(between, "num_indices_between_frames")
    span = 1 + (per_clip - 1) * between
    start = _integer(start, "sampling_range_start")
    end = None if end is None else _integer(end, "sampling_range_end")
    if start < 0:
        start += num_frames
    if end is None:
        end = num_frames - span + 1
    elif end < 0:
        end += num_frames
    end = min(end, num_frames)
    if not 0 <= start < end:
        raise ValueError(
            f"nothing to sample: clip starts must lie in [{start}, {end}) within the video's {num_frames} frames "
            f"(a clip spans {span} frames); widen sampling_range_start/end or shorten the clips"
        )
    return start, end


def _clips_from_starts(starts: np.ndarray, num_frames: int, per_clip: int, between: int, policy: str) -> np.ndarray:
    _policy(policy)
    idxs = starts[:, None] + np.arange(per_clip, dtype=np.int64)[None, :] * between
    return _apply_policy(idxs, idxs < num_frames, policy, f"frame index past the last frame {num_frames - 1}")


def _apply_policy(values: np.ndarray, inside: np.ndarray, policy: str, what: str) -> np.ndarray:
    """Values outside the video replaced per ``policy`` (inside: a prefix of each clip)."""
    if inside.all():
        return values
    if policy == "error":
        bad = values[~inside][0].item()
        raise ValueError(f"a clip runs past the end ({what}: {bad!r}) and policy is 'error'; use 'repeat_last' or 'wrap'")
    out = values.copy()
    valid = inside.sum(axis=1)  # every clip's first value is inside (its start is)
    for c in np.flatnonzero(valid < values.shape[1]):
        k = int(valid[c])
        j = np.arange(k, values.shape[1])
        out[c, k:] = values[c, k - 1] if policy == "repeat_last" else values[c, j % k]
    return out


def _time_range(
    times: FrameTimes, per_clip: int, between: Optional[float], start: Optional[float], end: Optional[float]
) -> tuple[float, float, float]:
    per_clip = _positive(per_clip, "num_frames_per_clip")
    if between is None:
        between = float(np.mean(times.duration_seconds)) if times.num_frames else 0.0
    between = float(between)
    if not between > 0:
        raise ValueError(f"seconds_between_frames must be > 0, got {between!r}")
    begin, stop = times.begin_stream_seconds, times.end_stream_seconds
    lo = begin if start is None else float(start)
    hi = stop - (per_clip - 1) * between if end is None else float(end)
    hi = min(hi, stop)
    if not begin <= lo < hi:
        raise ValueError(
            f"nothing to sample: clip starts must lie in [{lo!r}, {hi!r}) s within the video's [{begin!r}, {stop!r}) s "
            f"(a clip spans {(per_clip - 1) * between!r} s); widen sampling_range_start/end or shorten the clips"
        )
    return lo, hi, between


def _clip_times_from_starts(starts: np.ndarray, times: FrameTimes, per_clip: int, between: float, policy: str) -> np.ndarray:
    _policy(policy)
    t = starts[:, None] + np.arange(per_clip, dtype=np.float64)[None, :] * between
    end = times.end_stream_seconds
    return _apply_policy(t, t < end, policy, f"time at or after the end {end!r} s")


def _indices_at(reader: FrameReader, t: np.ndarray) -> np.ndarray:
    return indices_played_at(reader.frame_times, t, reader.video.filename).reshape(t.shape)


def _fetch(reader: FrameReader, idxs: np.ndarray) -> FrameBatch:
    """Every clip's frames in one request (each distinct frame once), shaped as clips."""
    flat = reader.get_frames_at(idxs.reshape(-1))
    shape = idxs.shape
    return FrameBatch(
        data=flat.data.reshape(shape + flat.data.shape[1:]),
        pts_seconds=flat.pts_seconds.reshape(shape),
        duration_seconds=flat.duration_seconds.reshape(shape),
        indices=flat.indices.reshape(shape),
    )
