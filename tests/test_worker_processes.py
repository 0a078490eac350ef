"""Decoder worker processes (``serve --worker-processes N``): GOP shares decoded by other
processes straight into the shared slot. Real processes throughout: a server started with
the option and a client of it, or a :class:`DecoderPool` with real worker processes for the
stories that need to reach into the middle of a chunk (a worker killed, a cancel)."""

from __future__ import annotations

import glob
import os
import select
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import pytest

from asyncframes import AsyncVideo, Video
from asyncframes._opener import VideoOpener
from asyncframes._pool import DecoderPool
from asyncframes._process import ServerProcess
from asyncframes._reader import FrameCache, ReadInterrupted
from asyncframes._shm import AVAILABLE, SharedBuffer
from asyncframes.errors import ServerError

from .conftest import assert_frames_exact, shuffled_with_duplicates

pytestmark = pytest.mark.skipif(not (AVAILABLE and sys.platform.startswith("linux")), reason="needs memfd and /proc")

OPTIONS = ["--worker-processes", "2", "--workers", "1"]


def children(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``."""
    kids = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            kids.add(int(stat.split("/")[2]))
    return kids


def exits_within(pid: int, within: float) -> bool:
    """Whether process ``pid`` has ended, or ends within ``within`` seconds (waiting on its pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], within)
        return bool(ready)
    finally:
        os.close(fd)


def has_open(pid: int, path: str) -> bool:
    """Whether process ``pid`` holds ``path`` open (a worker keeps the videos it decoded open)."""
    target = os.path.realpath(path)
    for link in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            if os.readlink(link) == target:
                return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(options=OPTIONS)
    try:
        yield proc
    finally:
        proc.stop()


def stream(client: AsyncVideo, video: Video, idxs, frames_per_chunk: int) -> tuple[list[int], np.ndarray]:
    client.load_by_chunk(video, idxs, frames_per_chunk)
    got = list(client.chunks)
    return [i for f, _ in got for i in f], np.concatenate([f for _, f in got])


@pytest.mark.parametrize(
    "clip_name", ["h264_gops.mp4", "hevc.mp4", "vp9.webm", "h264.ts", "mpeg4_bframes.avi", "h264_vfr.mp4", "ffv1.mkv"]
)
def test_worker_processes_are_exact_in_order_and_shuffled_with_duplicates(server, make_clip, clip_name):
    clip = make_clip(clip_name)
    workers = children(server.pid)
    assert len(workers) == 2
    with AsyncVideo(server.endpoint) as client:
        n = client.info(clip).frame_count
        for idxs in (None, shuffled_with_duplicates(n, 40, seed=9)):
            got, frames = stream(client, Video(str(clip), grayscale=False), idxs, 16)
            assert_frames_exact(clip, got, frames)
    assert all(has_open(pid, str(clip)) for pid in workers), "the worker processes decoded the shares"


def test_worker_processes_serve_grayscale_exactly(server, make_clip):
    clip = make_clip("gray.mp4")
    with AsyncVideo(server.endpoint) as client:
        got, frames = stream(client, Video(str(clip), grayscale=True), shuffled_with_duplicates(40, 20, seed=3), 20)
    assert frames.shape[-1] == 1
    assert_frames_exact(clip, got, np.repeat(frames, 3, axis=-1))


def test_inline_chunks_are_decoded_by_threads_as_before(server, make_clip):
    clip = make_clip("h264_gops.mp4")
    with AsyncVideo(server.endpoint, shared_memory=False) as client:
        got, frames = stream(client, Video(str(clip), grayscale=False), shuffled_with_duplicates(150, 30, seed=4), 48)
    assert_frames_exact(clip, got, frames)


def test_a_worker_killed_while_idle_is_replaced_and_the_next_request_is_exact(make_clip):
    clip = make_clip("h264_gops.mp4")
    proc = ServerProcess(options=OPTIONS)
    try:
        victim = min(children(proc.pid))
        os.kill(victim, signal.SIGKILL)
        assert exits_within(victim, 10)
        with AsyncVideo(proc.endpoint) as client:
            got, frames = stream(client, Video(str(clip), grayscale=False), None, 48)
        assert_frames_exact(clip, got, frames)
        workers = children(proc.pid)
        assert len(workers) == 2 and victim not in workers
    finally:
        proc.stop()


def test_a_killed_server_leaves_no_worker_process_behind(make_clip):
    clip = make_clip("h264_gops.mp4")
    proc = ServerProcess(options=OPTIONS)
    try:
        with AsyncVideo(proc.endpoint) as client:
            stream(client, Video(str(clip), grayscale=False), None, 48)
            workers = children(proc.pid)
            assert len(workers) == 2
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait()
    finally:
        proc.kill()
    assert all(exits_within(pid, 10) for pid in workers), f"worker processes {workers} outlived their server"


def test_a_stopped_server_stops_its_worker_processes(make_clip):
    proc = ServerProcess(options=OPTIONS)
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.stop()
    assert proc.exit_code() == 0
    assert all(exits_within(pid, 10) for pid in workers)


def test_a_cancelled_stream_stops_and_the_next_request_is_exact(server, make_clip):
    clip = make_clip("h264_gops.mp4")
    with AsyncVideo(server.endpoint) as client:
        client.load_by_chunk(Video(str(clip), grayscale=False), None, 100)
        first = client.next_chunk()
        assert first is not None
        client.cancel()
        got, frames = stream(client, Video(str(clip), grayscale=False), shuffled_with_duplicates(150, 20, seed=5), 48)
    assert_frames_exact(clip, got, frames)


# -- a pool with real worker processes, reached into mid-chunk ------------------------------------


@contextmanager
def pool_of(processes: int) -> Iterator[tuple[DecoderPool, VideoOpener]]:
    opener = VideoOpener()
    pool = DecoderPool(opener, 1, 0, processes=processes)
    try:
        yield pool, opener
    finally:
        pids = pool.processes.pids() if pool.processes is not None else []
        pool.close()
        opener.close()
        assert not any(os.path.exists(f"/proc/{pid}") for pid in pids), "close() reaps every worker"


def read(
    pool: DecoderPool, opener: VideoOpener, clip, idxs: list[int],
    interrupt: Optional[Callable[[], bool]] = None, cache: Optional[FrameCache] = None,
) -> np.ndarray:
    video = Video(str(clip), grayscale=False)
    main = opener.open(video)
    shape = (len(idxs), *main.frame_shape(False, video))
    buf = SharedBuffer(int(np.prod(shape)))
    try:
        out = buf.view(shape)
        pool.read(video, idxs, False, out, identity=main.signature, shared=buf, cache=cache, interrupt=interrupt)
        return out.copy()
    finally:
        del out
        buf.close()


def test_a_worker_killed_mid_chunk_fails_that_chunk_clearly_and_a_new_worker_serves_the_next(make_clip):
    clip = make_clip("h264_gops.mp4")
    idxs = shuffled_with_duplicates(150, 30, seed=6)
    with pool_of(2) as (pool, opener):
        victim = pool.processes.pids()[0]
        os.kill(victim, signal.SIGSTOP)  # it cannot finish its share before it is killed
        killed = []

        def kill_once() -> bool:  # asked while the shares decode: the jobs are out
            if not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            return False

        with pytest.raises(ServerError, match=rf"decoder worker process \(pid {victim}\) killed by SIGKILL"):
            read(pool, opener, clip, idxs, interrupt=kill_once)
        assert not os.path.exists(f"/proc/{victim}"), "the dead worker is reaped"
        assert_frames_exact(clip, idxs, read(pool, opener, clip, idxs))
        assert victim not in pool.processes.pids() and len(pool.processes.pids()) == 2


def test_a_cancel_stops_every_share_and_the_workers_serve_on(make_clip):
    clip = make_clip("h264_gops.mp4")
    idxs = shuffled_with_duplicates(150, 60, seed=7)
    with pool_of(2) as (pool, opener):
        workers = pool.processes.pids()
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)  # they take their jobs only after the cancel

        def cancel() -> bool:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            return True

        with pytest.raises(ReadInterrupted):
            read(pool, opener, clip, idxs, interrupt=cancel)
        assert pool.processes.pids() == workers
        assert_frames_exact(clip, idxs, read(pool, opener, clip, idxs))


def test_request_caches_live_in_the_workers_and_stay_exact(make_clip):
    clip = make_clip("h264_bframes_longgop.mp4")
    clip2 = make_clip("h264_gops.mp4")
    order = shuffled_with_duplicates(150, 30, seed=8)
    chunks = [order[k : k + 36] for k in range(0, len(order), 36)]
    with pool_of(3) as (pool, opener):
        cache = FrameCache(1 << 30)
        for k, chunk in enumerate(chunks):
            cache.want(later=[i for c in chunks[k + 1 :] for i in c], now=chunk)
            assert_frames_exact(clip2, chunk, read(pool, opener, clip2, chunk, cache=cache))
        del cache
        assert_frames_exact(clip, order[:40], read(pool, opener, clip, order[:40]))


def test_a_confined_server_s_workers_open_only_what_it_resolved(tmp_path, make_clip):
    import shutil
    import subprocess

    from asyncframes._process import READY_LINE, serve_command
    from asyncframes.errors import VideoAccessError

    root = tmp_path / "root"
    root.mkdir()
    clip = shutil.copy(make_clip("h264_gops.mp4"), root / "clip.mp4")
    proc = subprocess.Popen(
        serve_command("--bind", f"ipc://{tmp_path}/s", "--root", str(root), "--log-level", "WARNING", *OPTIONS),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(READY_LINE), line
        with AsyncVideo(line.split()[-1]) as client:
            idxs = shuffled_with_duplicates(150, 30, seed=10)
            got, frames = stream(client, Video("clip.mp4", grayscale=False), idxs, 48)
            with pytest.raises(VideoAccessError):
                client.info(Video(str(make_clip("hevc.mp4"))))
        assert_frames_exact(clip, got, frames)
        workers = children(proc.pid)
        assert len(workers) == 2 and all(has_open(pid, str(clip)) for pid in workers)
    finally:
        proc.terminate()
        proc.wait()
    assert proc.returncode == 0
    assert all(exits_within(pid, 10) for pid in workers)


def maps_memfd(pid: int, name: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return f"/memfd:{name}" in f.read()


def test_workers_let_go_of_a_closed_slot_when_tidied(make_clip):
    clip = make_clip("h264_gops.mp4")
    idxs = shuffled_with_duplicates(150, 30, seed=11)
    with pool_of(2) as (pool, opener):
        video = Video(str(clip), grayscale=False)
        main = opener.open(video)
        shape = (len(idxs), *main.frame_shape(False, video))
        buf = SharedBuffer(int(np.prod(shape)), "asyncframes-tidy-test")
        pool.read(video, idxs, False, buf.view(shape), identity=main.signature, shared=buf)
        assert_frames_exact(clip, idxs, buf.view(shape).copy())
        workers = pool.processes.pids()
        assert all(maps_memfd(pid, "asyncframes-tidy-test") for pid in workers)
        buf.close()
        pool.tidy()
        assert not any(maps_memfd(pid, "asyncframes-tidy-test") for pid in workers)
        assert pool.processes.pids() == workers


def test_jobs_and_answers_cross_as_msgpack_never_pickle():
    from asyncframes import _procwire as procwire
    from asyncframes._files import FileIdentity
    from asyncframes.errors import ServerError, VideoDecodeError

    video = Video("clip.mp4", grayscale=False, crop=(0, 0, 8, 8))
    identity = (FileIdentity(1, 2, 3, 4, 5),)
    job = {"job": 7, "video": video, "identity": identity, "idxs": [3, 1], "shape": (2, 8, 8, 3), "options": {"a": "b"}}
    back = procwire.unpack_job(procwire.pack_job(job))
    assert back["video"] == video and back["identity"] == identity and back["idxs"] == [3, 1] and back["shape"] == [2, 8, 8, 3]
    assert procwire.unpack_answer(procwire.pack_answer("done", 7)) == ["done", 7]
    _, number, error = procwire.unpack_answer(procwire.pack_answer("error", 7, VideoDecodeError("frame 3 is damaged")))
    assert number == 7 and type(error) is VideoDecodeError and str(error) == "frame 3 is damaged"
    _, _, error = procwire.unpack_answer(procwire.pack_answer("error", 7, KeyError("x")))
    assert type(error) is ServerError and "KeyError" in str(error)
