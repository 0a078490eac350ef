"""Which frames the clip samplers choose (asyncframes.samplers' pure half): counts, ranges,
order within a clip, the policies for clips past the end, seeds; errors name the bad value."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncframes._times import frame_times, indices_played_at
from asyncframes.samplers import clip_indices_random, clip_indices_regular, clip_times_random, clip_times_regular

pytestmark = pytest.mark.pure

#: 50 frames at irregular times (ms), average duration about 30 ms.
TIMES = frame_times(list(np.cumsum([500] + list(np.random.default_rng(3).integers(10, 50, 49)))), Fraction(1, 1000), Fraction(30))


@settings(max_examples=300, deadline=None)
@given(
    num_frames=st.integers(1, 400),
    num_clips=st.integers(1, 20),
    per_clip=st.integers(1, 12),
    between=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    regular=st.booleans(),
)
def test_clips_by_index_fit_the_video_in_order_with_their_stride(num_frames, num_clips, per_clip, between, seed, regular):
    span = 1 + (per_clip - 1) * between
    kwargs = dict(num_clips=num_clips, num_frames_per_clip=per_clip, num_indices_between_frames=between)
    if span > num_frames:
        with pytest.raises(ValueError, match="nothing to sample"):
            clip_indices_regular(num_frames, **kwargs)
        return
    if regular:
        idxs = clip_indices_regular(num_frames, **kwargs)
    else:
        idxs = clip_indices_random(num_frames, generator=np.random.default_rng(seed), **kwargs)
    assert idxs.shape == (num_clips, per_clip) and idxs.dtype == np.int64
    assert idxs.min() >= 0 and idxs.max() < num_frames
    assert np.all(np.diff(idxs, axis=1) == between)  # the default range keeps every clip inside
    assert np.all(np.diff(idxs[:, 0]) >= 0)  # clips in order of their start


def test_regular_clips_spread_over_the_sampling_range_and_random_ones_follow_the_seed():
    assert clip_indices_regular(100, num_clips=5, num_frames_per_clip=1).ravel().tolist() == [0, 24, 49, 74, 99]
    idxs = clip_indices_regular(100, num_clips=3, num_frames_per_clip=4, num_indices_between_frames=3)
    assert idxs[:, 0].tolist() == [0, 45, 90] and idxs[-1].tolist() == [90, 93, 96, 99]
    assert clip_indices_regular(100, num_clips=2, sampling_range_start=-10, sampling_range_end=-5).ravel().tolist() == [90, 94]
    one = clip_indices_random(1000, num_clips=8, num_frames_per_clip=2, generator=np.random.default_rng(5))
    again = clip_indices_random(1000, num_clips=8, num_frames_per_clip=2, generator=np.random.default_rng(5))
    np.testing.assert_array_equal(one, again)


def test_clips_past_the_end_repeat_their_last_frame_wrap_or_raise():
    kwargs = dict(num_clips=1, num_frames_per_clip=5, num_indices_between_frames=2, sampling_range_start=6, sampling_range_end=7)
    assert clip_indices_regular(10, **kwargs).tolist() == [[6, 8, 8, 8, 8]]
    assert clip_indices_regular(10, policy="wrap", **kwargs).tolist() == [[6, 8, 6, 8, 6]]
    with pytest.raises(ValueError, match="frame index past the last frame 9: 10"):
        clip_indices_regular(10, policy="error", **kwargs)
    with pytest.raises(ValueError, match="policy must be one of 'repeat_last', 'wrap', 'error', got 'loop'"):
        clip_indices_regular(10, policy="loop", **kwargs)


@pytest.mark.parametrize(
    "kwargs, complaint",
    [
        (dict(num_clips=0), "num_clips must be a positive integer, got 0"),
        (dict(num_frames_per_clip=1.5), "num_frames_per_clip must be a positive integer, got 1.5"),
        (dict(num_indices_between_frames=True), "num_indices_between_frames must be a positive integer, got True"),
        (dict(sampling_range_start=5, sampling_range_end=5), r"clip starts must lie in \[5, 5\)"),
        (dict(num_frames_per_clip=11), "a clip spans 11 frames"),
        (dict(sampling_range_start=1.5), "sampling_range_start must be an integer frame index, got 1.5"),
    ],
)
def test_bad_sampling_parameters_name_the_value(kwargs, complaint):
    with pytest.raises(ValueError, match=complaint):
        clip_indices_random(10, **kwargs)


@settings(max_examples=200, deadline=None)
@given(
    num_clips=st.integers(1, 10),
    per_clip=st.integers(1, 8),
    between=st.floats(0.001, 0.2),
    seed=st.integers(0, 2**32 - 1),
)
def test_clips_by_time_are_played_times_in_order(num_clips, per_clip, between, seed):
    span = (per_clip - 1) * between
    if TIMES.begin_stream_seconds >= TIMES.end_stream_seconds - span:
        return
    t = clip_times_random(
        TIMES, num_clips=num_clips, num_frames_per_clip=per_clip, seconds_between_frames=between, generator=np.random.default_rng(seed)
    )
    assert t.shape == (num_clips, per_clip)
    assert t.min() >= TIMES.begin_stream_seconds and t.max() < TIMES.end_stream_seconds
    idxs = indices_played_at(TIMES, t)  # every time is played
    assert np.all(np.diff(idxs, axis=1) >= 0) and np.all(np.diff(t[:, 0]) >= 0)


def test_regular_clips_by_time_start_every_interval_until_the_range_ends():
    begin, end = TIMES.begin_stream_seconds, TIMES.end_stream_seconds
    t = clip_times_regular(TIMES, seconds_between_clip_starts=0.25, num_frames_per_clip=3, seconds_between_frames=0.1)
    expected_starts = begin + 0.25 * np.arange(int(np.ceil((end - 0.2 - begin) / 0.25)))
    np.testing.assert_allclose(t[:, 0], expected_starts)
    np.testing.assert_allclose(t[:, 2] - t[:, 0], 0.2)
    default = clip_times_regular(TIMES, seconds_between_clip_starts=0.5, num_frames_per_clip=2)
    np.testing.assert_allclose(default[:, 1] - default[:, 0], np.mean(TIMES.duration_seconds))  # the average frame duration
    late = clip_times_regular(
        TIMES, seconds_between_clip_starts=1.0, num_frames_per_clip=3, seconds_between_frames=0.5, sampling_range_start=end - 0.6, sampling_range_end=end
    )
    np.testing.assert_allclose(late, [[end - 0.6, end - 0.1, end - 0.1]])  # repeat_last
    with pytest.raises(ValueError, match="seconds_between_clip_starts must be > 0, got 0"):
        clip_times_regular(TIMES, seconds_between_clip_starts=0)
    with pytest.raises(ValueError, match="seconds_between_frames must be > 0, got -0.1"):
        clip_times_random(TIMES, seconds_between_frames=-0.1)
    with pytest.raises(ValueError, match="nothing to sample"):
        clip_times_random(TIMES, sampling_range_start=end)
