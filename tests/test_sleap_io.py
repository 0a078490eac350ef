"""sleap-io's Video objects, accepted wherever a Video or a path is (duck typing: asyncframes
never imports sleap_io): frames equal to sleap-io's own reader, its grayscale setting kept."""

from __future__ import annotations

import numpy as np
import pytest

sio = pytest.importorskip("sleap_io", reason="the sleap extra: pip install 'asyncframes-video[sleap]'")

import asyncframes  # noqa: E402
from asyncframes import AsyncVideo  # noqa: E402
from asyncframes._video import as_video  # noqa: E402

from .conftest import shared_video, write_png  # noqa: E402


def frames_from(video, idxs, **kwargs) -> list[np.ndarray]:
    with AsyncVideo.from_video(video, idxs, frames_per_chunk=4, **kwargs) as av:
        return [f for _, frames in av.chunks for f in frames]


def test_a_media_video_gives_sleap_ios_own_frames():
    video = sio.load_video(str(shared_video("small_robot.mp4")))
    idxs = [0, 165, 80, 81, 3]
    for i, frame in zip(idxs, frames_from(video, idxs)):
        assert np.array_equal(frame, video[i]), f"frame {i}"


def test_grayscale_is_kept_both_ways():
    gray = sio.load_video(str(shared_video("centered_pair_small.mp4")))
    assert gray.grayscale and as_video(gray).grayscale is True
    idxs = [0, 149, 150, 1099]
    for i, frame in zip(idxs, frames_from(gray, idxs)):
        assert frame.shape == (384, 384, 1) and np.array_equal(frame, gray[i]), f"frame {i}"
    gray.grayscale = False  # the user asked for RGB: they get RGB
    assert frames_from(gray, [5])[0].shape == (384, 384, 3)


def test_an_image_list_video(tmp_path):

    from asyncframes._sample import pattern

    pngs = []
    for k in range(4):
        pngs.append(str(tmp_path / f"img{k}.png"))
        write_png(pngs[-1], pattern(k, 40, 56))
    video = sio.Video(filename=pngs)
    for i, frame in zip([3, 0, 2], frames_from(video, [3, 0, 2])):
        assert np.array_equal(frame, video[i]), f"image {i}"
    with asyncframes.open(video) as reader:
        assert len(reader) == 4 and np.array_equal(reader[1], video[1])


def test_jpeg_images_follow_pyav_whose_jpeg_decoding_differs_from_sleap_ios():
    """sleap-io decodes JPEG with libjpeg (through imageio and PIL), we with FFmpeg, as PyAV
    presents the image (our definition of a frame). The two decoders upsample chroma
    differently: on these images the mean difference is ~1.1 levels, up to ~50 at sharp
    colour edges. PNG (lossless) is identical (above)."""
    import av

    folder = shared_video("robot_frames")
    video = sio.Video(filename=[str(folder / f"robot{i}.jpg") for i in range(3)])
    for i, frame in zip([2, 0, 1], frames_from(video, [2, 0, 1])):
        with av.open(str(folder / f"robot{i}.jpg")) as container:
            assert np.array_equal(frame, next(container.decode(video=0)).to_ndarray(format="rgb24"))
        assert np.abs(frame.astype(int) - video[i].astype(int)).mean() < 2, f"image {i}"
