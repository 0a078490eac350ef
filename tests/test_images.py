"""Image folders, globs, lists and sequences numbered from anywhere, served as videos: frame i is
image i (natural order), decoded exactly as PyAV decodes that file alone."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

import asyncframes
from asyncframes import Video
from asyncframes._sample import pattern
from asyncframes.errors import VideoDecodeError, VideoNotFoundError

from .conftest import shared_video, write_png


def decoded(path: "str | Path") -> np.ndarray:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """frame_0010.png .. frame_0021.png (numbered from 10; 12 images) and a stray text file."""
    folder = tmp_path_factory.mktemp("shots")
    for k, n in enumerate(range(10, 22)):
        write_png(folder / f"frame_{n:04d}.png", pattern(k, 48, 64))
    (folder / "README.txt").write_text("not an image")
    return folder


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"), key=lambda p: int(p.stem.split("_")[1]))


@pytest.mark.parametrize("how", ["folder", "glob", "pattern-from-10", "list", "Video-files"])
def test_images_by_any_name_are_frames_exactly(client, shots, how):
    files = files_of(shots)
    spec = {
        "folder": str(shots),
        "glob": str(shots / "*.png"),
        "pattern-from-10": str(shots / "frame_%04d.png"),
        "list": [str(f) for f in files],
        "Video-files": Video(str(files[0]), files=[str(f) for f in files]),
    }[how]
    info = client.info(spec)
    assert (info.frame_count, info.height, info.width, info.container) == (12, 48, 64, "images")
    idxs = [11, 0, 5, 5, 3]
    client.load_by_chunk(spec, idxs, frames_per_chunk=2)
    got = [f for _, frames in client.chunks for f in frames]
    for i, frame in zip(idxs, got):
        assert np.array_equal(frame, decoded(files[i])), f"image {i}"


@pytest.mark.parametrize("order", ["in order", "shuffled"])
def test_a_whole_sequence_is_read_by_two_decoder_workers_exactly(shots, order):
    """More frames than a small request: the chunks are split over the server's two decoder
    workers (in order: consecutive runs, every image being a keyframe of its own)."""
    files = files_of(shots)
    idxs = list(range(12)) if order == "in order" else [7, 2, 11, 0, 9, 4, 1, 10, 3, 8, 6, 5]
    with asyncframes.AsyncVideo(workers=2) as client:
        client.load_by_chunk(str(shots), idxs, frames_per_chunk=10)
        got = [(i, f) for chunk_idxs, frames in client.chunks for i, f in zip(chunk_idxs, frames)]
    assert [i for i, _ in got] == idxs
    for i, frame in got:
        assert np.array_equal(frame, decoded(files[i])), f"image {i}"


def test_the_shared_jpeg_sequence_as_a_folder(client):
    folder = shared_video("robot_frames")
    client.load_by_chunk(str(folder), [2, 0, 1], frames_per_chunk=3)
    (idxs, frames), = list(client.chunks)
    for i, frame in zip(idxs, frames):
        expected = decoded(folder / f"robot{i}.jpg")
        assert np.array_equal(frame, expected if frame.shape[-1] == 3 else expected[..., :1])


def test_the_reader_facade_takes_a_folder_a_glob_and_a_list(shots):
    files = files_of(shots)
    for spec in (str(shots), str(shots / "*.png"), [str(f) for f in files]):
        with asyncframes.open(spec) as reader:
            assert len(reader) == 12
            assert np.array_equal(reader[-1], decoded(files[-1]))


def test_images_naming_nothing_or_of_mixed_sizes_get_clear_errors(client, tmp_path, shots):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoNotFoundError, match="a folder with no images"):
        client.info(str(tmp_path / "empty"))
    with pytest.raises(VideoNotFoundError, match="no file matches"):
        client.info(str(tmp_path / "*.png"))
    odd = tmp_path / "odd.png"
    write_png(odd, pattern(0, 20, 30))
    mixed = [str(f) for f in files_of(shots)[:2]] + [str(odd)]
    client.load_by_chunk(mixed, [0, 2])
    with pytest.raises(VideoDecodeError, match=r"image 2 .*odd\.png\) is 30x20, but the first is 64x48"):
        list(client.chunks)
