"""The fast paths keep every promise: shared memory, decoder workers, caches, and the bench.

Speed itself is measured by ``asyncframes bench``, never here; these tests check
that going fast never returns a wrong frame, never overwrites a frame the caller
holds, and never leaves memory behind when a process dies.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from asyncframes import AsyncVideo, FrameIndexError, ServerDiedError, Video
from asyncframes import _shm as shm
from asyncframes._cli import main as cli_main
from asyncframes._sample import write_clip

from .conftest import assert_frames_exact, reference_frames, shuffled_with_duplicates, wait_until

needs_shm = pytest.mark.skipif(not shm.AVAILABLE, reason="shared memory needs Linux memfd")


def shared_mappings(pid: "int | str" = "self") -> list[str]:
    """Our shared-memory slots mapped into a process."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "memfd:asyncframes" in line]


def named_shared_memory(pid: int) -> list[str]:
    """Files of /dev/shm a process maps or holds open (ours use anonymous memfds only).

    Asked of our own server, never by scanning /dev/shm, which other programs share.
    """
    with open(f"/proc/{pid}/maps") as f:
        named = [line for line in f if "/dev/shm/" in line]
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/"):
            named.append(target)
    return named


def shared_fds(pid: int) -> set[str]:
    """Our shared-memory slot files a process holds open (Python's mmap holds a second fd of each)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "memfd:asyncframes-slot" in target:
            found.add(target)
    return found


def shared_slots(pid: int) -> set[int]:
    """The shared-memory slots a process holds, as the inodes of their memfds (names repeat:
    slot numbers are per client)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "memfd:asyncframes-slot" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                found.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:
            continue
    return found


@needs_shm
def test_frames_arrive_in_shared_memory_without_a_copy(make_clip):
    clip = make_clip("h264_gops.mp4")
    with AsyncVideo.from_video(clip, frames_per_chunk=32) as av:
        chunks = list(av.chunks)
        assert shared_mappings(), "the client maps the server's slots"
    assert all(type(frames.base).__name__ == "Lease" for _, frames in chunks)
    idxs = [i for frame_idxs, _ in chunks for i in frame_idxs]
    assert_frames_exact(clip, idxs, np.concatenate([frames for _, frames in chunks]))


@needs_shm
def test_chunks_the_caller_keeps_are_never_overwritten(make_clip):
    """Keeping every chunk of a long request: slots run out, later chunks come inline, all stay exact."""
    clip = make_clip("h264_gops.mp4")
    idxs = shuffled_with_duplicates(150, 150, seed=4)
    with AsyncVideo.from_video(clip, idxs, frames_per_chunk=10) as av:
        kept = list(av.chunks)  # 30 chunks held at once, far more than the server has slots
        frames = np.concatenate([f for _, f in kept])
        bases = {type(f.base).__name__ for _, f in kept}
    assert "Lease" in bases and len(bases) == 2, "the first chunks are shared, the rest inline"
    assert_frames_exact(clip, idxs, frames)


@needs_shm
def test_slots_are_reused_once_the_caller_lets_go(make_clip):
    clip = make_clip("h264_gops.mp4")
    with AsyncVideo(window=2, server="own") as av:  # its server's slots are all ours
        for _ in range(3):
            av.load_by_chunk(clip, shuffled_with_duplicates(150, 50, seed=1), frames_per_chunk=8)
            for frame_idxs, frames in av.chunks:
                assert_frames_exact(clip, frame_idxs, frames)
        assert len(shared_fds(av.server_pid)) <= 2 + 3, "window + held + releases in flight"


@needs_shm
def test_without_shared_memory_frames_come_inline_and_exact(make_clip):
    clip = make_clip("h264_gops.mp4")
    with AsyncVideo.from_video(clip, frames_per_chunk=32, shared_memory=False, server="own") as av:
        chunks = list(av.chunks)
        assert not shared_fds(av.server_pid)
    assert all(type(frames.base).__name__ != "Lease" for _, frames in chunks)
    assert_frames_exact(clip, [i for f, _ in chunks for i in f], np.concatenate([f for _, f in chunks]))


@needs_shm
def test_server_killed_mid_stream_leaves_no_shared_memory(make_clip):
    clip = make_clip("h264_gops.mp4")
    av = AsyncVideo.from_video(clip, list(range(150)) * 20, frames_per_chunk=4)
    chunks = av.chunks
    first = next(chunks)
    assert shared_mappings()
    assert not named_shared_memory(av.server_pid), "nothing is ever named, so nothing can outlive the server"
    os.kill(av.server_pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(ServerDiedError):
        # Chunks received before the kill may still come; hold none of them (a loop
        # variable would keep the last one's shared slot mapped after the loop).
        collections.deque(chunks, maxlen=0)
    assert time.monotonic() - start < 5
    assert_frames_exact(clip, first.frame_idxs, first.frames)  # what we held is still intact
    av.close()
    del first, chunks
    gc.collect()  # the ServerDiedError's traceback is a reference cycle
    assert not shared_mappings(), "the last mapping went with the last array"


CLIENT_SCRIPT = """
import sys
from asyncframes import AsyncVideo
av = AsyncVideo(sys.argv[1])
av.load_by_chunk(sys.argv[2], list(range(150)) * 50, frames_per_chunk=4)
next(av.chunks)
print("streaming", flush=True)
sys.stdin.read()
"""


@needs_shm
def test_client_killed_mid_stream_frees_its_slots_and_the_server_serves_on(tmp_path, make_clip):
    clip = make_clip("h264_gops.mp4")
    shutil.copy(clip, tmp_path / "gops.mp4")
    server = subprocess.Popen(
        [sys.executable, "-m", "asyncframes", "serve", "--bind", "tcp://127.0.0.1:*", "--root", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        endpoint = server.stdout.readline().split()[-1]
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, endpoint, "gops.mp4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert client.stdout.readline().strip() == "streaming"
        assert shared_fds(server.pid), "the server decodes into shared slots for this client"
        client.kill()
        client.wait()
        wait_until(lambda: not shared_fds(server.pid), 10, "the server to close the slots of the client that died")
        with AsyncVideo.from_video("gops.mp4", [149, 0], endpoint=endpoint) as av:
            (idxs, frames), = av.chunks
            assert_frames_exact(clip, idxs, frames)
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("clip_name", ["h264_gops.mp4", "h264_vfr.mp4", "h264.mkv", "vp9.webm"])
def test_two_decoder_workers_are_exact(make_clip, clip_name):
    clip = make_clip(clip_name)
    with AsyncVideo(workers=2) as av:
        n = av.info(clip).frame_count
        for idxs in (None, shuffled_with_duplicates(n, 40, seed=9)):
            av.load_by_chunk(Video(str(clip), grayscale=False), idxs, frames_per_chunk=48)
            got = list(av.chunks)
            assert_frames_exact(clip, [i for f, _ in got for i in f], np.concatenate([f for _, f in got]))


def test_two_decoder_workers_on_the_shared_video(centered_pair):
    with AsyncVideo(workers=2) as av:
        idxs = shuffled_with_duplicates(1100, 100, seed=2)
        av.load_by_chunk(centered_pair, idxs, frames_per_chunk=128)
        frames = np.concatenate([f for _, f in av.chunks])
    assert frames.shape == (len(idxs), 384, 384, 1)
    assert_frames_exact(centered_pair, idxs, frames)


def test_a_frame_asked_again_is_the_same_frame_and_follows_the_file(tmp_path):
    """The recent-frames cache serves a repeated frame, and never a stale one after the file changes."""
    path = tmp_path / "clip.mp4"
    write_clip(path, frames=30, gop=10)
    with AsyncVideo() as av:
        for i in (17, 17, 3, 17):
            av.load_by_chunk(path, [i], 1)
            (idxs, frames), = av.chunks
            assert_frames_exact(path, idxs, frames)
        first = frames.copy()
        write_clip(path, frames=30, gop=10, size=(96, 128), rate=25, options={"crf": "40"})  # same name, new pixels
        from .conftest import _reference

        _reference.cache_clear()
        av.load_by_chunk(path, [17], 1)
        (idxs, frames), = av.chunks
        assert_frames_exact(path, idxs, frames)
        assert not np.array_equal(frames, first)


def test_bench_prints_every_figure_and_writes_json(tmp_path, make_clip, capsys, monkeypatch):
    import asyncframes._bench as bench

    def fails(*_args):
        raise RuntimeError("Requested next frame while there are no more frames left to decode.")

    # Another library that fails on a video (torchcodec on an MPEG-TS clip did): its rows say so, the bench goes on.
    monkeypatch.setattr(bench, "optional_readers", lambda: iter([("other", fails)]))
    monkeypatch.setattr(bench, "optional_batch_readers", lambda: iter([("other", fails, fails, fails)]))
    clip = make_clip("h264_gops.mp4")
    out = tmp_path / "bench.json"
    code = cli_main(
        ["bench", str(clip), "--rounds", "1", "--random", "20", "--scrub", "3", "--memory-frames", "300", "--clips", "20",
         "--workers", "1", "2", "--json", str(out)]
    )
    assert code == 0
    text = capsys.readouterr().out
    for heading in ("sequential", "random access", "one frame per request", "stepping forward", "first chunk",
                    "fresh process", "2nd from_video", "AsyncVideo() blocks", "opening a video", "training clips", "client memory",
                    "workers"):
        assert heading in text
    report = json.loads(out.read_text())
    figures = report["videos"]["h264_gops.mp4"]
    assert figures["random.exact"] is True and report["clips"]["exact"] is True
    for name in ("sequential.pyav_best_fps", "sequential.asyncframes_fps", "sequential.asyncframes_one_pixel_fps",
                 "sequential.second_from_video_fps", "random.asyncframes_fps", "scrub.asyncframes_repeat_ms",
                 "step.asyncframes_ms", "first_chunk.fresh_ms", "first_chunk.running_ms", "first_chunk.cold_process_ms",
                 "first_chunk.cold_user_ms", "first_chunk.cold_pyav_ms", "client.constructor_ms", "client.close_ms",
                 "open.asyncframes_ms", "open.pyav_ms"):
        assert figures[name]["median"] > 0
    assert report["clips"]["asyncframes"]["median"] > 0
    assert text.count("failed: RuntimeError: Requested next frame") == 3  # sequential, random, clips
    assert figures["random.other.other_failed"].startswith("RuntimeError") and "failed_other" in report["clips"]
    assert report["memory"]["frames"] == 300
    scaling = report["workers"]["h264_gops.mp4"]
    rows = {"threads 1", "threads 2", "processes 2"}
    if len(os.sched_getaffinity(0)) == 2:  # the counts asked for include every CPU: one decoder on them all too
        rows.add("one thread on 2")
    assert set(scaling["in_order"]) == set(scaling["shuffled"]) == rows
    assert all(v["median"] > 0 for name in ("in_order", "shuffled") for v in scaling[name].values())
    assert set(scaling["in_order_cpu_ms"]) == set(scaling["in_order"])


def test_a_gui_that_jumps_elsewhere_mid_chunk_gets_the_frame_it_jumped_to(centered_pair):
    """A long chunk is cancelled by a new request; the new frame comes, exact. (That the
    cancel is seen between frames of the chunk is ServerState.cancel_queued's rule, tested
    purely in test_server_state.py.)"""
    with AsyncVideo() as av:
        av.info(centered_pair)
        av.load_by_chunk(centered_pair, None, frames_per_chunk=1024)  # one long chunk, half a second of decoding here
        av.load_by_chunk(centered_pair, [5], 1)
        (idxs, frames), = av.chunks
        assert_frames_exact(centered_pair, idxs, frames)


@needs_shm
def test_the_probe_proves_reach_and_refuses_anything_else(tmp_path):
    probe = shm.Probe()
    try:
        me = os.getpid()
        assert shm.can_reach(me, probe.buffer.fd, probe.token)
        assert not shm.can_reach(me, probe.buffer.fd, bytes(16)), "wrong token"
        with open(tmp_path / "not-shared", "wb") as f:
            f.write(probe.token)
            f.flush()
            assert not shm.can_reach(me, f.fileno(), probe.token), "a plain file is never opened as a slot"
        assert not shm.can_reach(2**22 + 7, 3, probe.token), "no such process"
    finally:
        probe.close()


def test_stepping_back_and_forth_from_a_frame_is_exact(make_clip):
    """A GUI steps around the frame it showed: the frames (read around it while the server
    idles, or decoded on demand) are exact. When and what is read around is
    ServerState.read_around's rule, tested purely in test_server_state.py."""
    clip = make_clip("h264_gops.mp4")
    with AsyncVideo() as av:
        for i in (60, 59, 61, 49, 71, 60):
            av.load_by_chunk(clip, [i], 1)
            (idxs, frames), = av.chunks
            assert_frames_exact(clip, idxs, frames)


def test_a_person_stepping_forward_gets_the_frames_read_ahead_exact_to_the_end(make_clip):
    """Each step forward continues one request: the next frame was read ahead while the last
    was shown. A step back, a jump or the end of the video asks again; a step past the last
    frame is refused. Every frame exact. (The rules are ClientState.continues and the server's
    Request.ahead handling, tested purely in test_read_ahead.py.)"""
    clip = make_clip("h264_gops.mp4")
    n = len(reference_frames(clip))
    with AsyncVideo() as av:
        ids = []
        for i in [10, 11, 12, 13, 12, 40, 41, n - 3, n - 2, n - 1]:
            av.load_by_chunk(clip, [i], 1)
            (idxs, frames), = av.chunks
            assert idxs == [i]
            assert_frames_exact(clip, idxs, frames)
            ids.append(av._state.last.request_id)
        assert [ids.index(r) for r in ids] == [0, 0, 0, 0, 4, 5, 5, 7, 7, 7]
        av.load_by_chunk(clip, [n], 1)
        with pytest.raises(FrameIndexError):
            next(iter(av.chunks))
        av.read_ahead = False
        for i in (20, 21):
            av.load_by_chunk(clip, [i], 1)
            assert_frames_exact(clip, *next(iter(av.chunks)))
        assert av._state.last.request_id > ids[-1] + 2


def test_stepping_through_frames_read_ahead_several_a_chunk_is_exact_and_keeps_every_frame_handed_out(make_clip):
    """Once the client knows a video's frame size (from info() or an earlier chunk), frames
    read ahead come several a chunk, and most steps take their frame from the chunk in hand.
    Steps across chunk boundaries, back, a jump and to the last frame are exact, and every
    frame handed out stays what it was while the caller keeps it (its slot is not reused).
    (The rules are protocol.Chunking and ClientState.continues/next_ready, tested purely in
    test_read_ahead.py.)"""
    clip = make_clip("h264_gops.mp4")
    n = len(reference_frames(clip))
    with AsyncVideo() as av:
        info = av.info(clip)
        per_chunk = av._state.ahead_frames_per_chunk(av._spec(clip))
        assert per_chunk == min(32, (16 << 20) // (info.height * info.width * info.channels)) and per_chunk > 1
        steps = list(range(10, 10 + 3 * per_chunk + 2)) + [12, 13, 14] + list(range(n - per_chunk - 2, n))
        kept, received = [], av._state.links[0].chunks_received
        for i in steps:
            av.load_by_chunk(clip, [i], 1)
            (idxs, frames), = av.chunks
            assert idxs == [i] and frames.shape[0] == 1
            kept.append(frames)
        chunks = av._state.links[0].chunks_received - received
        assert chunks <= 14, f"{len(steps)} steps took {chunks} chunks: frames read ahead did not come several a chunk"
        assert_frames_exact(clip, steps, np.concatenate(kept))
        av.load_by_chunk(clip, [n], 1)
        with pytest.raises(FrameIndexError):
            next(iter(av.chunks))


@needs_shm
def test_a_server_keeps_to_its_shared_memory_budget(tmp_path, make_clip):
    """Beyond --max-shared-mb, chunks go inline: still exact, and no more slots are made."""
    clip = make_clip("h264_gops.mp4")
    shutil.copy(clip, tmp_path / "gops.mp4")
    server = subprocess.Popen(
        [sys.executable, "-m", "asyncframes", "serve", "--bind", "tcp://127.0.0.1:*", "--root", str(tmp_path),
         "--max-shared-mb", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        endpoint = server.stdout.readline().split()[-1]
        with AsyncVideo.from_video("gops.mp4", frames_per_chunk=8, endpoint=endpoint) as av:
            kept = list(av.chunks)  # 8 frames of 96x128 RGB fit one 1 MiB slot; the budget allows one
            assert len(shared_fds(server.pid)) == 1
        shared = [type(f.base).__name__ == "Lease" for _, f in kept]
        assert shared[0] and not any(shared[1:]), "the one slot stays lent to the chunk we keep; the rest came inline"
        assert_frames_exact(clip, [i for f, _ in kept for i in f], np.concatenate([f for _, f in kept]))
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def standalone_server(tmp_path, make_clip):
    """A server over ``tmp_path`` that never pings (nothing but a client's goodbye frees its slots)."""
    shutil.copy(make_clip("h264_gops.mp4"), tmp_path / "gops.mp4")
    server = subprocess.Popen(
        [sys.executable, "-m", "asyncframes", "serve", "--bind", "tcp://127.0.0.1:*", "--root", str(tmp_path),
         "--ping-interval", "3600"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        yield server, server.stdout.readline().split()[-1]
    finally:
        server.terminate()
        server.wait(10)


@needs_shm
def test_one_asyncvideo_per_video_reuses_the_shared_memory_of_the_last(standalone_server, make_clip):
    """SLEAP-style code opens an AsyncVideo per video: each one's released slots go to the next
    (writing fresh shared memory costs ~1 ms per MB), so the server holds one client's worth."""
    server, endpoint = standalone_server
    clip = make_clip("h264_gops.mp4")
    for k in range(8):
        idxs = shuffled_with_duplicates(150, 60, seed=k)
        with AsyncVideo.from_video("gops.mp4", idxs, frames_per_chunk=8, endpoint=endpoint, window=2) as av:
            for frame_idxs, frames in av.chunks:
                assert_frames_exact(clip, frame_idxs, frames)
            del frames  # nothing of this client's is held: all of its slots can go to the next
    assert len(shared_slots(server.pid)) <= 2 + 3, "one client's window, held chunk and releases in flight"


@needs_shm
def test_a_chunk_kept_past_close_is_never_handed_to_the_next_client(standalone_server, make_clip):
    server, endpoint = standalone_server
    clip = make_clip("h264_gops.mp4")
    with AsyncVideo.from_video("gops.mp4", range(150), frames_per_chunk=8, endpoint=endpoint, window=2) as av:
        for chunk in av.chunks:
            last = chunk  # the last chunk stays in our hands
    kept_idxs, kept = last
    assert type(kept.base).__name__ == "Lease"
    for k in range(3):  # later clients stream other frames through the spare slots
        with AsyncVideo.from_video("gops.mp4", shuffled_with_duplicates(150, 80, seed=k), 8, endpoint=endpoint) as av:
            for frame_idxs, frames in av.chunks:
                assert_frames_exact(clip, frame_idxs, frames)
    assert_frames_exact(clip, kept_idxs, kept)


@needs_shm
def test_a_gui_keeping_one_video_open_streams_a_second_in_the_first_ones_slots(standalone_server, make_clip):
    """A GUI keeps one video open while a second streams: the second borrows the first's
    released slots, and this process reuses its mapping of them (no new page faults). The
    first's loop held its last chunk until it ended, so that slot stayed lent after it; the
    second's request sends the first's release along, and borrows that one too: the server
    writes no new slot."""
    server, endpoint = standalone_server
    clip = make_clip("h264_gops.mp4")
    with AsyncVideo(endpoint, window=2) as first:
        first.load_by_chunk("gops.mp4", range(150), frames_per_chunk=8)
        for frame_idxs, frames in first.chunks:
            assert_frames_exact(clip, frame_idxs, frames)
        del frames  # let go after the loop: only a call can tell the server
        made = len(shared_slots(server.pid))
        with AsyncVideo.from_video("gops.mp4", range(150), 8, endpoint=endpoint, window=2) as second:
            for frame_idxs, frames in second.chunks:
                assert_frames_exact(clip, frame_idxs, frames)
            del frames
            assert len(shared_slots(server.pid)) == made, "the second stream ran in the first's slots"
            inodes = [line.split()[4] for line in shared_mappings()]
        assert inodes and len(inodes) == len(set(inodes)), "each slot mapped once in this process"
        first.load_by_chunk("gops.mp4", [5], frames_per_chunk=1)  # the first still works
        assert [idxs for idxs, _ in first.chunks] == [[5]]
