"""Frame times and lookups by time (asyncframes._times): pure, on made-up timestamps.

Frame i is played at t when pts_i <= t < pts_i + duration_i; durations run to the next pts
and the last one is the average frame duration, so every time in [begin, end) has one frame.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncframes._times import FrameTimes, frame_times, indices_played_at, indices_played_in_range
from asyncframes.errors import FrameIndexError, VideoError

pytestmark = pytest.mark.pure

#: Irregular (variable frame rate) timestamps in milliseconds, starting late.
VFR = frame_times([1000, 1040, 1100, 1110, 1300], Fraction(1, 1000), Fraction(20))


def test_times_are_pts_in_seconds_and_durations_run_to_the_next_frame():
    np.testing.assert_array_equal(VFR.pts_seconds, [1.0, 1.04, 1.1, 1.11, 1.3])
    np.testing.assert_allclose(VFR.duration_seconds, [0.04, 0.06, 0.01, 0.19, 0.05])  # last: 1 / 20 fps
    assert (VFR.begin_stream_seconds, VFR.num_frames) == (1.0, 5)
    assert VFR.end_stream_seconds == pytest.approx(1.35)


def test_seconds_are_what_pyav_frame_time_computes():
    tb = Fraction(1, 90000)
    pts = [0, 3003, 6006, 2**40 + 1]
    times = frame_times(pts, tb, Fraction(30000, 1001))
    assert list(times.pts_seconds) == [float(p) * tb.numerator / tb.denominator for p in pts]
    assert list(times.pts_seconds) == [float(Fraction(p) * tb) for p in pts]


def test_the_last_frames_duration_without_a_rate_is_the_one_before_and_a_lone_frame_has_none():
    np.testing.assert_allclose(frame_times([0, 2, 5], Fraction(1, 10)).duration_seconds, [0.2, 0.3, 0.3])
    assert list(frame_times([7], Fraction(1, 10)).duration_seconds) == [0.0]
    assert frame_times([7], Fraction(1, 10), num_frames_from_header=0).num_frames_from_header is None


def test_a_frame_is_played_from_its_pts_up_to_but_not_at_the_next():
    assert list(indices_played_at(VFR, [1.0, 1.0399, 1.04, 1.105, 1.11, 1.2999, 1.3, 1.3499])) == [0, 0, 1, 2, 3, 3, 4, 4]
    assert indices_played_at(VFR, 1.05).shape == ()  # one time, one index


@pytest.mark.parametrize("t", [0.999, 1.35, 2.0, -1.0, float("nan"), float("inf")])
def test_a_time_outside_the_video_names_it_and_the_valid_range(t):
    with pytest.raises(FrameIndexError, match=r"time .* s is not played in clip.mp4; its frames play in \[1.0, 1.35") as info:
        indices_played_at(VFR, [1.0, t], "clip.mp4")
    assert repr(t) in str(info.value)
    assert isinstance(info.value, IndexError)


def test_a_range_holds_every_frame_played_in_it():
    assert indices_played_in_range(VFR, 1.0, 1.35) == range(0, 5)
    assert indices_played_in_range(VFR, 1.05, 1.1) == range(1, 2)  # frame 2 starts at the (excluded) stop
    assert indices_played_in_range(VFR, 1.05, 1.1001) == range(1, 3)
    assert indices_played_in_range(VFR, 1.2, 1.2) == range(0)
    for start, stop, complaint in [(0.5, 1.1, "start time 0.5"), (1.35, 1.35, "start time 1.35"), (1.1, 1.05, "stop time 1.05"), (1.1, 1.4, "stop time 1.4")]:
        with pytest.raises(FrameIndexError, match=complaint):
            indices_played_in_range(VFR, start, stop)


def test_timestamps_that_do_not_order_frames_refuse_time_lookups():
    unknown = frame_times([0, None, 2], Fraction(1, 10))
    assert np.isnan(unknown.pts_seconds[1]) and np.isnan(unknown.duration_seconds[0])
    disordered = FrameTimes(np.array([0.0, 0.2, 0.1]), np.array([0.1, 0.1, 0.1]))
    for times in (unknown, disordered, frame_times([1, 2], None)):
        with pytest.raises(VideoError, match="cannot be looked up by time"):
            indices_played_at(times, 0.1)
    with pytest.raises(FrameIndexError, match="no frames"):
        indices_played_in_range(frame_times([], Fraction(1, 10)), 0.0, 1.0)


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 5000), min_size=1, max_size=60),
    first=st.integers(-10_000, 10_000),
    den=st.sampled_from([1000, 90000, 30000, 12800]),
    probe=st.floats(0, 1, allow_nan=False),
)
def test_every_time_in_the_video_is_played_by_exactly_the_frame_whose_interval_holds_it(gaps, first, den, probe):
    pts = list(np.cumsum([first] + gaps))
    times = frame_times(pts, Fraction(1, den), Fraction(den, gaps[0]))
    t = times.begin_stream_seconds + probe * (times.end_stream_seconds - times.begin_stream_seconds)
    if not t < times.end_stream_seconds:
        return
    (i,) = indices_played_at(times, [t])
    assert times.pts_seconds[i] <= t
    assert i == times.num_frames - 1 or t < times.pts_seconds[i + 1]
    assert t < times.pts_seconds[i] + times.duration_seconds[i] or i < times.num_frames - 1
    assert list(indices_played_at(times, times.pts_seconds)) == list(range(times.num_frames))  # each pts plays its frame
