"""``asyncframes bench``: asyncframes measured side by side with in-process decoding, in one run.

Machines are noisy, so every comparison is made within one run: each round
runs every method once, interleaved, and the tables show medians and ratios to
an in-process baseline measured in the same rounds. Nothing here is a pass/fail
test; the targets are printed next to the figures for the reader to judge.
See ``docs/performance.md`` for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import av
import numpy as np

from ._client import AsyncVideo
from ._convert import rgb24
from ._sample import write_clip
from ._version import __version__
from ._video import Video

#: Where the shared test videos live in the project's layout, used when present.
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asyncframes" / "bench-v1"


#: The generated clips: name → write_clip arguments. All H.264 with B-frames.
CLIPS: dict[str, dict[str, Any]] = {
    "h264_384x384.mp4": dict(frames=900, size=(384, 384), gop=60, bframes=3),
    "h264_1080p.mp4": dict(frames=240, size=(1080, 1920), gop=60, bframes=3),
    "h264_384x384_longgop.mp4": dict(frames=1200, size=(384, 384), gop=600, bframes=3),
    # MPEG-TS, the container most cameras record: its demuxer seeks by decode time.
    "h264_384x384.ts": dict(frames=900, size=(384, 384), gop=60, bframes=3),
    # A gray recording at the size of many pose-tracking arenas: served as one channel.
    "h264_gray_1024x1024.mp4": dict(frames=300, size=(1024, 1024), gop=60, bframes=3, grayscale=True),
}


def generated_clips(folder: Optional[Path] = None) -> list[Path]:
    """The bench's own clips, encoded once and kept in the user's cache."""
    folder = folder or _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, kwargs in CLIPS.items():
        path = folder / name
        if not path.exists():
            print(f"encoding {name} (once; kept in {folder}) ...", file=sys.stderr, flush=True)
            fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=folder)
            os.close(fd)
            write_clip(tmp, options={"preset": "veryfast"}, **kwargs)
            os.replace(tmp, path)
        paths.append(path)
    return paths


def default_videos() -> list[Path]:
    shared = [SHARED_VIDEOS / n for n in ("centered_pair_small.mp4", "small_robot.mp4")]
    return [p for p in shared if p.exists()] + generated_clips()


# -- in-process baselines (what a user does without us) ----------------------------


def _frame_pts(path: str) -> list[int]:
    return _packet_pts(path)[0]


def _packet_pts(path: str) -> tuple[list[int], list[int]]:
    """The pts of every frame, and of every keyframe, sorted (one demux of the file)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and p.pts is not None]
    return sorted(pts for pts, _ in packets), sorted(pts for pts, key in packets if key)


def touch(frames: np.ndarray) -> int:
    """What a consumer that reads every pixel costs beyond its own work: one byte of every
    page of ``frames`` is read (the pages must be mapped and present)."""
    return int(frames.reshape(-1)[::4096].sum())


def pyav_naive(path: str) -> int:
    """Sequential decode with PyAV's defaults: ``container.decode`` and ``to_ndarray("rgb24")``."""
    n = 0
    with av.open(path) as container:
        for frame in container.decode(video=0):
            touch(frame.to_ndarray(format="rgb24"))
            n += 1
    return n


def pyav_best(path: str, limit: Optional[int] = None) -> int:
    """Sequential decode done well: frame threads in the decoder, single-threaded conversion;
    the consumer reads every page of every frame."""
    n = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            touch(rgb24(frame))
            n += 1
            if n == limit:
                break
    return n


class SeekingReader:
    """Random access done well in-process: seek to the keyframe before the frame, decode up to
    it; a seek that lands past the frame (MPEG-TS demuxers seek by decode time) is retried
    from an earlier keyframe (past the first one, from the file reopened), so every frame
    returned is the right one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pts, self.keys = _packet_pts(path)
        self._open()
        self._last = -2  # index of the frame the decoder presented last
        self._frames: Optional[Iterator[av.VideoFrame]] = None

    def _open(self) -> None:
        self.container = av.open(self.path)
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"

    def read(self, i: int) -> np.ndarray:
        target = self.pts[i]
        if self._frames is not None and self._last < i and i - self._last <= 8:
            for frame in self._frames:  # a few frames on: keep decoding, as a player does
                if frame.pts == target:
                    self._last = i
                    return rgb24(frame)
                if frame.pts is None or frame.pts > target:
                    break
        back = 0
        while True:
            k = np.searchsorted(self.keys, target, side="right") - 1 - back
            if k < 0 or not self.keys:  # no keyframe left to seek to: decode from the start
                self.container.close()
                self._open()
            else:
                self.container.seek(self.keys[k], stream=self.stream, backward=True)
            self._frames = self.container.decode(self.stream)
            first = True
            for frame in self._frames:
                if first and frame.pts is not None and frame.pts > target and k >= 0:
                    break  # landed past it (MPEG-TS even from the first keyframe): from an earlier one
                first = False
                if frame.pts == target:
                    self._last = i
                    return rgb24(frame)
            else:
                if not first or k < 0:
                    raise RuntimeError(f"frame {i} not found")
                # nothing at all: MPEG-TS landed past the end (seeking to its last keyframe)
            back += 1

    def read_all(self, idxs: Sequence[int]) -> list[np.ndarray]:
        return [self.read(i) for i in idxs]

    def close(self) -> None:
        self.container.close()


# -- asyncframes ---------------------------------------------------------------------


def _drain(client: AsyncVideo, every_page: bool = True) -> int:
    """Take every chunk, holding each until the next arrives, as a consumer loop does: reading
    every page of it (``every_page``) or one pixel."""
    n = 0
    for frame_idxs, frames in client.chunks:
        if every_page:
            touch(frames)
        elif len(frames):
            int(frames[0, 0, 0, 0])
        n += len(frame_idxs)
    return n


def _second_from_video(video: Video, frames_per_chunk: int) -> int:
    """What SLEAP-style code does per video, in a process that already made an AsyncVideo."""
    with AsyncVideo.from_video(video, None, frames_per_chunk) as client:
        return _drain(client)


def _failure(exc: BaseException) -> str:
    """What another library's failure was, for the row that would have shown it."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# -- the measurements ----------------------------------------------------------------


class Results:
    """Per-round samples of named figures, with medians."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.notes: dict[str, Any] = {}

    def add(self, name: str, *values: float) -> None:
        self.samples.setdefault(name, []).extend(values)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def pct(self, name: str, q: float) -> float:
        values = sorted(self.samples[name])
        return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]

    def as_dict(self) -> dict[str, Any]:
        return {
            **{name: {"median": self.median(name), "samples": values} for name, values in self.samples.items()},
            **self.notes,
        }


def bench_video(path: str, rounds: int, random_count: int, scrub_count: int, frames_per_chunk: int) -> Results:
    """Every per-video comparison, interleaved over ``rounds``."""
    res = Results()
    n = len(_frame_pts(path))
    rng = np.random.default_rng(7)
    random_idxs = [int(i) for i in rng.integers(0, n, random_count)]
    # The same pixels the baselines make (RGB also for a gray video), to compare like with like
    # and check exactness.
    rgb = Video(path, grayscale=False)
    exact = True
    AsyncVideo.stop_shared_servers()  # this video starts on a fresh server
    for _ in range(rounds):
        # sequential, frames/s; every consumer reads every page of every frame unless it says otherwise
        t, count = _timed(lambda: pyav_naive(path))
        res.add("sequential.pyav_naive_fps", count / t)
        t, count = _timed(lambda: pyav_best(path))
        res.add("sequential.pyav_best_fps", count / t)
        with AsyncVideo() as client:
            client.info(rgb)  # the server is up and the video open: time the stream itself
            client.load_by_chunk(rgb, None, frames_per_chunk)
            _drain(client, False)  # once untimed: a running server (its slots for this client made)
            for name, every_page in (("sequential.asyncframes_fps", True), ("sequential.asyncframes_one_pixel_fps", False)):
                client.load_by_chunk(rgb, None, frames_per_chunk)
                t, count = _timed(partial(_drain, client, every_page))
                res.add(name, count / t)
            # the next from_video() of the process: a connection, not a process start
            t, count = _timed(partial(_second_from_video, rgb, frames_per_chunk))
            res.add("sequential.second_from_video_fps", count / t)
            t, second = _timed(AsyncVideo)
            res.add("client.constructor_ms", t * 1e3)
            res.add("client.close_ms", _timed(second.close)[0] * 1e3)
        # random access, one request of random_count indices
        seeker = SeekingReader(path)
        try:
            t, expected = _timed(partial(seeker.read_all, random_idxs))
        finally:
            seeker.close()
        res.add("random.pyav_seek_fps", len(random_idxs) / t)
        with AsyncVideo() as client:
            client.info(rgb)
            start = time.perf_counter()
            client.load_by_chunk(rgb, random_idxs, frames_per_chunk)
            got = [frame for _, frames in client.chunks for frame in frames]
            res.add("random.asyncframes_fps", len(random_idxs) / (time.perf_counter() - start))
            exact = exact and _same(got, expected)
            # The frames are views of this client's shared slots: held past close(), they would
            # keep the slots from going back to the server's spares, and the next clients of
            # this run would pay for fresh shared pages (a 1080p round held gigabytes so).
            del got
        for name, open_video, read_batch, as_rgb in optional_batch_readers():
            try:
                handle = open_video(path)  # opened (and indexed) before the clock, like the seeker and the server above
                t, theirs = _timed(partial(read_batch, handle, random_idxs))
            except Exception as exc:  # another library's failure on this video: its row says so
                res.notes[f"random.other.{name}_failed"] = _failure(exc)
                continue
            res.add(f"random.other.{name}_fps", len(random_idxs) / t)
            key = f"random.other.{name}_exact"
            res.notes[key] = res.notes.get(key, True) and _same(as_rgb(theirs), expected)
            del handle, theirs
        del expected  # hundreds of MB at 1080p: not held through the rows that follow
        # scrubbing: one frame at a time, as a GUI asks while the user drags a slider
        scrub_idxs = [int(i) for i in rng.integers(0, n, scrub_count)]
        seeker = SeekingReader(path)
        try:
            for i in scrub_idxs:
                res.add("scrub.pyav_seek_ms", _timed(partial(seeker.read, i))[0] * 1e3)
            steps = _steps(rng, n)
            for k, i in enumerate(steps):
                took = _timed(partial(seeker.read, i))[0] * 1e3
                if k:  # the jump is a cold frame (timed above): the steps after it
                    res.add("step.pyav_ms", took)
                time.sleep(STEP_PAUSE_S)
        finally:
            seeker.close()
        with AsyncVideo() as client:
            client.info(rgb)
            for i in scrub_idxs:
                for name in ("scrub.asyncframes_cold_ms", "scrub.asyncframes_repeat_ms"):
                    res.add(name, _timed(partial(_one_frame, client, rgb, i))[0] * 1e3)
            for k, i in enumerate(steps):  # the same jump and steps
                took = _timed(partial(_one_frame, client, rgb, i))[0] * 1e3
                if k:
                    res.add("step.asyncframes_ms", took)
                time.sleep(STEP_PAUSE_S)
        # time to the first chunk
        AsyncVideo.stop_shared_servers()
        start = time.perf_counter()
        with AsyncVideo.from_video(path, None, frames_per_chunk) as client:
            client.next_chunk()
            res.add("first_chunk.fresh_ms", (time.perf_counter() - start) * 1e3)
            client.load_by_chunk(path, range(n // 2, n), frames_per_chunk)
            client.next_chunk()  # the decoder is now mid-file; ask for the start again
            res.add("first_chunk.running_ms", _timed(lambda: _first(client, path, frames_per_chunk))[0] * 1e3)
        AsyncVideo.stop_shared_servers()
        AsyncVideo.prestart()
        time.sleep(1.0)  # the app does other things after starting up (not timed)
        start = time.perf_counter()
        with AsyncVideo.from_video(path, None, frames_per_chunk) as client:
            client.next_chunk()
            res.add("first_chunk.prestarted_ms", (time.perf_counter() - start) * 1e3)
        res.add("first_chunk.pyav_open_decode_ms", _timed(lambda: pyav_best(path, limit=frames_per_chunk))[0] * 1e3)
        bench_open(path, res)
        for name, ms in cold_first_chunk(path, frames_per_chunk).items():
            res.add(f"first_chunk.cold_{name}_ms", ms)
    res.notes["random.exact"] = exact
    res.notes["frames"] = n
    return res


#: Videos opened per round for the opening comparison.
OPENS = 10


def _pyav_metadata(path: str) -> tuple:
    """What opening a video in-process gives: its size, frame count, rate and duration."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        return stream.codec_context.width, stream.codec_context.height, stream.frames, stream.average_rate, stream.duration


def bench_open(path: str, res: Results) -> None:
    """Opening a video on a running server (``info()`` of a path it has no reader of; the
    video's index record is on disk, as after any earlier open) against ``av.open`` here.
    Each open names a new symlink to the video, so the server opens a file it has not open."""
    with AsyncVideo() as client, tempfile.TemporaryDirectory(prefix="af-open-") as links:
        client.info(path)  # the server is up and the video's record written
        for k in range(OPENS):
            link = os.path.join(links, f"{k}{Path(path).suffix}")
            os.symlink(os.path.abspath(path), link)
            res.add("open.asyncframes_ms", _timed(partial(client.info, link))[0] * 1e3)
            res.add("open.pyav_ms", _timed(partial(_pyav_metadata, link))[0] * 1e3)


#: Forward stepping: a person stepping through frames one by one, pausing between steps.
STEP_PAUSE_S = 0.04
STEPS = 100


def _steps(rng: np.random.Generator, n: int) -> list[int]:
    """A jump to a random frame, then :data:`STEPS` steps forward one frame at a time (the
    steps are timed; the jump is a cold frame, timed as such)."""
    start = int(rng.integers(0, max(1, n - STEPS - 1)))
    return list(range(start, min(n, start + STEPS + 1)))


_COLD_OURS = """
import sys, time
start = time.perf_counter()
from asyncframes import AsyncVideo
with AsyncVideo.from_video(sys.argv[1], range(int(sys.argv[2])), int(sys.argv[2]), server=sys.argv[3]) as client:
    idxs, frames = client.next_chunk()
    int(frames.reshape(-1)[::4096].sum())
    print((time.perf_counter() - start) * 1e3, flush=True)
"""

_COLD_PYAV = """
import sys, time
start = time.perf_counter()
import av
n = 0
with av.open(sys.argv[1]) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    for frame in container.decode(stream):
        int(frame.to_ndarray(format="rgb24").reshape(-1)[::4096].sum())
        n += 1
        if n == int(sys.argv[2]):
            break
print((time.perf_counter() - start) * 1e3, flush=True)
"""


def cold_first_chunk(path: str, frames_per_chunk: int) -> dict[str, float]:
    """A fresh Python process to its first ``frames_per_chunk`` frames, timed from outside
    (interpreter start included): asyncframes starting its server, asyncframes on this user's
    running server (``server="user"``, in a folder of the bench's own), and in-process PyAV."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="af-") as runtime:
        env = {**os.environ, "ASYNCFRAMES_RUNTIME_DIR": runtime}
        runs = (("process", _COLD_OURS, ["process"]), ("user", _COLD_OURS, ["user"]), ("user", _COLD_OURS, ["user"]),
                ("pyav", _COLD_PYAV, []))
        for name, script, more in runs:  # the first "user" run starts that server; the second is timed
            start = time.perf_counter()  # until its first chunk is in hand (its exit is not timed)
            proc = subprocess.Popen([sys.executable, "-c", script, path, str(frames_per_chunk), *more], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            out[name] = (time.perf_counter() - start) * 1e3
            proc.communicate(timeout=60)
            if proc.returncode != 0 or not line:
                raise RuntimeError(f"the fresh-process probe failed ({name}, exit {proc.returncode})")
        subprocess.run([sys.executable, "-c", "from asyncframes import AsyncVideo; AsyncVideo.stop_user_server()"],
                       env=env, check=True, capture_output=True)
    return out


def _one_frame(client: AsyncVideo, video: Video, i: int) -> np.ndarray:
    client.load_by_chunk(video, [i], 1)
    chunk = client.next_chunk()
    assert chunk is not None and chunk.frame_idxs == [i]
    return chunk.frames[0]


def _first(client: AsyncVideo, path: str, frames_per_chunk: int) -> None:
    client.load_by_chunk(path, None, frames_per_chunk)
    assert client.next_chunk() is not None


_MEMORY_PROBE = """
import json, sys, threading, time
from asyncframes import AsyncVideo
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
import os
PAGE = os.sysconf("SC_PAGE_SIZE")
path, total, fpc, delay, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
with AsyncVideo(window=window) as client:
    n = client.info(path).frame_count
    client.load_by_chunk(path, [0], 1)
    chunk_bytes = [frames.nbytes for _, frames in client.chunks][0] * fpc
    before = rss()
    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    client.load_by_chunk(path, [i % n for i in range(total)], fpc)
    got = 0
    for idxs, frames in client.chunks:
        got += len(idxs)
        int(frames.max())  # a consumer reads every pixel
        time.sleep(delay)
    elapsed = time.perf_counter() - start
    stop.set()
print(json.dumps({"frames": got, "growth_mb": (peak[0] - before) / 1e6, "chunk_mb": chunk_bytes / 1e6,
                  "window_mb": window * chunk_bytes / 1e6, "consumer_fps": got / elapsed}))
"""


def bench_memory(path: str, total: int, frames_per_chunk: int, delay: float, window: int = 2) -> dict[str, Any]:
    """Client resident memory growth while a slow consumer takes ``total`` frames, in a fresh process."""
    args = [path, str(total), str(frames_per_chunk), str(delay), str(window)]
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def bench_workers(
    path: str, rounds: int, counts: Sequence[int], frames_per_chunk: int, modes: Sequence[str] = ("threads", "processes")
) -> dict[str, dict[str, list[float]]]:
    """Frames/s of large requests (every frame in order; every frame shuffled) on a server with
    ``k`` CPUs for each ``k`` in ``counts`` (pinned to the first ``k`` of ours; all of them
    beyond), decoding with ``k`` threads (``--workers k``) or ``k`` worker processes
    (``--worker-processes k``; with one CPU the server's own thread decodes either way, so
    only threads are measured); and with one thread on all our CPUs (``one thread on k``),
    against which the ``threads k`` row on the same CPUs shows what more decoders gain there.

    Rows alternate within each round, so a busy machine slows them alike. Each server first
    streams the whole video once, so the figures are of a running server.

    Returns:
        ``{"in_order"|"shuffled": {"threads k"|"processes k": [frames/s per round]}}``, and
        under ``"in_order_cpu_ms"``/``"shuffled_cpu_ms"`` the CPU time the server and its
        worker processes spent per frame (less noisy than frames/s on a shared machine).
    """
    from ._process import ServerProcess

    n = len(_frame_pts(path))
    order = [int(i) for i in np.random.default_rng(3).permutation(n)]
    cpus = sorted(os.sched_getaffinity(0))
    rows = [(mode, k) for k in counts for mode in modes if mode == "threads" or k > 1]
    # One decoder on every CPU: what k threads on every CPU gain over it (the default's choice).
    rows += [("one thread on", k) for k in counts if k == len(cpus) > 1]
    names = ("in_order", "shuffled", "in_order_cpu_ms", "shuffled_cpu_ms")
    out: dict[str, dict[str, list[float]]] = {name: {f"{mode} {k}": [] for mode, k in rows} for name in names}
    for _ in range(rounds):
        for mode, k in rows:
            options = {"threads": ["--workers", str(k)], "one thread on": ["--workers", "1"]}.get(
                mode, ["--workers", "1", "--worker-processes", str(k)])
            with _affinity(set(cpus[: max(1, k)])):
                server = ServerProcess(options=options)
            try:
                with AsyncVideo(server.endpoint) as client:
                    client.load_by_chunk(Video(path, grayscale=False), None, frames_per_chunk)
                    _drain(client)
                    for name, idxs in (("in_order", None), ("shuffled", order)):
                        client.load_by_chunk(Video(path, grayscale=False), idxs, frames_per_chunk)
                        cpu = _tree_cpu_s(server.pid)
                        t, count = _timed(partial(_drain, client))
                        out[name][f"{mode} {k}"].append(count / t)
                        out[f"{name}_cpu_ms"][f"{mode} {k}"].append(1000 * (_tree_cpu_s(server.pid) - cpu) / count)
            finally:
                server.stop()
    return out


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` and its children have used so far."""
    total = 0.0
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@contextlib.contextmanager
def _affinity(cpus: set[int]) -> Iterator[None]:
    """This process on ``cpus`` meanwhile (what it starts keeps them)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def bench_scale_out(rounds: int, frames_per_chunk: int = 32) -> dict[int, list[float]]:
    """Frames/s of one request spread over 1, 2 (and 3) standalone servers on loopback.

    Each server is pinned to its own CPU, standing in for a machine of its own;
    unpinned, a single server already keeps a small machine busy.
    """
    from ._process import READY_LINE

    folder = Path(tempfile.mkdtemp(prefix="asyncframes-bench-"))
    clip = write_clip(folder / "short_gops.mp4", frames=960, size=(480, 640), gop=frames_per_chunk, bframes=2)
    cpus = sorted(os.sched_getaffinity(0))
    servers: list[tuple[subprocess.Popen, str]] = []
    results: dict[int, list[float]] = {}
    try:
        for cpu in cpus[:3]:
            proc = subprocess.Popen(
                [sys.executable, "-m", "asyncframes", "serve", "--bind", "tcp://127.0.0.1:*", "--root", str(folder),
                 "--log-level", "WARNING", "--workers", "1"],
                stdout=subprocess.PIPE, text=True, preexec_fn=partial(os.sched_setaffinity, 0, {cpu}),
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith(READY_LINE), line
            servers.append((proc, line.split()[-1]))
        for _ in range(rounds):
            for n in range(1, len(servers) + 1):
                with AsyncVideo([endpoint for _, endpoint in servers[:n]]) as client:
                    client.load_by_chunk(clip.name, list(range(64)), frames_per_chunk)  # warm every server's reader
                    _drain(client)
                    client.load_by_chunk(clip.name, None, frames_per_chunk)
                    t, count = _timed(partial(_drain, client))
                    results.setdefault(n, []).append(count / t)
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait()
    return results


# -- optional third-party readers ----------------------------------------------------

OTHER_LABELS = {
    "opencv": "OpenCV VideoCapture + BGR->RGB",
    "decord": "decord, batches of 64",
    "torchcodec": "torchcodec VideoDecoder, per frame",
}

RANDOM_LABELS = {
    "decord": "decord get_batch, one call",
    "torchcodec": "torchcodec get_frames_at, one call",
}


def optional_readers() -> Iterator[tuple[str, Callable[[str], int]]]:
    """Sequential readers from other libraries, when they are installed (never required)."""
    try:
        import cv2  # type: ignore[import-not-found]

        def opencv(path: str) -> int:
            cap, n = cv2.VideoCapture(path), 0
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                n += 1
            cap.release()
            return n

        yield "opencv", opencv
    except ImportError:
        pass
    try:
        import decord  # type: ignore[import-not-found]

        def decord_reader(path: str) -> int:
            vr = decord.VideoReader(path)
            # frames, not elements: len() of a decord NDArray counts every element
            return sum(vr.get_batch(list(range(i, min(i + 64, len(vr))))).shape[0] for i in range(0, len(vr), 64))

        yield "decord", decord_reader
    except ImportError:
        pass
    try:
        from torchcodec.decoders import VideoDecoder  # type: ignore[import-not-found]

        def torchcodec_reader(path: str) -> int:
            # frame by frame (exact seek mode, its default): measured faster here (2-CPU VM,
            # torchcodec 0.17) than get_frames_in_range in batches of 64. FFmpeg's threads as
            # for PyAV done well (thread_type AUTO): torchcodec's default is one thread.
            dec = VideoDecoder(path, num_ffmpeg_threads=0)
            return sum(1 for _ in dec)

        yield "torchcodec", torchcodec_reader
    except ImportError:
        pass


# -- the report ----------------------------------------------------------------------


def _describe(path: str) -> str:
    with av.open(path) as container:
        s = container.streams.video[0]
        return f"{s.codec_context.width}x{s.codec_context.height} {s.codec_context.name}"


def _spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much a figure moved between rounds."""
    return (max(values) - min(values)) / statistics.median(values) if values and statistics.median(values) else 0.0


def print_video(name: str, desc: str, res: Results, fpc: int, random_count: int) -> None:
    m = res.median
    base = m("sequential.pyav_best_fps")
    rbase = m("random.pyav_seek_fps")
    rounds = len(res.samples["sequential.pyav_best_fps"])
    print(f"\n{name}: {res.notes['frames']} frames, {desc}; {fpc} frames/chunk; medians of {rounds} interleaved rounds")
    print("  sequential (consumers read every page)   frames/s   x baseline   min-max")

    def row(label: str, key: str, target: str = "") -> None:
        values = res.samples[key]
        print(f"    {label:38s} {m(key):8.0f}   {m(key) / base:6.2f}   {min(values):7.0f}-{max(values):<7.0f} {target}")

    row("PyAV naive (defaults)", "sequential.pyav_naive_fps")
    row("PyAV done well (baseline)", "sequential.pyav_best_fps")
    for other in [k for k in res.samples if k.startswith("sequential.other.")]:
        row(OTHER_LABELS.get(other.split(".")[-1].removesuffix("_fps"), other), other)
    for key, why in res.notes.items():
        if key.startswith("sequential.other.") and key.endswith("_failed"):
            print(f"    {OTHER_LABELS.get(key.split('.')[-1].removesuffix('_failed'), key):38s} failed: {why}")
    row("asyncframes, running server", "sequential.asyncframes_fps", "target >= 1.00")
    row("  consumer reading one pixel per chunk", "sequential.asyncframes_one_pixel_fps")
    row("asyncframes, 2nd from_video() (+open)", "sequential.second_from_video_fps", "target >= 0.90")
    if rounds > 1 and _spread(res.samples["sequential.pyav_best_fps"]) > UNSTABLE:
        print(f"    ! the baseline moved {100 * _spread(res.samples['sequential.pyav_best_fps']):.0f}% between rounds: "
              "the machine is busy; rerun before trusting these ratios")
    print(f"  random access, {random_count} random indices     frames/s   x baseline")
    print(f"    PyAV seek per frame (baseline)         {rbase:8.0f}   {1:6.2f}")
    print(f"    asyncframes, one request               {m('random.asyncframes_fps'):8.0f}   "
          f"{m('random.asyncframes_fps') / rbase:6.2f}   target >= 3; frames exact: {res.notes['random.exact']}")
    for other in [k for k in res.samples if k.startswith("random.other.")]:
        name = other.split(".")[-1].removesuffix("_fps")
        print(f"    {RANDOM_LABELS.get(name, name):38s} {m(other):8.0f}   {m(other) / rbase:6.2f}   "
              f"frames exact: {res.notes[f'random.other.{name}_exact']}")
    for key, why in res.notes.items():
        if key.startswith("random.other.") and key.endswith("_failed"):
            name = key.split(".")[-1].removesuffix("_failed")
            print(f"    {RANDOM_LABELS.get(name, name):38s} failed: {why}")
    print("  one frame per request                    p50 ms     p95 ms")
    p95 = res.pct
    print(f"    in-process seek + decode               {m('scrub.pyav_seek_ms'):8.1f}   {p95('scrub.pyav_seek_ms', 95):8.1f}")
    print(f"    asyncframes, cold frame                {m('scrub.asyncframes_cold_ms'):8.1f}   "
          f"{p95('scrub.asyncframes_cold_ms', 95):8.1f}   target p95 <= {1.2 * p95('scrub.pyav_seek_ms', 95):.1f}")
    print(f"    asyncframes, same frame again          {m('scrub.asyncframes_repeat_ms'):8.1f}   "
          f"{p95('scrub.asyncframes_repeat_ms', 95):8.1f}   target p50 <= 5")
    print(f"    stepping forward, {1000 * STEP_PAUSE_S:.0f} ms pauses: in-process {m('step.pyav_ms'):8.1f}   "
          f"{p95('step.pyav_ms', 95):8.1f}")
    print(f"    stepping forward: asyncframes          {m('step.asyncframes_ms'):8.1f}   {p95('step.asyncframes_ms', 95):8.1f}"
          f"   target p95 <= {1.2 * p95('step.pyav_ms', 95):.1f}")
    print("  time to the first chunk                  p50 ms")
    print(f"    fresh process, server started          {m('first_chunk.cold_process_ms'):8.1f}              target <= 250")
    print(f"    fresh process, per-user server running {m('first_chunk.cold_user_ms'):8.1f}              target <= 250")
    print(f"    fresh process, in-process PyAV         {m('first_chunk.cold_pyav_ms'):8.1f}")
    print(f"    this process, server start             {m('first_chunk.fresh_ms'):8.1f}")
    print(f"    this process, server prestarted        {m('first_chunk.prestarted_ms'):8.1f}   (AsyncVideo.prestart() at app start)")
    print(f"    running server, video open             {m('first_chunk.running_ms'):8.1f}              "
          f"target <= {m('first_chunk.pyav_open_decode_ms'):.1f} (in-process open + decode)")
    print(f"    in-process: open + decode {fpc:3d} frames  {m('first_chunk.pyav_open_decode_ms'):8.1f}")
    if "open.pyav_ms" in res.samples:
        print("  opening a video, metadata in hand        p50 ms     p95 ms")
        print(f"    in-process av.open                     {m('open.pyav_ms'):8.1f}   {p95('open.pyav_ms', 95):8.1f}")
        print(f"    asyncframes info(), running server     {m('open.asyncframes_ms'):8.1f}   {p95('open.asyncframes_ms', 95):8.1f}"
              f"   target p50 <= {m('open.pyav_ms'):.1f} (index record on disk)")
    print(f"  AsyncVideo() blocks {m('client.constructor_ms'):.2f} ms (target <= 5); close() {m('client.close_ms'):.2f} ms (target <= 5)")


#: A baseline whose rounds spread more than this (relative to its median) is flagged.
UNSTABLE = 0.15


def bench_clips(
    videos: Sequence[str], rounds: int, clips: int = 200, clip_frames: int = 8
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Training clips: ``clips`` random clips of ``clip_frames`` consecutive frames over ``videos``,
    one request per clip (clips/s), against PyAV done well in-process and the optional readers;
    and all of a video's clips in one request. Every clip is checked against PyAV's.
    Also returns the optional readers that failed, and how (their rows are left out)."""
    rng = np.random.default_rng(11)
    counts = {v: len(_frame_pts(v)) for v in videos}
    picks = [(v, int(rng.integers(0, max(1, counts[v] - clip_frames)))) for v in rng.choice(list(videos), clips)]
    out: dict[str, list[float]] = {"pyav": [], "asyncframes": [], "asyncframes_one_request_per_video": []}
    exact = True
    others_exact: dict[str, bool] = {}
    failed: dict[str, str] = {}  # other libraries that failed on these videos, and how
    for _ in range(rounds):
        readers = {v: SeekingReader(v) for v in videos}
        try:
            start = time.perf_counter()
            expected = [np.stack(readers[v].read_all(range(i, i + clip_frames))) for v, i in picks]
            out["pyav"].append(clips / (time.perf_counter() - start))
        finally:
            for reader in readers.values():
                reader.close()
        # Digests, not the clips: every reader's clips held at once took gigabytes at 1080p.
        want = _digests(expected)
        del expected
        with AsyncVideo() as client:
            for v in videos:
                client.info(Video(v, grayscale=False))
            start = time.perf_counter()
            got = []
            for v, i in picks:
                client.load_by_chunk(Video(v, grayscale=False), range(i, i + clip_frames), clip_frames)
                got.append(next(iter(client.chunks)).frames.copy())
            out["asyncframes"].append(clips / (time.perf_counter() - start))
            exact = exact and _digests(got) == want
            del got
            start = time.perf_counter()
            for v in videos:
                mine = [i for w, i in picks if w == v]
                client.load_by_chunk(Video(v, grayscale=False), [j for i in mine for j in range(i, i + clip_frames)], clip_frames)
                for _chunk in client.chunks:
                    pass
            out["asyncframes_one_request_per_video"].append(clips / (time.perf_counter() - start))
        for name, open_video, read_batch, as_rgb in optional_batch_readers():
            if name in failed:
                continue
            try:
                handles = {v: open_video(v) for v in videos}  # opened before the clock, like PyAV's readers
                start = time.perf_counter()
                theirs = [read_batch(handles[v], list(range(i, i + clip_frames))) for v, i in picks]
            except Exception as exc:  # another library's failure on these videos: its row says so
                failed[name] = _failure(exc)
                continue
            out.setdefault(name, []).append(clips / (time.perf_counter() - start))
            others_exact[name] = others_exact.get(name, True) and _digests(as_rgb(a) for a in theirs) == want
            del handles, theirs
    out["exact"] = [float(exact)]
    for name, ok in others_exact.items():
        out[f"exact.{name}"] = [float(ok)]
    return out, failed


def clips_row(title: str, videos: Sequence[str], rounds: int, clips: int) -> dict[str, Any]:
    """Run :func:`bench_clips` over ``videos``, print its rows and return them for the report."""
    out, failed = bench_clips(videos, rounds, clips=clips)
    exact = bool(out.pop("exact")[0])
    others_exact = {k.split(".", 1)[1]: bool(out.pop(k)[0]) for k in list(out) if k.startswith("exact.")}
    base = statistics.median(out["pyav"])
    print(f"\ntraining clips{title}: {clips} random 8-frame clips over {len(videos)} videos, "
          f"one request per clip; clips/s, medians of {rounds} rounds; asyncframes exact: {exact}")
    for name, values in out.items():
        label = {"pyav": "PyAV done well (baseline)", "asyncframes": "asyncframes, one request per clip",
                 "asyncframes_one_request_per_video": "asyncframes, one request per video"}.get(name, name)
        target = "   target >= 1.00" if name == "asyncframes" else ""
        if name in others_exact:
            label, target = f"{name}, one call per clip", f"   exact: {others_exact[name]}"
        print(f"  {label:38s} {statistics.median(values):8.1f}   x{statistics.median(values) / base:5.2f}{target}")
    for name, why in failed.items():
        print(f"  {name + ', one call per clip':38s} failed: {why}")
    report: dict[str, Any] = {name: {"median": statistics.median(v), "samples": v} for name, v in out.items()}
    report["exact"] = exact
    report.update({f"failed_{name}": why for name, why in failed.items()})
    report.update({f"exact_{name}": ok for name, ok in others_exact.items()})
    return report


def _digests(arrays: Iterable[Any]) -> list[tuple[tuple[int, ...], str, bytes]]:
    """Each array's shape, type and a hash of its bytes: equal exactly when the arrays are."""
    out = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        out.append((a.shape, a.dtype.str, hashlib.blake2b(a.data, digest_size=32).digest()))
    return out


def _same(frames: Any, expected: Sequence[np.ndarray]) -> bool:
    """Whether a batch of N x H x W x 3 frames is, frame by frame, what PyAV made."""
    return len(frames) == len(expected) and all(np.array_equal(a, b) for a, b in zip(frames, expected))


#: (name, open a video, read these indices in one call, that batch as N x H x W x 3 RGB)
BatchReader = tuple[str, Callable[[str], Any], Callable[[Any, list[int]], Any], Callable[[Any], Any]]


def optional_batch_readers() -> Iterator[BatchReader]:
    """Batch readers of other libraries, when installed: (name, open a video, read these
    indices in one call, the batch as N x H x W x 3 RGB for the exactness check). Opening is
    kept apart so that it is done before the clock, as for PyAV's readers and our server."""
    try:
        import decord  # type: ignore[import-not-found]

        yield "decord", decord.VideoReader, lambda vr, idxs: vr.get_batch(idxs).asnumpy(), np.asarray
    except ImportError:
        pass
    try:
        from torchcodec.decoders import VideoDecoder  # type: ignore[import-not-found]

        yield ("torchcodec", partial(VideoDecoder, seek_mode="exact", num_ffmpeg_threads=0),  # threads as PyAV's
               lambda dec, idxs: dec.get_frames_at(indices=idxs).data,  # N x 3 x H x W, its own layout
               lambda data: data.permute(0, 2, 3, 1).numpy())
    except ImportError:
        pass


def run(args: argparse.Namespace) -> int:
    videos = [Path(v) for v in args.videos] or default_videos()
    fpc = args.frames_per_chunk
    report: dict[str, Any] = {
        "asyncframes": __version__,
        "pyav": av.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "frames_per_chunk": fpc,
        "videos": {},
    }
    print(f"asyncframes {__version__}, PyAV {av.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()} with {os.cpu_count()} CPUs")
    for video in videos:
        path = str(video)
        res = bench_video(path, args.rounds, args.random, args.scrub, fpc)
        for name, reader in optional_readers():
            for _ in range(args.rounds):
                try:
                    t, count = _timed(partial(reader, path))
                except Exception as exc:  # another library's failure on this video: its row says so
                    res.notes[f"sequential.other.{name}_failed"] = _failure(exc)
                    break
                res.add(f"sequential.other.{name}_fps", count / t)
        print_video(video.name, _describe(path), res, fpc, args.random)
        report["videos"][video.name] = {"path": path, **res.as_dict()}
    if args.clips:
        # By container: MPEG-TS seeks by decode time and needs its own care (in-process too).
        groups = {"clips": ("", [v for v in videos if v.suffix != ".ts"]),
                  "clips_ts": (", MPEG-TS", [v for v in videos if v.suffix == ".ts"])}
        for key, (title, group) in groups.items():
            if group:
                report[key] = clips_row(title, [str(v) for v in group], args.rounds, args.clips)
    if args.memory_frames:
        target = next((v for v in videos if "384x384" in v.name), videos[0])
        mem = bench_memory(str(target), args.memory_frames, fpc, delay=0.04)
        report["memory"] = {"video": target.name, **mem}
        print(f"\nclient memory: {mem['frames']} frames of {target.name} to a consumer taking "
              f"{mem['consumer_fps']:.0f} frames/s: resident memory grew {mem['growth_mb']:.1f} MB; window "
              f"(2 x {mem['chunk_mb']:.1f} MB chunks) {mem['window_mb']:.1f} MB; "
              f"target <= window + 100 = {mem['window_mb'] + 100:.1f} MB")
    counts = args.workers if args.workers is not None else sorted({1, 2, len(os.sched_getaffinity(0))})
    if counts:
        for target in [v for v in videos if "1080p" in v.name or "384x384.mp4" in v.name] or videos[:1]:
            scaling = bench_workers(str(target), args.rounds, counts, fpc)
            print(f"\nworkers: every frame of {target.name} ({fpc}-frame chunks), on a running server pinned to k CPUs, "
                  f"k threads or k worker processes; frames/s, medians (min-max) of {args.rounds} alternating rounds, "
                  "and the CPU time of the server and its workers per frame")
            print("                          in order                   shuffled")
            base = {name: statistics.median(next(iter(values.values()))) for name, values in scaling.items()}
            for label in scaling["in_order"]:
                cells = []
                for name in ("in_order", "shuffled"):
                    v, cpu = scaling[name][label], statistics.median(scaling[f"{name}_cpu_ms"][label])
                    cells.append(f"{statistics.median(v):6.0f} ({min(v):4.0f}-{max(v):4.0f}) x{statistics.median(v) / base[name]:4.2f}, "
                                 f"CPU {cpu:5.1f} ms/frame")
                print(f"  {label:17s} {cells[0]}   {cells[1]}")
            report.setdefault("workers", {})[target.name] = {
                name: {label: {"median": statistics.median(v), "samples": v} for label, v in values.items()}
                for name, values in scaling.items()
            }
    if args.scale_out:
        spread = bench_scale_out(args.rounds)
        base = statistics.median(spread[1])
        print("\nscale-out: 960 frames of 640x480 with 32-frame GOPs over loopback servers, each pinned to its own CPU")
        for k, values in spread.items():
            print(f"  {k} server(s)   {statistics.median(values):8.0f} frames/s   x{statistics.median(values) / base:5.2f}")
        report["scale_out"] = {str(k): {"median": statistics.median(v), "samples": v} for k, v in spread.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0

