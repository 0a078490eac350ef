"""Streaming frames with AsyncVideo, as a SLEAP user would."""

from __future__ import annotations

import time

import numpy as np
import pytest

from asyncframes import AsyncVideo, Video

from .conftest import assert_frames_exact, reference_frames, shuffled_with_duplicates


def test_sleap_story_centered_pair_in_chunks_of_23(centered_pair):
    with AsyncVideo.from_video(centered_pair, frames_per_chunk=23) as av:
        chunks = list(av.chunks)
    assert [len(idxs) for idxs, _ in chunks] == [23] * 47 + [19]
    assert [i for idxs, _ in chunks for i in idxs] == list(range(1100))
    for idxs, frames in chunks:
        assert frames.shape == (len(idxs), 384, 384, 1) and frames.dtype == np.uint8
    assert_frames_exact(centered_pair, chunks[20][0], chunks[20][1])


def test_sleap_story_small_robot_every_other_frame(small_robot):
    with AsyncVideo.from_video(small_robot, frame_idxs=range(0, 10, 2)) as av:
        chunks = list(av.chunks)
    assert len(chunks) == 1
    idxs, frames = chunks[0]
    assert idxs == [0, 2, 4, 6, 8]
    assert frames.shape == (5, 320, 560, 3)
    assert_frames_exact(small_robot, idxs, frames)


@pytest.mark.parametrize("name", ["centered_pair_small.mp4", "small_robot.mp4"])
def test_shared_videos_shuffled_with_duplicates_are_pixel_exact(client, name):
    from .conftest import shared_video

    path = shared_video(name)
    n = len(reference_frames(path))
    idxs = shuffled_with_duplicates(n, 100, seed=3)[:400]
    client.load_by_chunk(path, idxs, frames_per_chunk=37)
    received = []
    for chunk_idxs, frames in client.chunks:
        assert_frames_exact(path, chunk_idxs, frames)
        received += chunk_idxs
    assert received == idxs


@pytest.mark.parametrize("name", ["h264_bframes_longgop.mp4", "h264_vfr.mp4", "vp9.webm", "h264.mkv", "h264.ts", "hevc.mp4"])
def test_generated_videos_shuffled_with_duplicates_are_pixel_exact(client, make_clip, name):
    path = make_clip(name)
    n = len(reference_frames(path))
    idxs = shuffled_with_duplicates(n, 50, seed=11)
    client.load_by_chunk(Video.from_filename(path, grayscale=False), idxs, frames_per_chunk=16)
    received = []
    for chunk_idxs, frames in client.chunks:
        assert frames.shape[1:] == (96, 128, 3)
        assert_frames_exact(path, chunk_idxs, frames)
        received += chunk_idxs
    assert received == idxs


@pytest.mark.parametrize(
    "frame_idxs",
    [[3, 1, 2], range(1, 4), np.array([3, 1, 2], dtype=np.int32), np.array([1, 2, 3], dtype=np.uint16), [np.int64(2), 3]],
    ids=["list", "range", "int32-array", "uint16-array", "numpy-scalars"],
)
def test_frame_idxs_accept_lists_ranges_and_numpy(client, make_clip, frame_idxs):
    path = make_clip("gray.mp4")
    client.load_by_chunk(path, frame_idxs)
    (idxs, frames), = list(client.chunks)
    assert idxs == [int(i) for i in frame_idxs] and all(type(i) is int for i in idxs)
    assert_frames_exact(path, idxs, frames)


def test_grayscale_option_overrides_detection(client, make_clip):
    path = make_clip("gray.mp4")
    client.load_by_chunk(Video.from_filename(path, grayscale=False), [4])
    (_, rgb), = list(client.chunks)
    client.load_by_chunk(Video.from_filename(path), [4])
    (_, gray), = list(client.chunks)
    assert rgb.shape[-1] == 3 and gray.shape[-1] == 1
    np.testing.assert_array_equal(rgb[..., :1], gray)


def test_every_frame_when_no_indices_are_given(client, make_clip):
    path = make_clip("h264.mkv")
    client.load_by_chunk(path, frames_per_chunk=30)
    chunks = list(client.chunks)
    assert [len(i) for i, _ in chunks] == [30, 30, 20]
    assert client.done


def test_a_progress_bar_knows_the_total(client, make_clip):
    from tqdm import tqdm

    path = make_clip("h264.mkv")  # 80 frames
    client.load_by_chunk(path, frames_per_chunk=30)  # every frame: the client asks the server how many
    assert len(client.chunks) == 3
    with tqdm(client.chunks, disable=True) as bar:
        assert bar.total == 3 and [len(i) for i, _ in bar] == [30, 30, 20]
    client.load_by_chunk(path, range(0, 80, 7), frames_per_chunk=4)  # 12 frames
    chunks = client.chunks
    assert len(chunks) == 3
    next(chunks)
    assert len(chunks) == 2 and len(list(chunks)) == 2 and len(chunks) == 0


def test_an_empty_request_yields_nothing(client, make_clip):
    client.load_by_chunk(make_clip("gray.mp4"), [])
    assert list(client.chunks) == []
    assert client.done


def test_a_gui_polls_without_blocking(make_clip):
    path = make_clip("h264_gops.mp4")
    with AsyncVideo() as av:
        av.load_by_chunk(path, frames_per_chunk=10)
        start = time.monotonic()
        assert av.next_chunk(timeout=0) is None  # nothing decoded yet, and we did not wait
        assert time.monotonic() - start < 0.1
        received, slowest = [], 0.0
        deadline = time.monotonic() + 30
        while not av.done:
            assert time.monotonic() < deadline
            start = time.monotonic()
            chunk = av.next_chunk(timeout=0)
            slowest = max(slowest, time.monotonic() - start)
            if chunk is None:
                time.sleep(0.005)  # the GUI would draw here
                continue
            received += chunk.frame_idxs
        assert received == list(range(150))
        assert slowest < 0.5, f"a non-blocking poll took {slowest:.3f} s"
        assert av.next_chunk(timeout=0) is None


def test_a_new_request_replaces_the_one_in_flight(client, make_clip):
    long_clip = make_clip("h264_gops.mp4")
    client.load_by_chunk(long_clip, frames_per_chunk=5)
    first = next(iter(client.chunks))
    assert first.frame_idxs == [0, 1, 2, 3, 4]
    path = make_clip("gray.mp4")
    client.load_by_chunk(path, [7, 8])
    (idxs, frames), = list(client.chunks)
    assert idxs == [7, 8]
    assert_frames_exact(path, idxs, frames)


def test_two_async_videos_stream_at_the_same_time(make_clip):
    a_path, b_path = make_clip("h264_gops.mp4"), make_clip("vp9.webm")
    with AsyncVideo.from_video(a_path, frames_per_chunk=10) as a, AsyncVideo.from_video(b_path, frames_per_chunk=7) as b:
        assert a.server_pid == b.server_pid  # the process's one private server serves both
        streams = {a_path: (a.chunks, []), b_path: (b.chunks, [])}
        while streams:  # strictly alternate between the two until both are done
            for path in list(streams):
                chunks, got = streams[path]
                chunk = next(chunks, None)
                if chunk is None:
                    finished = streams.pop(path)[1]
                    assert finished == list(range(len(reference_frames(path))))
                    continue
                assert_frames_exact(path, chunk.frame_idxs, chunk.frames)
                got += chunk.frame_idxs


def test_info_reports_metadata(client, centered_pair):
    info = client.info(centered_pair)
    assert (info.frame_count, info.height, info.width, info.channels, info.grayscale) == (1100, 384, 384, 1, True)
    assert info.fps == pytest.approx(15) and info.codec == "h264"


def test_frames_are_ordinary_writable_arrays(client, make_clip):
    """Zero-copy views of the received message that the caller owns: writing to one touches nothing else."""
    path = make_clip("gray.mp4")
    client.load_by_chunk(path, [0, 0], frames_per_chunk=1)
    (_, first), (_, second) = list(client.chunks)
    first[0, 0, 0, 0] ^= 0xFF
    assert first[0, 0, 0, 0] != second[0, 0, 0, 0]
    assert_frames_exact(path, [0], second)
