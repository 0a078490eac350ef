"""When each frame is played: presentation times in seconds, durations, and lookups by time.

Frame *i* is played at time *t* when ``pts_i <= t < pts_i + duration_i``. ``pts_i`` is the
presentation time a plain sequential decode gives frame *i* (PyAV's ``frame.time``); its
duration runs to the next frame's pts, and the last frame's is the average frame duration
(``1 / fps``), so the frames tile ``[begin, end)`` without gaps and every time in it is played
by exactly one frame. Pure: numbers in, numbers out.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional, Sequence

import attrs
import numpy as np

from .errors import FrameIndexError, VideoError


@attrs.frozen(eq=False)
class FrameTimes:
    """Every frame's presentation time and duration, in seconds, in frame order 0..n-1."""

    #: float64, frame i's presentation time (``frame.time`` of a sequential decode).
    pts_seconds: np.ndarray
    #: float64, how long frame i is shown (to the next frame; the last: ``1 / fps``).
    duration_seconds: np.ndarray
    #: The frame count the container's header states (None: it states none).
    num_frames_from_header: Optional[int] = None

    @property
    def num_frames(self) -> int:
        return len(self.pts_seconds)

    @property
    def begin_stream_seconds(self) -> float:
        """When the first frame is played."""
        return float(self.pts_seconds[0]) if self.num_frames else 0.0

    @property
    def end_stream_seconds(self) -> float:
        """When the last frame stops being played."""
        if not self.num_frames:
            return 0.0
        return float(self.pts_seconds[-1] + self.duration_seconds[-1])


def frame_times(
    pts: Sequence[Optional[int]],
    time_base: Optional[Fraction],
    average_rate: Optional[Fraction] = None,
    num_frames_from_header: Optional[int] = None,
) -> FrameTimes:
    """The times of frames whose presentation timestamps (in ``time_base`` units) are ``pts``.

    Args:
        pts: frame i's pts, in frame order (None: the frame has none; its time is NaN).
        time_base: seconds per pts unit (None: unknown; every time is NaN).
        average_rate: frames per second, for the last frame's duration (None or 0: the
            previous frame's duration, or 0 for a single frame).
        num_frames_from_header: the header's frame count, carried along (0 counts as none).

    Returns:
        The :class:`FrameTimes`. Seconds are computed as ``pts * num / den`` in float64, which
        is what PyAV's ``frame.time`` gives.
    """
    tb = Fraction(time_base) if time_base else Fraction(1)
    known = np.array([p is not None and time_base is not None for p in pts], dtype=bool)
    ticks = np.array([0 if p is None else p for p in pts], dtype=np.int64)
    seconds = ticks.astype(np.float64) * tb.numerator / tb.denominator
    seconds[~known] = np.nan
    durations = np.empty_like(seconds)
    if len(ticks) > 1:
        durations[:-1] = (ticks[1:] - ticks[:-1]).astype(np.float64) * tb.numerator / tb.denominator
        durations[:-1][~(known[1:] & known[:-1])] = np.nan
    if len(ticks):
        if average_rate:
            durations[-1] = 1.0 / float(average_rate)
        elif len(ticks) > 1:
            durations[-1] = durations[-2]
        else:
            durations[-1] = 0.0
    return FrameTimes(seconds, durations, num_frames_from_header or None)


def indices_played_at(times: FrameTimes, seconds: "float | Sequence[float] | np.ndarray", filename: str = "the video") -> np.ndarray:
    """The frame played at each of ``seconds``.

    Args:
        times: the video's frame times.
        seconds: one time or many, in seconds.
        filename: named in errors.

    Returns:
        An int64 array of frame indices, one per time (0-d for a single time).

    Raises:
        FrameIndexError: a time outside ``[begin, end)``, naming it and the range.
        VideoError: the video's timestamps do not order its frames (no time lookup possible).
    """
    _check_ordered(times, filename)
    t = np.asarray(seconds, dtype=np.float64)
    begin, end = times.begin_stream_seconds, times.end_stream_seconds
    bad = ~((t >= begin) & (t < end))  # NaN is bad too
    if np.any(bad):
        first = float(t.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]])
        raise FrameIndexError(f"time {first!r} s is not played in {filename}; its frames play in [{begin!r}, {end!r}) s")
    return np.searchsorted(times.pts_seconds, t, side="right").astype(np.int64) - 1


def indices_played_in_range(times: FrameTimes, start_seconds: float, stop_seconds: float, filename: str = "the video") -> range:
    """The frames played at some time in ``[start_seconds, stop_seconds)``.

    Args:
        times: the video's frame times.
        start_seconds: the first time; must be played (``begin <= start < end``).
        stop_seconds: the end of the range (not included), ``start <= stop <= end``.
        filename: named in errors.

    Returns:
        The frame indices, a range (empty when ``start == stop``).

    Raises:
        FrameIndexError: a bound outside the video's times, or ``stop < start``.
        VideoError: the video's timestamps do not order its frames.
    """
    _check_ordered(times, filename)
    begin, end = times.begin_stream_seconds, times.end_stream_seconds
    start, stop = float(start_seconds), float(stop_seconds)
    if not begin <= start < end:
        raise FrameIndexError(f"start time {start!r} s is not played in {filename}; its frames play in [{begin!r}, {end!r}) s")
    if not start <= stop <= end:
        raise FrameIndexError(f"stop time {stop!r} s must lie in [start {start!r}, end {end!r}] s for {filename}")
    if stop == start:
        return range(0)
    first = int(np.searchsorted(times.pts_seconds, start, side="right")) - 1
    last = int(np.searchsorted(times.pts_seconds, stop, side="left"))  # frames starting before stop
    return range(first, last)


def _check_ordered(times: FrameTimes, filename: str) -> None:
    pts = times.pts_seconds
    if not times.num_frames:
        raise FrameIndexError(f"{filename} has no frames to look up by time")
    if np.isnan(pts).any() or (len(pts) > 1 and not np.all(pts[1:] > pts[:-1])):
        raise VideoError(f"{filename}: frame timestamps are missing or out of order, so frames cannot be looked up by time")
