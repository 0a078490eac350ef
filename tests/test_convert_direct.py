"""RGB written by swscale straight into the reader's output is bit for bit PyAV's ``to_ndarray(format="rgb24")``.

The direct path (:mod:`asyncframes._sws`, used by :meth:`Converter.rgb_into`) serves only the
pixel formats and sizes proven here; each converter also checks it against PyAV's conversion on
its first frames and turns it off at the first disagreement, which the last tests force.
"""

from __future__ import annotations

import logging
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncframes import _convert, _sws
from asyncframes._reader import FrameCache, VideoReader
from asyncframes._sample import write_clip

from .conftest import assert_frames_exact, reference_frames, shared_video, shuffled_with_duplicates

pytestmark = pytest.mark.pure

#: name -> (write_clip arguments, whether the direct path must serve it). 14 frames: past the trials.
FRAMES = 14
_709 = {"x264-params": "colorprim=bt709:transfer=bt709:colormatrix=bt709"}
_709_FULL = {"x264-params": "colormatrix=bt709:range=pc"}
SPECS = {
    "h264_64x96.mp4": (dict(codec="libx264", size=(64, 96), gop=5, bframes=2), True),
    "h264_bt709_64x96.mp4": (dict(codec="libx264", size=(64, 96), options=_709), True),
    "h264_bt709_full_64x96.mp4": (dict(codec="libx264", size=(64, 96), options=_709_FULL), True),
    "h264_yuvj420p_64x96.mp4": (dict(codec="libx264", size=(64, 96), pix_fmt="yuvj420p"), True),
    "h264_yuv422p_48x64.mp4": (dict(codec="libx264", size=(48, 64), pix_fmt="yuv422p"), True),
    "h264_yuv422p_50x112.mp4": (dict(codec="libx264", size=(50, 112), pix_fmt="yuv422p"), True),
    "h264_86x208.mp4": (dict(codec="libx264", size=(86, 208)), True),
    "mjpeg_yuvj420p_70x272.avi": (dict(codec="mjpeg", size=(70, 272), bframes=0), True),
    "h264_yuv444p_61x97.mp4": (dict(codec="libx264", size=(61, 97), pix_fmt="yuv444p"), True),
    "hevc_64x96.mp4": (dict(codec="libx265", size=(64, 96)), True),
    "vp9_64x96.webm": (dict(codec="libvpx-vp9", size=(64, 96), bframes=0), True),
    "av1_64x96.mp4": (dict(codec="libsvtav1", size=(64, 96), bframes=0), True),
    "mpeg4_64x96.avi": (dict(codec="mpeg4", size=(64, 96), bframes=2), True),
    "mjpeg_yuvj420p_64x96.avi": (dict(codec="mjpeg", size=(64, 96), bframes=0), True),
    "mjpeg_yuvj422p_64x96.avi": (dict(codec="mjpeg", size=(64, 96), bframes=0, pix_fmt="yuvj422p"), True),
    "mjpeg_yuvj444p_61x97.avi": (dict(codec="mjpeg", size=(61, 97), bframes=0, pix_fmt="yuvj444p"), True),
    "ffv1_yuv444p_61x97.mkv": (dict(codec="ffv1", size=(61, 97), bframes=0), True),
    "ffv1_yuv444p10le_61x97.mkv": (dict(codec="ffv1", size=(61, 97), bframes=0, pix_fmt="yuv444p10le"), True),
    "ffv1_gray_61x97.mkv": (dict(codec="ffv1", size=(61, 97), bframes=0, pix_fmt="gray"), True),
    "ffv1_gray10le_61x97.mkv": (dict(codec="ffv1", size=(61, 97), bframes=0, pix_fmt="gray10le"), True),
    "ffv1_gbrp10le_61x97.mkv": (dict(codec="ffv1", size=(61, 97), bframes=0, pix_fmt="gbrp10le"), True),
    "ffv1_bgr0_61x97.mkv": (dict(codec="ffv1", size=(61, 97), bframes=0, pix_fmt="bgr0"), True),
    "ffv1_bgra_61x97.mkv": (dict(codec="ffv1", size=(61, 97), bframes=0, pix_fmt="rgb32"), True),
    # Not served directly: the usual path, still exact.
    "ffv1_yuv420p_61x97.mkv": (dict(codec="ffv1", size=(61, 97), bframes=0, pix_fmt="yuv420p"), False),  # odd sizes
    "h264_62x100.mp4": (dict(codec="libx264", size=(62, 100)), False),  # width not a multiple of 8
    "h264_64x104.mp4": (dict(codec="libx264", size=(64, 104)), False),  # nor of 16
    "vp9_64x200.webm": (dict(codec="libvpx-vp9", size=(64, 200), bframes=0), False),
    "mpeg4_61x96.avi": (dict(codec="mpeg4", size=(61, 96), bframes=0), False),  # odd height: chroma siting counts
    "h264_yuv420p10le_64x96.mp4": (dict(codec="libx264", size=(64, 96), pix_fmt="yuv420p10le"), False),
    "ffv1_yuv420p10le_64x96.mkv": (dict(codec="ffv1", size=(64, 96), bframes=0, pix_fmt="yuv420p10le"), False),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("direct")


def _clip(folder: Path, name: str) -> Path:
    spec, _ = SPECS[name]
    path = folder / name
    if not path.exists():
        if spec["codec"] not in av.codecs_available:
            pytest.skip(f"this PyAV build has no {spec['codec']} encoder")
        write_clip(path, frames=FRAMES, **spec)
    return path


def _read_into_slots(reader: VideoReader, idxs: list[int]) -> np.ndarray:
    """A read as a server does it: into rows of a larger buffer (slot views), whose other rows must stay untouched."""
    h, w = reader.height, reader.width
    buf = np.full((len(idxs) + 2, h, w, 3), 0xA5, dtype=np.uint8)
    reader.read(idxs, grayscale=False, out=buf, positions=range(1, len(idxs) + 1))
    assert (buf[0] == 0xA5).all() and (buf[-1] == 0xA5).all(), "a frame was written outside its place"
    return buf[1:-1]


def _served_directly(reader: VideoReader) -> bool:
    convert = reader._convert
    return not convert._direct_off and any(left < _convert.DIRECT_TRIALS for left in convert._direct_trials.values())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_direct_rgb_is_exact(clips, name):
    path = _clip(clips, name)
    n = len(reference_frames(path))
    with VideoReader(str(path)) as reader:
        in_order = list(range(n))
        assert_frames_exact(path, in_order, _read_into_slots(reader, in_order))
        shuffled = shuffled_with_duplicates(n, 10, seed=3)
        assert_frames_exact(path, shuffled, _read_into_slots(reader, shuffled))
        assert _served_directly(reader) == SPECS[name][1]
        if SPECS[name][1]:  # past its trials: these frames were written straight into their places
            assert reader._convert._direct_trials and min(reader._convert._direct_trials.values()) == 0


@pytest.mark.parametrize("name", ["centered_pair_small.mp4", "small_robot.mp4"])
def test_direct_rgb_is_exact_on_real_videos(name):
    path = shared_video(name)
    with VideoReader(str(path)) as reader:
        idxs = list(range(0, min(reader.frame_count, 60)))
        assert_frames_exact(path, idxs, _read_into_slots(reader, idxs))
        assert _served_directly(reader)


def test_converter_rgb_into_matches_rgb_frame_by_frame(clips):
    path = _clip(clips, "h264_64x96.mp4")
    convert = _convert.Converter("test")
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out = np.empty((frame.height, frame.width, 3), np.uint8)
            convert.rgb_into(frame, out)
            np.testing.assert_array_equal(out, frame.to_ndarray(format="rgb24"))
    assert not convert._direct_off
    convert.close()


def test_non_contiguous_output_takes_the_usual_path(clips):
    path = _clip(clips, "h264_64x96.mp4")
    convert = _convert.Converter("test")
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        wide = np.zeros((frame.height, frame.width + 8, 3), np.uint8)
        out = wide[:, : frame.width]
        convert.rgb_into(frame, out)
        np.testing.assert_array_equal(out, frame.to_ndarray(format="rgb24"))
        assert (wide[:, frame.width :] == 0).all()


def test_cache_keeps_copies_not_views_of_the_output(clips):
    path = _clip(clips, "h264_64x96.mp4")
    n = len(reference_frames(path))
    cache = FrameCache(max_bytes=1 << 30)
    cache.want(later=range(n))
    with VideoReader(str(path)) as reader:
        out = np.empty((3, reader.height, reader.width, 3), np.uint8)
        reader.read([0, 1, 2], grayscale=False, out=out, cache=cache)
        assert_frames_exact(path, [0, 1, 2], out)
        out[...] = 0  # the slot goes to another chunk
        for i in (0, 1, 2):
            kept = cache.get(i)
            assert kept is not None and not np.shares_memory(kept, out)
            np.testing.assert_array_equal(kept, reference_frames(path)[i])


def test_a_disagreement_turns_the_direct_path_off_for_good(clips, monkeypatch, caplog):
    """A direct conversion that writes wrong pixels is caught by the trials: the output stays exact."""
    real = _sws.DirectRGB.convert

    def wrong(self, frame, out, key):
        done = real(self, frame, out, key)
        out[0, 0, 0] ^= 1
        return done

    monkeypatch.setattr(_sws.DirectRGB, "convert", wrong)
    path = _clip(clips, "h264_64x96.mp4")
    n = len(reference_frames(path))
    with caplog.at_level(logging.INFO, logger="asyncframes._convert"), VideoReader(str(path)) as reader:
        assert_frames_exact(path, list(range(n)), _read_into_slots(reader, list(range(n))))
        assert reader._convert._direct_off and reader._convert._direct is None
    assert len([r for r in caplog.records if "straight into the output disagrees" in r.getMessage()]) == 1


def test_a_trial_catches_pixels_left_unwritten(clips, monkeypatch):
    real = _sws.DirectRGB.convert

    def short(self, frame, out, key):
        keep = out[-1, -1].copy()
        done = real(self, frame, out, key)
        out[-1, -1] = keep  # as a converter that stops short of the row's end
        return done

    monkeypatch.setattr(_sws.DirectRGB, "convert", short)
    path = _clip(clips, "ffv1_yuv444p_61x97.mkv")
    with VideoReader(str(path)) as reader:
        assert_frames_exact(path, [0, 1], _read_into_slots(reader, [0, 1]))
        assert reader._convert._direct_off


def test_without_the_library_frames_are_converted_as_usual(clips, monkeypatch):
    monkeypatch.setattr(_sws, "library", lambda: None)
    path = _clip(clips, "h264_64x96.mp4")
    n = len(reference_frames(path))
    with VideoReader(str(path)) as reader:
        assert_frames_exact(path, list(range(n)), _read_into_slots(reader, list(range(n))))
        assert reader._convert._direct_off and reader._convert._direct is None


def test_a_missing_bundled_library_or_symbol_loads_nothing(monkeypatch):
    monkeypatch.setattr(_sws.glob, "glob", lambda pattern: [])
    assert _sws._load() is False

    monkeypatch.undo()

    class NoSymbols:
        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(_sws.ctypes, "CDLL", lambda path: NoSymbols())
    assert _sws._load() is False


def test_the_bundled_library_is_the_one_pyav_uses():
    lib = _sws.library()
    if lib is None:
        pytest.skip("this PyAV has no bundled FFmpeg libraries")
    assert lib.pix_fmt("yuv420p") == 0 and lib.rgb24 == 2


# -- gray content: R from the planar conversion ------------------------------------------------

_KINDS = st.tuples(
    st.sampled_from(["yuv420p", "yuvj420p", "yuv422p", "yuv444p"]),
    st.integers(2, 40).map(lambda n: 2 * n),  # even sizes: every 4:2:0 frame has them
    st.integers(1, 20).map(lambda n: 2 * n),
    st.sampled_from([1, 2]),  # limited, full range
    st.sampled_from([1, 2, 5, 6]),  # BT.709, unspecified, BT.470BG, SMPTE 170M
)


def _gray_frame(kind: tuple, luma_values: np.ndarray) -> av.VideoFrame:
    fmt, width, height, color_range, colorspace = kind
    frame = av.VideoFrame(width, height, fmt)
    frame.color_range, frame.colorspace = color_range, colorspace
    _convert._plane(frame, 0)[...] = luma_values[: height * width].reshape(height, width)
    for k in (1, 2):
        _convert._plane(frame, k)[...] = 128
    return frame


@settings(max_examples=60, deadline=None)
@given(kind=_KINDS, seed=st.integers(0, 2**32 - 1))
def test_gray_content_is_r_of_the_rgb_conversion_whichever_way_it_is_taken(kind, seed):
    """Past the trials, gray() takes R from the planar conversion where it is proven for the
    kind of frame, else from RGB: either way, exactly R of ``to_ndarray(format="rgb24")``."""
    frame = _gray_frame(kind, np.random.default_rng(seed).integers(0, 256, kind[1] * kind[2], dtype=np.uint8))
    convert = _convert.Converter("test")
    convert._trials, convert._served = 0, _convert.PLANAR_AFTER  # past the trials: the shortcuts alone
    np.testing.assert_array_equal(convert.gray(frame), frame.to_ndarray(format="rgb24")[..., :1])


def test_the_planar_r_serves_the_common_kinds():
    """Gray videos as cameras record them (4:2:0, limited or full range, widths of 16s)."""
    for kind in [("yuv420p", 384, 384, 1, 2), ("yuv420p", 1024, 1024, 1, 1), ("yuvj420p", 640, 480, 2, 5), ("yuv420p", 96, 64, 1, 6)]:
        assert _convert.planar_r_is_r.__wrapped__(*kind), kind


def test_a_kind_whose_planar_r_disagrees_takes_r_from_rgb(monkeypatch, caplog):
    kind = ("yuv420p", 64, 32, 1, 2)
    frame = _gray_frame(kind, np.arange(64 * 32, dtype=np.uint8))
    expected = frame.to_ndarray(format="rgb24")[..., :1]
    real = _convert.rgb24

    def off_by_one_at_200(f: av.VideoFrame) -> np.ndarray:
        rgb = real(f).copy()
        rgb[rgb == 200] = 201  # what a swscale whose two paths rounded differently would give
        return rgb

    check = _convert.planar_r_is_r.__wrapped__  # not the process's cached answers
    monkeypatch.setattr(_convert, "rgb24", off_by_one_at_200)
    assert not check(*kind)
    monkeypatch.setattr(_convert, "rgb24", real)
    assert check(*kind)
    convert = _convert.Converter("test")
    convert._trials, convert._served = 0, _convert.PLANAR_AFTER
    monkeypatch.setattr(_convert, "planar_r_is_r", lambda *kind: False)
    with caplog.at_level(logging.INFO, logger="asyncframes._convert"):
        np.testing.assert_array_equal(convert.gray(frame), expected)
    assert convert._planar == {kind: False} and "taking R from RGB" in caplog.text


def test_a_gray_video_read_past_the_trials_is_served_from_the_planar_r_exactly():
    path = shared_video("centered_pair_small.mp4")
    with VideoReader(str(path)) as reader:
        idxs = list(range(400))
        frames = reader.read(idxs)
        assert frames.shape[-1] == 1, "centered_pair_small is gray content"
        assert_frames_exact(path, idxs, frames)
        assert True in reader._convert._planar.values(), "the planar R was never used"
