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


def test_image_files_travel_only_when_there_are_some():
    from asyncframes import _protocol as protocol

    plain = protocol.converter.unstructure(Video("clip.mp4"))
    assert "files" not in plain  # servers that predate image lists keep accepting it
    listed = Video("a.png", files=["a.png", "b.png"])
    wire = protocol.converter.unstructure(listed)
    assert list(wire["files"]) == ["a.png", "b.png"]
    assert protocol.converter.structure(wire, Video) == listed


def test_a_list_of_images_is_a_video_and_bad_lists_are_named():
    from asyncframes._video import as_video

    assert as_video(["x/1.png", "x/2.png"]) == Video("x/1.png", files=("x/1.png", "x/2.png"))
    with pytest.raises(TypeError, match="a list of image paths, got one path"):
        Video("a.png", files="a.png")
    with pytest.raises(ValueError, match="filename is empty"):
        as_video(["a.png", ""])
    with pytest.raises(TypeError, match="expected a Video, a path, a list of image paths or a sleap_io.Video, got int"):
        as_video(3)
