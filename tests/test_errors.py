"""Bad input gets a clear, specific exception quickly, and the same server keeps serving."""

from __future__ import annotations

import time

import av
import numpy as np
import pytest

from asyncframes import (
    AsyncFramesError,
    AsyncVideo,
    FrameIndexError,
    VideoDecodeError,
    VideoNotFoundError,
    VideoOpenError,
)

from .conftest import assert_frames_exact, reference_frames


def good_request_still_works(client, path):
    client.load_by_chunk(path, [3, 1])
    (idxs, frames), = list(client.chunks)
    assert idxs == [3, 1]
    assert_frames_exact(path, idxs, frames)


def raises_quickly(exc_type, match, fn):
    start = time.monotonic()
    with pytest.raises(exc_type, match=match) as info:
        fn()
    assert time.monotonic() - start < 5
    return info


def test_missing_file(client, make_clip, tmp_path):
    missing = tmp_path / "nope.mp4"
    client.load_by_chunk(missing)
    info = raises_quickly(VideoNotFoundError, "video not found: .*nope.mp4", lambda: list(client.chunks))
    assert isinstance(info.value, FileNotFoundError)  # also what plain Python code would catch
    good_request_still_works(client, make_clip("gray.mp4"))


def test_a_file_that_is_not_a_video(client, make_clip, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_bytes(b"definitely not a video\n" * 1000)
    client.load_by_chunk(text)
    raises_quickly(VideoOpenError, "not a readable video: .*notes.mp4", lambda: list(client.chunks))
    good_request_still_works(client, make_clip("gray.mp4"))


def test_an_index_past_the_end(client, make_clip):
    path = make_clip("gray.mp4")
    client.load_by_chunk(path, [0, 1, 40])
    raises_quickly(FrameIndexError, "frame index 40 is out of range.*40 frames", lambda: list(client.chunks))
    good_request_still_works(client, path)


def test_a_negative_index(client, make_clip):
    path = make_clip("gray.mp4")
    raises_quickly(FrameIndexError, "frame index -1 is negative", lambda: client.load_by_chunk(path, [0, -1]))
    good_request_still_works(client, path)


def test_info_on_a_missing_file(client, make_clip, tmp_path):
    raises_quickly(VideoNotFoundError, "not found", lambda: client.info(tmp_path / "gone.mkv"))
    assert client.info(make_clip("gray.mp4")).frame_count == 40


@pytest.mark.parametrize("bad", [[1.5, 2.0], ["1"], [[1, 2]], 7, [True, False]])
def test_indices_that_are_not_integers_are_a_type_error(client, make_clip, bad):
    with pytest.raises(TypeError):
        client.load_by_chunk(make_clip("gray.mp4"), bad)


def test_frames_per_chunk_must_be_positive(client, make_clip):
    with pytest.raises(ValueError, match="frames_per_chunk"):
        client.load_by_chunk(make_clip("gray.mp4"), frames_per_chunk=0)


def test_a_truncated_file_gives_what_a_sequential_decode_gives(client, make_clip, tmp_path):
    """Half a transport stream: the intact frames exactly, or a clear error; never a hang.

    (A frame the decoder flags as corrupt is concealed damage: only its identity is promised.)
    """
    from .conftest import corrupt_frames

    whole = make_clip("h264.ts").read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(whole[: len(whole) // 2])
    n = len(reference_frames(cut))
    assert 0 < n < 80
    try:
        damaged = corrupt_frames(cut)
        client.load_by_chunk(cut, list(range(n))[::-1], frames_per_chunk=8)
        for idxs, frames in client.chunks:
            assert_frames_exact(cut, idxs, frames, skip=damaged)
    except AsyncFramesError as exc:  # a clear error is acceptable; wrong pixels or a hang are not
        assert str(exc)
    good_request_still_works(client, make_clip("gray.mp4"))


def test_a_damaged_mp4_serves_what_can_be_decoded_and_names_the_rest(client, make_clip, tmp_path):
    """The index (in the moov) promises more frames than the cut-off data holds."""
    from asyncframes._sample import write_clip

    whole = write_clip(tmp_path / "whole.mp4", frames=120, gop=30, container_options={"movflags": "faststart"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    decodable = []
    with av.open(str(cut)) as container:
        try:
            for frame in container.decode(video=0):
                decodable.append(frame)
        except av.FFmpegError:
            pass  # a plain sequential decode stops here too
    n = len(decodable)
    assert 0 < n < 120
    client.load_by_chunk(cut, list(range(n))[::-1], frames_per_chunk=16)
    for idxs, frames in client.chunks:
        for i, frame in zip(idxs, frames):
            assert np.array_equal(frame, decodable[i].to_ndarray(format="rgb24")), f"frame {i}"
    client.load_by_chunk(cut, [0, 119])
    with pytest.raises((FrameIndexError, VideoDecodeError)):
        list(client.chunks)
    good_request_still_works(client, make_clip("gray.mp4"))


def test_a_closed_client_says_so(make_clip):
    av = AsyncVideo()
    av.close()
    av.close()  # twice is fine
    with pytest.raises(AsyncFramesError, match="closed"):
        av.load_by_chunk(make_clip("gray.mp4"))


@pytest.mark.parametrize(
    "code, words",
    [(0, "exited with code 0"), (3, "exited with code 3"), (-9, "killed by SIGKILL (signal 9)"),
     (-15, "killed by SIGTERM (signal 15)"), (-200, "killed by signal 200")],
)
def test_how_a_process_ended_is_said_one_way(code, words):
    """The server's death (client side) and a decoder worker's (server side) use the same words."""
    from asyncframes.errors import process_ended

    assert process_ended(code) == words
