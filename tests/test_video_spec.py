"""The video spec travels to the server as cattrs-unstructured msgpack and comes back equal."""

from pathlib import Path

import msgpack
import pytest

from asyncframes import Video
from asyncframes._protocol import converter
from asyncframes._video import as_video

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("grayscale", [None, True, False])
def test_video_round_trips_through_cattrs_and_msgpack(grayscale):
    video = Video.from_filename("/data/clip.mp4", grayscale=grayscale, stream=1)
    wire = msgpack.packb(converter.unstructure(video))
    assert converter.structure(msgpack.unpackb(wire), Video) == video


def test_from_filename_accepts_path_objects():
    assert Video.from_filename(Path("a/b.mp4")).filename == "a/b.mp4"


def test_plain_paths_become_videos():
    assert as_video("x.mp4") == Video("x.mp4")
    assert as_video(Path("x.mp4")) == Video("x.mp4")
    with pytest.raises(TypeError):
        as_video(3)


def test_options_are_validated():
    with pytest.raises(TypeError):
        Video("x.mp4", grayscale="yes")
    with pytest.raises(ValueError):
        Video("x.mp4", stream=-1)
