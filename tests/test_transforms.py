"""Transforms on the server (crop, resize, layout): frames arrive shaped, equal to what PyAV's
own reformat gives, and caches never mix shaped and unshaped frames."""

from __future__ import annotations

import av
import numpy as np
import pytest

from asyncframes import Video
from asyncframes.errors import VideoOpenError

from .conftest import shared_video


def decoded(path: str) -> list[av.VideoFrame]:
    with av.open(path) as container:
        return list(container.decode(video=0))


def reformatted(frame: av.VideoFrame, video: Video) -> np.ndarray:
    """What a user computes with PyAV: crop the RGB frame, or reformat the decoded one, then lay out."""
    if video.crop is not None:
        top, left, h, w = video.crop
        rgb = frame.to_ndarray(format="rgb24")[top : top + h, left : left + w]
        if video.resize is not None:
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
                width=video.resize[1], height=video.resize[0], interpolation=video.interpolation.upper()).to_ndarray()
    else:
        rgb = frame.reformat(width=video.resize[1], height=video.resize[0], format="rgb24",
                             interpolation=video.interpolation.upper()).to_ndarray()
    return rgb.transpose(2, 0, 1) if video.layout == "CHW" else rgb


@pytest.mark.parametrize("options", [
    dict(resize=(64, 96)),
    dict(resize=(224, 224), interpolation="area"),
    dict(resize=(50, 70), interpolation="bicubic", layout="CHW"),
    dict(crop=(8, 16, 60, 80)),
    dict(crop=(8, 16, 60, 80), resize=(30, 20), layout="CHW"),
], ids=["resize", "resize-area-up", "resize-bicubic-chw", "crop", "crop-resize-chw"])
def test_transformed_frames_equal_pyavs_reformat(client, make_clip, options):
    path = str(make_clip("h264_gops.mp4"))  # 96x128
    video = Video(path, grayscale=False, **options)
    frames = decoded(path)
    idxs = [0, 149, 75, 75, 3]
    client.load_by_chunk(video, idxs, frames_per_chunk=2)
    got = [f for _, chunk in client.chunks for f in chunk]
    for i, frame in zip(idxs, got):
        assert np.array_equal(frame, reformatted(frames[i], video)), f"frame {i}"
    info = client.info(video)
    h, w = options.get("resize") or options["crop"][2:]
    assert (info.height, info.width, info.source_height, info.source_width) == (h, w, 96, 128)


def test_the_same_video_shaped_and_unshaped_never_mix_in_caches(client):
    path = str(shared_video("centered_pair_small.mp4"))
    small = Video(path, resize=(48, 48))
    for spec in (small, path, small, path):  # small requests: the recent-frames cache is on
        client.load_by_chunk(spec, [10], frames_per_chunk=1)
        (_, frames), = list(client.chunks)
        assert frames.shape[1:3] == ((48, 48) if spec is small else (384, 384))


def test_a_crop_outside_the_frame_is_refused_naming_the_frame_size(client, make_clip):
    with pytest.raises(VideoOpenError, match=r"does not lie inside the 128x96 frame"):
        client.info(Video(str(make_clip("h264_gops.mp4")), crop=(90, 0, 10, 10)))
