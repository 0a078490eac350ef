"""What one client can hold of the server's memory: inline chunks queued in ZeroMQ, kept
buffers, and its share of the frame cache (issue 8, items 4 and 5)."""

from __future__ import annotations

import random
import sys
import threading
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from asyncframes import AsyncVideo
from asyncframes import _protocol as protocol
from asyncframes._protocol import PROTOCOL_VERSION
from asyncframes._reader import FrameCache, VideoReader
from asyncframes._sample import write_clip
from asyncframes._server import FrameServer, ServerConfig, _BufferPool
from asyncframes._server_state import cache_shares, inline_room
from asyncframes._video import Video

from .conftest import wait_until
from .test_standalone_server import Server

MiB = 1024 * 1024
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")


# -- the arithmetic -------------------------------------------------------------------------


@given(
    total=st.integers(0, 1 << 34),
    per_request=st.integers(0, 1 << 32),
    active=st.integers(0, 64),
    idle=st.integers(0, 64),
)
def test_cache_shares_never_exceed_the_total_and_active_requests_come_first(total, per_request, active, idle):
    active_share, idle_share = cache_shares(total, per_request, active, idle)
    assert 0 <= idle_share <= per_request and 0 <= active_share <= per_request
    assert active * active_share + idle * idle_share <= total
    if active:
        assert active_share == min(per_request, total // active)  # idle requests take nothing from active ones
        assert idle_share <= active_share


def test_cache_shares_shrink_as_requests_arrive_and_idle_ones_get_what_is_left():
    total, per = 1024 * MiB, 256 * MiB
    assert cache_shares(total, per, 1, 0) == (256 * MiB, 0)
    assert cache_shares(total, per, 8, 0) == (128 * MiB, 0)
    # Four paused clients and one reading: the reader gets a full share (it got none before).
    assert cache_shares(total, per, 1, 4) == (256 * MiB, 192 * MiB)
    assert cache_shares(total, per, 0, 4) == (0, 256 * MiB)


@given(
    queued=st.integers(0, 1 << 32),
    client_queued=st.integers(0, 1 << 32),
    chunk=st.integers(0, 1 << 31),
    total_cap=st.integers(0, 1 << 32),
    client_cap=st.integers(0, 1 << 32),
)
def test_inline_room_keeps_both_caps(queued, client_queued, chunk, total_cap, client_cap):
    fits = inline_room(queued, client_queued, chunk, total_cap, client_cap)
    assert fits == (queued + chunk <= total_cap and client_queued + chunk <= client_cap)


class _Tracker:
    def __init__(self) -> None:
        self.done = False


def test_the_buffer_pool_counts_bytes_queued_per_client_and_frees_them_once_sent():
    pool = _BufferPool(max_bytes=3 * MiB)
    sent = []
    for client in (b"a", b"a", b"b"):
        buf, tracker = pool.take((MiB,)), _Tracker()
        pool.lend(buf, tracker, client)
        sent.append(tracker)
    assert pool.queued_by_client() == {b"a": 2 * MiB, b"b": MiB}
    for tracker in sent[:2]:
        tracker.done = True
    assert pool.queued_by_client() == {b"b": MiB}
    assert pool.free_bytes == 2 * MiB  # kept for reuse ...
    assert pool.take((MiB,)) is not None and pool.free_bytes == MiB
    assert pool.trim() == MiB and pool.free_bytes == 0  # ... until the server is idle


def test_a_frame_cache_shrinks_to_a_new_budget_dropping_the_frames_needed_last():
    frame = np.zeros(1000, dtype=np.uint8)
    cache = FrameCache(10 * frame.nbytes)
    cache.want(later=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    for i in range(10):
        cache.offer(i, frame)
    assert len(cache) == 10
    cache.resize(4 * frame.nbytes)
    assert cache.nbytes == 4 * frame.nbytes and [cache.get(i) is not None for i in (9, 8, 7, 6)] == [True] * 4
    assert not cache.accepts(0, frame.nbytes)  # full at its new budget
    cache.resize(0)
    assert len(cache) == 0 and cache.nbytes == 0
    cache.resize(10 * frame.nbytes)  # grows again when there is room
    assert cache.accepts(0, frame.nbytes)


# -- item 5: paused clients do not take the cache from a reading one ------------------------------


@pytest.fixture
def in_process_server() -> Iterator[Callable[..., FrameServer]]:
    """Start a FrameServer in a thread of this process (so its decoding can be counted)."""
    started: list[tuple[FrameServer, threading.Thread]] = []

    def start(**config: Any) -> FrameServer:
        server = FrameServer(["tcp://127.0.0.1:*"], ServerConfig(**config))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.stop("test over")
        thread.join(10)


def _all_spent(server: FrameServer) -> bool:
    """Whether the server holds four requests, none with credit (read from another thread)."""
    try:
        credits = server.state.credits()
    except RuntimeError:  # the server thread changed them meanwhile
        return False
    return len(credits) == 4 and not any(credits.values())


def test_paused_clients_do_not_take_the_frame_cache_from_a_reading_one(in_process_server, make_clip, monkeypatch):
    """Four clients start shuffled requests and stop reading; a fifth client's shuffled request
    still decodes each frame about once (as alone), not once per chunk for want of a cache."""
    path = str(make_clip("h264_bframes_longgop.mp4"))  # one GOP: without a cache every chunk decodes from frame 0
    decoded = [0]
    original = VideoReader._next

    def counting_next(self: VideoReader) -> Any:
        decoded[0] += 1
        return original(self)

    monkeypatch.setattr(VideoReader, "_next", counting_next)
    server = in_process_server(request_cache_bytes=8 * MiB, total_cache_bytes=32 * MiB, shared_memory=False)
    endpoint = server.endpoints[0]

    def shuffled(seed: int) -> list[int]:
        idxs = list(range(150))
        random.Random(seed).shuffle(idxs)
        return idxs

    def decodes_of_a_shuffled_request() -> int:
        with AsyncVideo(endpoint, shared_memory=False, timeout=60) as av:
            before = decoded[0]
            av.load_by_chunk(path, shuffled(99), frames_per_chunk=10)
            assert sum(len(idxs) for idxs, _frames in av.chunks) == 150
            return decoded[0] - before

    alone = decodes_of_a_shuffled_request()
    paused = [AsyncVideo(endpoint, shared_memory=False, timeout=60) for _ in range(4)]
    try:
        for seed, av in enumerate(paused):
            av.load_by_chunk(path, shuffled(seed), frames_per_chunk=10)
            assert av.next_chunk() is not None
        # They stop reading: once their credit is spent, nothing of theirs is decoded any more.
        wait_until(lambda: _all_spent(server), 30, "the paused requests to spend their credit")
        with_paused = decodes_of_a_shuffled_request()
    finally:
        for av in paused:
            av.close()
    assert alone <= 200  # each frame about once
    assert with_paused <= alone + 50, f"{with_paused} frames decoded with four paused clients, {alone} alone"


# -- item 4: a client that stops reading ---------------------------------------------------------


@pytest.mark.slow
@linux_only
def test_a_client_that_stops_reading_pins_at_most_its_share_which_is_freed_when_it_leaves(tmp_path):
    """Two requests with ~120 MiB inline chunks and a window of 8, not read: the old server
    queued all their credit (~1.7 GB) and kept ~1.5 GB after the client left."""
    root = tmp_path / "videos"
    root.mkdir()
    write_clip(root / "hd.avi", frames=10, size=(1080, 1920), codec="mjpeg", bframes=0)
    chunk_mib = 20 * 1080 * 1920 * 3 / MiB  # 20 frames per chunk: ~119 MiB
    share_mib = ServerConfig().client_inline_bytes / MiB
    srv = Server(tmp_path, "--root", str(root), "--no-shared-memory")
    good = None
    bad = zmq.Context.instance().socket(zmq.DEALER)
    try:
        good = AsyncVideo(srv.endpoint, shared_memory=False, timeout=60)
        good.ping()
        baseline = srv.rss_bytes() / MiB
        bad.setsockopt(zmq.LINGER, 0)
        bad.setsockopt(zmq.RCVHWM, 1)  # ZeroMQ stops taking messages in: they wait in the server's queue
        bad.connect(srv.endpoint)
        bad.send(protocol.encode(protocol.Hello(version=PROTOCOL_VERSION)))
        for rid in (1, 2):
            frames = list(range(10)) * 20
            bad.send(protocol.encode(protocol.Request(rid, Video("hd.avi"), frames, frames_per_chunk=20, window=8)))
        started = set()
        while len(started) < 2:  # it takes the first chunk of each request, then reads no more
            assert bad.poll(60_000), "the server sent nothing"
            message, _payload = protocol.parse(bad.recv_multipart())
            if isinstance(message, protocol.Chunk):
                started.add(message.request_id)
        # Another client is served meanwhile. Round-robin gives the two requests that read nothing
        # a turn between any two of its chunks: after 20, the old server had sent them all their credit.
        good.load_by_chunk("hd.avi", list(range(10)) * 2, frames_per_chunk=1)
        assert [int(idxs[0]) for idxs, _frames in good.chunks] == list(range(10)) * 2
        pinned = srv.rss_bytes() / MiB - baseline
        # Its share queued, plus the two chunks it took (kept for reuse) and one being decoded.
        assert pinned <= share_mib + 3 * chunk_mib, f"a client that reads nothing pins {pinned:.0f} MiB"
        bad.close()
        srv.wait_for_log("abandoned: client", within=30)
        wait_until(lambda: srv.rss_bytes() / MiB - baseline <= 150, 30, "the server to give back the memory of the client that left")
    finally:
        bad.close(linger=0)
        if good is not None:
            good.close()
        srv.stop()
