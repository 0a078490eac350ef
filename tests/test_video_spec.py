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


def test_transforms_are_checked_naming_the_value_and_what_is_allowed():
    assert Video("v.mp4", resize=[224, 224], crop=(0, 0, 10, 10)).resize == (224, 224)
    with pytest.raises(ValueError, match="interpolation must be one of bilinear, area"):
        Video("v.mp4", interpolation="cubic")
    with pytest.raises(ValueError, match="layout must be one of HWC, CHW; got 'NCHW'"):
        Video("v.mp4", layout="NCHW")
    with pytest.raises(TypeError, match=r"resize \(height, width\) must be 2 integers"):
        Video("v.mp4", resize=(1.5, 2))
    with pytest.raises(ValueError, match="from 1 to 16384"):
        Video("v.mp4", resize=(0, 10))
    with pytest.raises(ValueError, match="crop .* does not lie inside the 64x48 frame"):
        Video("v.mp4", crop=(40, 0, 10, 10)).shaped(48, 64, 3)
    assert Video("v.mp4", crop=(8, 4, 20, 30), resize=(10, 12), layout="CHW").shaped(48, 64, 1) == (1, 10, 12)


def test_transforms_travel_only_when_set():
    plain = converter.unstructure(Video("v.mp4"))
    assert set(plain) == {"filename", "grayscale", "stream"}  # what servers before transforms accept
    shaped = Video("v.mp4", resize=(10, 20), layout="CHW")
    assert converter.structure(converter.unstructure(shaped), Video) == shaped
