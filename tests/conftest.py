"""Shared test material: the real videos in ../shared/videos, clips we encode, and ground truth.

Tests come in two layers. Modules marked ``pytestmark = pytest.mark.pure`` drive the cores
(and the reader, opener and index) directly: no sockets, no processes, no sleeps; the
``_pure_layer`` fixture below makes any of those fail such a test. Every other module tells a
user's story against real server processes, one test per story.

Ground truth is always a plain sequential PyAV decode, converted with PyAV's own
``to_ndarray(format="rgb24")``: frame i is the i-th frame it yields.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Callable

import av
import numpy as np
import numpy.testing  # noqa: F401  (numpy 2.0 runs lscpu when it is first imported: not inside a pure test)
import pytest

from asyncframes import AsyncVideo
from asyncframes._sample import write_clip

SHARED = Path(os.environ.get("ASYNCFRAMES_SHARED_VIDEOS", Path(__file__).resolve().parents[2] / "shared" / "videos"))


def shared_video(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"shared test video {path} is absent (set ASYNCFRAMES_SHARED_VIDEOS to its folder)")
    return path


@pytest.fixture
def centered_pair() -> Path:
    return shared_video("centered_pair_small.mp4")


@pytest.fixture
def small_robot() -> Path:
    return shared_video("small_robot.mp4")


_VFR_PTS = np.cumsum([0] + [int(x) for x in np.random.default_rng(7).integers(10, 80, 89)])

#: name -> how to make it. Each stresses something a frame reader can get wrong.
CLIPS = {
    # B-frames (b-pyramid) and a GOP longer than the clip: one keyframe, many reorderings.
    "h264_bframes_longgop.mp4": dict(codec="libx264", frames=150, gop=300, bframes=3),
    # Several GOPs with B-frames, to exercise seeking.
    "h264_gops.mp4": dict(codec="libx264", frames=150, gop=25, bframes=2),
    # Variable frame rate: irregular timestamps in milliseconds.
    "h264_vfr.mp4": dict(codec="libx264", frames=90, gop=20, bframes=2, pts=_VFR_PTS, time_base=Fraction(1, 1000)),
    # Containers whose header has no (or a wrong) frame count.
    "vp9.webm": dict(codec="libvpx-vp9", frames=60, gop=15, bframes=0),
    "h264.mkv": dict(codec="libx264", frames=80, gop=20, bframes=2),
    "h264.ts": dict(codec="libx264", frames=80, gop=20, bframes=2),
    "hevc.mp4": dict(codec="libx265", frames=60, gop=20, bframes=3),
    "mpeg4_bframes.avi": dict(codec="mpeg4", frames=60, gop=12, bframes=2),
    "mjpeg.avi": dict(codec="mjpeg", frames=20, bframes=0),
    "ffv1.mkv": dict(codec="ffv1", frames=20, gop=5, bframes=0),
    # Grayscale content in a colour pixel format, like SLEAP's centered_pair.
    "gray.mp4": dict(codec="libx264", frames=40, gop=10, bframes=2, grayscale=True),
}

#: A wider zoo, each a way real files differ; used for the reader's exactness only.
ZOO = {
    "h264_opengop.ts": dict(codec="libx264", frames=120, gop=40, bframes=3, options={"x264-params": "open-gop=1"}),
    "hevc_opengop.mkv": dict(codec="libx265", frames=90, options={"x265-params": "keyint=30:min-keyint=30:bframes=4:open-gop=1:log-level=error"}),
    "h264_10bit.mp4": dict(codec="libx264", frames=40, gop=20, pix_fmt="yuv420p10le"),
    "h264_edit_list_discards.mp4": dict(codec="libx264", frames=60, gop=20, start=-7),  # the first 7 are never shown
    "h264_offset_start.ts": dict(codec="libx264", frames=60, gop=20, start=500),
    # MPEG-TS/PS demuxers seek by the dts of any packet: a keyframe's pts lands after it.
    "h264_gops.ts": dict(codec="libx264", frames=200, gop=24, bframes=2),
    "mpeg2.ts": dict(codec="mpeg2video", frames=120, gop=15, bframes=2),
    "h264_vfr.ts": dict(codec="libx264", frames=90, gop=20, bframes=2, pts=_VFR_PTS, time_base=Fraction(1, 1000)),
    # Variable frame rate in Matroska (MP4 is in CLIPS): seek tables of keyframe pts, not dts.
    "h264_vfr.mkv": dict(codec="libx264", frames=90, gop=20, bframes=2, pts=_VFR_PTS, time_base=Fraction(1, 1000)),
    "h264_second_stream.mkv": dict(codec="libx264", frames=40, gop=20, streams=2),
    "h264_raw.h264": dict(codec="libx264", frames=50, gop=20),  # no timestamps at all
    "vp9_altref.webm": dict(codec="libvpx-vp9", frames=60, gop=30, bframes=0, options={"auto-alt-ref": "1", "lag-in-frames": "16"}),
    "vp8.webm": dict(codec="libvpx", frames=40, gop=15, bframes=0),
    "av1.mp4": dict(codec="libsvtav1", frames=40, gop=20, bframes=0),
    "mpeg2.mpg": dict(codec="mpeg2video", frames=60, gop=15, bframes=2),
    "mpeg4_bframes.mp4": dict(codec="mpeg4", frames=60, gop=12, bframes=2),
    "hevc_gops.ts": dict(codec="libx265", frames=90, gop=30, bframes=3),  # parameter sets in Annex B
    "wmv2.wmv": dict(codec="wmv2", frames=30, gop=10, bframes=0),
    "prores.mov": dict(codec="prores_ks", frames=15, bframes=0, pix_fmt="yuv422p10le"),
    "rawvideo.y4m": dict(codec="rawvideo", frames=15, bframes=0),
}


@pytest.fixture(autouse=True)
def _pure_layer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a test marked ``pure``: opening a socket, starting a process or sleeping fails it."""
    if request.node.get_closest_marker("pure") is None:
        return
    import subprocess

    import zmq

    def refuse(what: str) -> Callable[..., None]:
        def refused(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"a pure test must not {what}")

        return refused

    monkeypatch.setattr(zmq.Context, "socket", refuse("open a ZeroMQ socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("start a process"))
    monkeypatch.setattr(time, "sleep", refuse("sleep"))


@pytest.fixture(scope="module", autouse=True)
def own_shared_server():
    """Each test module owns the process's shared private server it started: stopped after the module
    (tests that look into a server's insides, or kill it, use ``server="own"``)."""
    yield
    from asyncframes._process import stop_shared_servers

    stop_shared_servers()


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory: pytest.TempPathFactory):
    """The test session's own TMPDIR, for this process and every process the tests start.

    Private servers make their folders (``asyncframes-*``) there, never in the
    machine's /tmp; the session fails if one is left behind.
    """
    folder = tmp_path_factory.mktemp("tmp")
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(folder), str(folder)
    # Frame indexes kept on disk go to the session's folder, never the user's cache.
    os.environ["ASYNCFRAMES_INDEX_CACHE"] = str(tmp_path_factory.mktemp("index-cache"))
    try:
        yield folder
    finally:
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        tempfile.tempdir = saved_tempdir
    left = leftover_private_dirs(folder)
    assert not left, f"the tests left private server folders behind: {sorted(left)}"


def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Return once ``condition()`` holds; fail naming ``what`` if it does not within ``within`` s."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {within} s waiting for {what}"
        time.sleep(0.01)


def leftover_private_dirs(folder: Path, within: float = 5.0) -> set[str]:
    """Private server folders still in ``folder`` once servers that are stopping have had ``within`` s to go."""
    from asyncframes import _process as process

    gc.collect()  # clients nobody closed stop their servers now
    process._stop_prestarted()  # a prestarted server nobody took
    deadline = time.monotonic() + within
    while True:
        left = {str(p) for p in folder.glob("asyncframes-*")}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="session")
def make_clip(clip_dir: Path):
    def make(name: str) -> Path:
        path = clip_dir / name
        spec = CLIPS.get(name) or ZOO[name]
        if not path.exists():
            if spec["codec"] not in av.codecs_available:
                pytest.skip(f"this PyAV build has no {spec['codec']} encoder")
            write_clip(path, **spec)
        return path

    return make


@lru_cache(maxsize=None)
def _reference(path: str, stream: int) -> tuple[np.ndarray, ...]:
    with av.open(path) as container:
        return tuple(frame.to_ndarray(format="rgb24") for frame in container.decode(video=stream))


def reference_frames(path: "str | Path", stream: int = 0) -> tuple[np.ndarray, ...]:
    """Every frame of a plain sequential decode, as RGB arrays."""
    return _reference(str(path), stream)


def corrupt_frames(path: "str | Path") -> set[int]:
    """Frames a sequential decode flags as corrupt: concealed damage, whose pixels depend on decoder history."""
    with av.open(str(path)) as container:
        return {i for i, frame in enumerate(container.decode(video=0)) if frame.is_corrupt}


def assert_frames_exact(path: "str | Path", frame_idxs, frames: np.ndarray, stream: int = 0, skip=()) -> None:
    """Each returned frame equals the reference frame with that index (grayscale: its R channel)."""
    ref = reference_frames(path, stream)
    assert frames.dtype == np.uint8
    assert frames.shape[0] == len(frame_idxs)
    for pos, i in enumerate(frame_idxs):
        if i in skip:
            continue
        expected = ref[i] if frames.shape[-1] == 3 else ref[i][..., :1]
        if not np.array_equal(frames[pos], expected):
            diff = int(np.abs(frames[pos].astype(int) - expected.astype(int)).max())
            raise AssertionError(f"{Path(path).name}: frame {i} (position {pos}) differs from the sequential decode (max diff {diff})")


def shuffled_with_duplicates(n: int, k: int, seed: int) -> list[int]:
    """``k`` random indices below ``n`` plus every index once, shuffled, with repeats."""
    rng = np.random.default_rng(seed)
    idxs = list(rng.integers(0, n, k)) + list(range(n))
    rng.shuffle(idxs)
    return [int(i) for i in idxs]


@pytest.fixture(scope="module")
def client():
    """One private server for a whole test module (each test still makes its own requests)."""
    with AsyncVideo(timeout=60) as av_client:
        yield av_client


# -- CI runs every test for real ----------------------------------------------------------

#: Set (to anything but "" or "0") by .ci/run: a skipped test fails the session.
FAIL_ON_SKIP = "ASYNCFRAMES_FAIL_ON_SKIP"

#: ``nodeid: reason`` of every test skipped in this session.
_skipped: list[str] = []


def fail_on_skip() -> bool:
    return os.environ.get(FAIL_ON_SKIP, "") not in ("", "0")


def describe_skip(report: pytest.TestReport) -> str:
    """``nodeid: reason`` of a skipped test's report."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return f"{report.nodeid}: {reason.removeprefix('Skipped: ')}"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(describe_skip(report))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ASYNCFRAMES_FAIL_ON_SKIP set, a session that skipped any test fails."""
    if fail_on_skip() and _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """List what was skipped, and why that fails the run, when ASYNCFRAMES_FAIL_ON_SKIP is set."""
    if not (fail_on_skip() and _skipped):
        return
    terminalreporter.section(f"{FAIL_ON_SKIP} is set: a skipped test fails the run", red=True, bold=True)
    for line in _skipped:
        terminalreporter.line(f"SKIPPED {line}", red=True)
    terminalreporter.line(f"{len(_skipped)} test(s) skipped; CI must run every test for real", red=True, bold=True)


def write_png(path: "str | Path", rgb: np.ndarray) -> Path:
    """One RGB image as a PNG file, encoded by PyAV (no Pillow needed)."""
    h, w = rgb.shape[:2]
    with av.open(str(path), "w", format="image2", options={"update": "1"}) as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = w, h, "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)
