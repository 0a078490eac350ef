"""User stories for the reader facade (asyncframes.open) and the clip samplers, on real server
processes. Every frame returned is compared with a sequential decode, every time with the
``frame.time`` that decode gives."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

import asyncframes
from asyncframes import FrameBatch, FrameReader, Video
from asyncframes.errors import AsyncFramesError, FrameIndexError, VideoError, VideoNotFoundError
from asyncframes.samplers import (
    clips_at_random_indices,
    clips_at_random_timestamps,
    clips_at_regular_indices,
    clips_at_regular_timestamps,
)

from .conftest import assert_frames_exact, reference_frames, shared_video, shuffled_with_duplicates


def reference_times(path: "str | Path") -> np.ndarray:
    """``frame.time`` of every frame of a sequential decode."""
    with av.open(str(path)) as container:
        return np.array([frame.time for frame in container.decode(video=0)], dtype=np.float64)


def played_at(times: np.ndarray, end: float, t: float) -> int:
    """The frame a sequential decode is showing at ``t``: the last whose time is <= t (before ``end``)."""
    assert times[0] <= t < end
    return int(np.flatnonzero(times <= t)[-1])


def assert_batch_exact(path: "str | Path", batch: FrameBatch, idxs) -> None:
    idxs = [int(i) for i in np.asarray(idxs).reshape(-1)]
    assert np.asarray(batch.indices).reshape(-1).tolist() == idxs
    data = batch.data.reshape((-1,) + batch.data.shape[-3:])
    assert_frames_exact(path, idxs, data)
    np.testing.assert_array_equal(np.asarray(batch.pts_seconds).reshape(-1), reference_times(path)[idxs])


def test_open_reads_frames_by_index_and_slice_like_an_array(make_clip):
    path = make_clip("h264_gops.mp4")
    ref = reference_frames(path)
    n = len(ref)
    with asyncframes.open(path, timeout=60) as reader:
        assert isinstance(reader, FrameReader) and len(reader) == n
        for i in (0, 1, 77, n - 1, -1, -n, -26):
            frame = reader[i]
            assert frame.shape == ref[0].shape and frame.dtype == np.uint8
            assert_frames_exact(path, [i % n], frame[None])
        for key in (slice(None), slice(5, 40, 3), slice(None, None, -13), slice(-10, None), slice(100, 50, -4), slice(3, 3), slice(140, 500, 2)):
            frames = reader[key]
            idxs = list(range(*key.indices(n)))
            assert frames.shape == (len(idxs),) + ref[0].shape
            assert_frames_exact(path, idxs, frames)
        for bad in (n, -n - 1, 10**9):
            with pytest.raises(FrameIndexError, match=rf"frame index {bad} is out of range; .* has {n} frames \(indices {-n}..{n - 1}\)"):
                reader[bad]
        for wrong in ("3", 2.0, True, None):
            with pytest.raises(TypeError, match="frame index must be an integer"):
                reader[wrong]
    with pytest.raises(AsyncFramesError, match="closed"):
        reader[0]


def test_get_frames_return_batches_with_times_in_the_order_asked(make_clip, client):
    path = make_clip("h264_bframes_longgop.mp4")
    times = reference_times(path)
    with FrameReader(Video(str(path)), client=client) as reader:
        idxs = shuffled_with_duplicates(len(reader), 40, seed=3)
        batch = reader.get_frames_at(idxs)
        assert len(batch) == len(idxs) and batch.data.flags.writeable
        assert_batch_exact(path, batch, idxs)
        np.testing.assert_allclose(batch.duration_seconds, np.diff(np.append(times, times[-1] + 1 / reader.metadata.average_fps))[idxs])
        negatives = reader.get_frames_at(np.array([-1, -150, 5], dtype=np.int16))
        assert_batch_exact(path, negatives, [149, 0, 5])
        assert reader.get_frames_at([]).data.shape == (0,) + reader[0].shape
        frame = reader.get_frame_at(-2)
        assert (frame.index, frame.pts_seconds) == (148, times[148])
        assert_frames_exact(path, [148], frame.data[None])
        assert_batch_exact(path, reader.get_frames_in_range(10, 100, 7), range(10, 100, 7))
        assert_batch_exact(path, reader.get_frames_in_range(0, 150), range(150))
        assert len(reader.get_frames_in_range(150, 150)) == 0
        with pytest.raises(FrameIndexError, match="frame index 150 is out of range"):
            reader.get_frames_at([3, 150])
        with pytest.raises(FrameIndexError, match="range 0:151 is outside"):
            reader.get_frames_in_range(0, 151)
        with pytest.raises(ValueError, match="step must be a positive integer, got 0"):
            reader.get_frames_in_range(0, 10, 0)
        with pytest.raises(TypeError, match="indices must be a 1-D sequence of integers"):
            reader.get_frames_at([[1, 2]])
    assert client.ping() >= 0  # a client given is left open


def test_lookups_by_time_on_variable_frame_rate_video_match_a_sequential_decode(make_clip, client):
    path = make_clip("h264_vfr.mp4")
    times = reference_times(path)
    assert len(set(np.round(np.diff(times), 3))) > 10  # really variable
    with FrameReader(path, client=client) as reader:
        meta = reader.metadata
        np.testing.assert_array_equal(reader.frame_times.pts_seconds, times)
        end = meta.end_stream_seconds
        assert (meta.begin_stream_seconds, meta.num_frames) == (times[0], len(times)) and end > times[-1]
        probes = np.concatenate([times, (times[:-1] + times[1:]) / 2, np.nextafter(times[1:], -np.inf), [np.nextafter(end, 0)]])
        batch = reader.get_frames_played_at(probes)
        expected = [played_at(times, end, t) for t in probes]
        assert_batch_exact(path, batch, expected)
        frame = reader.get_frame_played_at(float(times[10]) + 0.001)
        assert frame.index == 10 and frame.pts_seconds == times[10]
        for t in (float(times[0]) - 0.001, end, 1e9):
            with pytest.raises(FrameIndexError, match=rf"time {t!r} s is not played in .*h264_vfr.mp4; its frames play in \[{float(times[0])!r}, {end!r}\) s"):
                reader.get_frames_played_at(t)
        start, stop = float(times[20]) + 0.002, float(times[40])
        ranged = reader.get_frames_played_in_range(start, stop)
        assert_batch_exact(path, ranged, range(20, 40))
        assert_batch_exact(path, reader.get_frames_played_in_range(meta.begin_stream_seconds, end), range(len(times)))


@pytest.mark.parametrize("name", ["centered_pair_small.mp4", "small_robot.mp4"])
def test_real_videos_times_and_lookups_match_a_sequential_decode(name, client):
    path = shared_video(name)
    times = reference_times(path)
    with FrameReader(path, client=client) as reader:
        meta = reader.metadata
        np.testing.assert_array_equal(reader.frame_times.pts_seconds, times)
        assert meta.num_frames == len(times) == len(reader)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            header = stream.frames or None
            assert (meta.width, meta.height, meta.codec) == (stream.codec_context.width, stream.codec_context.height, stream.codec_context.name)
            assert meta.average_fps == pytest.approx(float(stream.average_rate))
        assert meta.num_frames_from_header == header
        assert meta.end_stream_seconds == pytest.approx(times[-1] + 1 / meta.average_fps)
        rng = np.random.default_rng(11)
        probes = rng.uniform(meta.begin_stream_seconds, meta.end_stream_seconds, 25)
        batch = reader.get_frames_played_at(probes)
        assert_batch_exact(path, batch, [played_at(times, meta.end_stream_seconds, t) for t in probes])


def test_metadata_counts_when_the_header_disagrees_with_the_frames(make_clip, client):
    edited = make_clip("h264_edit_list_discards.mp4")  # an edit list hides 7 of the 60 frames the header counts
    with FrameReader(edited, client=client) as reader:
        assert (reader.metadata.num_frames, reader.metadata.num_frames_from_header) == (53, 60) == (len(reference_frames(edited)), 60)
        np.testing.assert_array_equal(reader.frame_times.pts_seconds, reference_times(edited))
        assert_batch_exact(edited, reader.get_frames_played_at([0.0, 1.7]), [0, 51])
    webm = make_clip("vp9.webm")  # webm states no frame count
    with FrameReader(webm, client=client) as reader:
        assert (reader.metadata.num_frames, reader.metadata.num_frames_from_header) == (60, None)
        assert reader.metadata.duration_seconds == pytest.approx(reader.metadata.end_stream_seconds - reader.metadata.begin_stream_seconds)


def test_clip_samplers_fetch_exact_frames_shaped_as_clips(make_clip, client):
    path = make_clip("h264_vfr.mp4")
    times = reference_times(path)
    with FrameReader(path, client=client) as reader:
        clips = clips_at_random_indices(reader, num_clips=6, num_frames_per_clip=4, num_indices_between_frames=3, seed=1)
        assert clips.data.shape == (6, 4) + reader[0].shape and clips.indices.shape == (6, 4)
        assert_batch_exact(path, clips, clips.indices)
        again = clips_at_random_indices(reader, num_clips=6, num_frames_per_clip=4, num_indices_between_frames=3, seed=1)
        np.testing.assert_array_equal(again.indices, clips.indices)
        regular = clips_at_regular_indices(reader, num_clips=3, num_frames_per_clip=2)
        assert regular.indices[:, 0].tolist() == [0, 44, 88]
        assert_batch_exact(path, regular, regular.indices)
        end = reader.metadata.end_stream_seconds
        by_time = clips_at_random_timestamps(reader, num_clips=5, num_frames_per_clip=3, seconds_between_frames=0.1, seed=2)
        assert by_time.data.shape[:2] == (5, 3)
        assert_batch_exact(path, by_time, by_time.indices)
        every = clips_at_regular_timestamps(reader, seconds_between_clip_starts=1.0, num_frames_per_clip=2, seconds_between_frames=0.05)
        starts = times[0] + np.arange(len(every))
        assert every.indices[:, 0].tolist() == [played_at(times, end, t) for t in starts]
        assert_batch_exact(path, every, every.indices)
        clip = every[1]
        assert isinstance(clip, FrameBatch) and clip.indices.tolist() == every.indices[1].tolist()


def test_a_missing_video_is_our_error_and_leaves_no_server_behind(tmp_path):
    with pytest.raises(VideoNotFoundError):
        asyncframes.open(tmp_path / "absent.mp4", timeout=60)


def test_import_asyncframes_loads_neither_the_reader_nor_the_client_until_open_is_used():
    import subprocess
    import sys

    code = (
        "import builtins, sys, asyncframes\n"
        "loaded = sorted(m for m in sys.modules if m in ('asyncframes._frame_reader', 'asyncframes._client', 'zmq'))\n"
        "assert not loaded, loaded\n"
        "assert asyncframes.open.__module__ == 'asyncframes._frame_reader'\n"
        "from asyncframes import *\n"
        "assert open is builtins.open, 'a star import must not shadow the builtin open'\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_stream_without_timestamps_reads_by_index_and_refuses_lookups_by_time(make_clip, client):
    path = make_clip("h264_raw.h264")  # raw H.264: a sequential decode gives no frame.time
    with av.open(str(path)) as container:
        assert all(frame.time is None for frame in container.decode(video=0))
    with FrameReader(path, client=client) as reader:
        assert np.isnan(reader.frame_times.pts_seconds).all() and len(reader) == 50
        assert_frames_exact(path, [49, 0], reader[::-49])
        with pytest.raises(VideoError, match="cannot be looked up by time"):
            reader.get_frames_played_at(0.1)
