"""Client faults as a user meets them: mismatched security, servers that stop, restart or lie, fork, bad arguments.

User stories run real processes and real ZeroMQ; a *fake server* (a real ROUTER
socket in a thread of this process, speaking :mod:`asyncframes._protocol`) plays a
server that sends what a real one never would. Pure checks need no I/O.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, TypeVar

import numpy as np
import pytest
import zmq

from asyncframes import (
    AsyncFramesError,
    AsyncVideo,
    AuthenticationError,
    ProtocolError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerDiedError,
    ServerError,
    ServerShutdownError,
    ServerStartError,
    Video,
)
from asyncframes import (
    _protocol as protocol,
)
from asyncframes import (
    _shm as shm,
)
from asyncframes import (
    _transport as transport,
)
from asyncframes._client import normalize_frame_idxs

from .conftest import assert_frames_exact
from .test_standalone_server import Server

T = TypeVar("T")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, loopback tcp, /proc")


@pytest.fixture
def video_root(tmp_path, make_clip):
    root = tmp_path / "videos"
    root.mkdir()
    shutil.copy(make_clip("h264_gops.mp4"), root / "gops.mp4")
    return root


def bound_again(endpoint: str, make: Callable[[], "T"], within: float = 15.0) -> "T":
    """``make()`` a server on ``endpoint`` once the port is free again (a dying server, or a client's
    reconnect attempt that the kernel turned into a self-connection, may hold it for a moment)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return make()
        except (zmq.ZMQError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def keys(tmp_path):
    def run(*a):
        subprocess.run([sys.executable, "-m", "asyncframes", *a], capture_output=True, text=True, timeout=60, check=True)

    run("keygen", str(tmp_path / "server"), "--name", "server")
    run("keygen", str(tmp_path / "clients"), "--name", "alice")
    return tmp_path


# -- item 7: a security mismatch never hangs a client --------------------------------------------------------


def _run_bounded(fn: Callable[[], None], within: float) -> BaseException:
    """Run ``fn`` in a daemon thread; the exception it raised, failing the test if it has not returned in time."""
    out: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: B036 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"the client hung for more than {within} s"
    assert out, "the client connected although the security settings differ"
    return out[0]


@linux_only
@pytest.mark.parametrize("server_curve", [True, False], ids=["plain-client-to-curve-server", "curve-client-to-plain-server"])
def test_a_security_mismatch_found_before_the_first_hello_is_an_error_not_a_hang(keys, video_root, monkeypatch, server_curve):
    """The race behind 3 hangs in 150 pings: the handshake fails before Hello is sent, and ZeroMQ drops the pipe.

    The client socket is held back until the failure is known (its monitor has the
    event), so the first send always meets a socket with nowhere to queue it.
    """
    args = ["--curve-secret", str(keys / "server" / "server.key_secret"), "--allow-client-keys", str(keys / "clients")]
    srv = Server(keys, "--root", str(video_root), *(args if server_curve else []))
    original = transport.ClientSocket.__init__

    def connect_then_wait_for_the_verdict(self, endpoint, curve=None):
        original(self, endpoint, curve)
        assert self.monitor.poll(10_000), "no handshake verdict"  # peeks: the event stays for the client

    monkeypatch.setattr(transport.ClientSocket, "__init__", connect_then_wait_for_the_verdict)
    client_keys = {} if server_curve else dict(curve_secret=keys / "clients" / "alice.key_secret", curve_server_key=keys / "server" / "server.key")
    try:
        start = time.monotonic()
        error = _run_bounded(lambda: AsyncVideo(srv.endpoint, start_timeout=20, timeout=20, **client_keys).ping(), within=20)
        assert isinstance(error, AuthenticationError), repr(error)
        assert "security settings differ" in str(error)
        assert time.monotonic() - start < 5, "a handshake failure is reported promptly, not at the timeout"
    finally:
        srv.stop()


def test_a_send_that_cannot_be_queued_gives_up_at_its_deadline():
    """Nothing listens and the queue is full: the send returns False at its deadline, checking in between."""
    sock = transport.ClientSocket("tcp://127.0.0.1:1")
    try:
        queued = 0
        while sock.send(protocol.Ping(request_id=1), time.monotonic(), lambda: None):
            queued += 1
            assert queued <= 100_000, "the send queue never filled"
        start = time.monotonic()
        checks = []
        assert not sock.send(protocol.Ping(request_id=1), time.monotonic() + 0.3, lambda: checks.append(1))
        assert 0.25 < time.monotonic() - start < 2
        assert len(checks) >= 3, "the connection is checked between short waits"
    finally:
        sock.close()


# -- item 8: a client recovers when its server comes back -------------------------------------------------------


@linux_only
def test_a_client_recovers_after_a_standalone_server_restarts_on_the_same_port(tmp_path, video_root):
    first = Server(tmp_path, "--root", str(video_root))
    endpoint = first.endpoint
    second: Optional[Server] = None
    try:
        with AsyncVideo(endpoint, timeout=10) as av:
            av.load_by_chunk("gops.mp4", list(range(150)) * 4, frames_per_chunk=2)
            chunks = av.chunks
            next(chunks)
            first.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ServerDiedError):  # a ServerShutdownError, or the lost connection
                for _ in chunks:
                    pass
            first.stop()
            second = bound_again(endpoint, lambda: Server(tmp_path, "--root", str(video_root), bind=endpoint))
            for _attempt in range(3):  # the same object, used on: every request is served exactly
                av.load_by_chunk("gops.mp4", [7, 3, 149], frames_per_chunk=2)
                got = list(av.chunks)
                assert [idxs for idxs, _ in got] == [[7, 3], [149]]
                for idxs, frames in got:
                    assert_frames_exact(video_root / "gops.mp4", idxs, frames)
                assert av.info("gops.mp4").frame_count == 150
    finally:
        first.stop()
        if second is not None:
            second.stop()


@linux_only
def test_a_client_recovers_after_its_server_was_stopped_and_continued(tmp_path, video_root):
    srv = Server(tmp_path, "--root", str(video_root))
    try:
        with AsyncVideo(srv.endpoint, timeout=10) as av:
            av.load_by_chunk("gops.mp4", list(range(150)) * 4, frames_per_chunk=2)
            chunks = av.chunks
            next(chunks)
            srv.proc.send_signal(signal.SIGSTOP)
            start = time.monotonic()
            with pytest.raises((ServerDiedError, RequestTimeoutError)):
                for _ in chunks:
                    pass
            assert time.monotonic() - start < 10
            srv.proc.send_signal(signal.SIGCONT)
            for _ in range(3):
                av.load_by_chunk("gops.mp4", [5, 0, 42], frames_per_chunk=2)
                got = list(av.chunks)
                assert [idxs for idxs, _ in got] == [[5, 0], [42]]
                for idxs, frames in got:
                    assert_frames_exact(video_root / "gops.mp4", idxs, frames)
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        srv.stop()


@linux_only
def test_every_wait_honours_the_call_timeout_even_a_rehandshake(tmp_path, video_root):
    srv = Server(tmp_path, "--root", str(video_root))
    try:
        av = AsyncVideo(srv.endpoint, timeout=30, start_timeout=30)
        assert av.info("gops.mp4").frame_count == 150
    finally:
        srv.proc.kill()
        srv.stop()
    try:
        start = time.monotonic()
        with pytest.raises((ServerStartError, RequestTimeoutError, ServerDiedError)):
            av.info("gops.mp4", timeout=2)
        assert time.monotonic() - start < 4, "info(timeout=2) waited for start_timeout instead"
    finally:
        av.close()


# -- item 11: chunks never end silently ---------------------------------------------------------------------------


def test_iterating_chunks_never_ends_silently(make_clip):
    """The story end to end; each rule (replaced, empty, lost, failed requests) is a pure test in test_client_state."""
    clip = make_clip("gray.mp4")
    with AsyncVideo(timeout=30) as av:
        with pytest.raises(AsyncFramesError, match="no request"):
            list(av.chunks)

        av.load_by_chunk(clip, [1, 2, 3], frames_per_chunk=2)
        assert [idxs for idxs, _ in av.chunks] == [[1, 2], [3]]
        with pytest.raises(AsyncFramesError, match=r"request \d+ was fully consumed: all 2 of its chunks were delivered"):
            list(av.chunks)

        av.load_by_chunk(clip, [1, 2, 3], frames_per_chunk=1)
        next(av.chunks)
        av.cancel()
        with pytest.raises(RequestCancelledError, match=r"cancelled by cancel\(\) after 1 of its chunks"):
            list(av.chunks)

        av.load_by_chunk(clip, [1, 2], frames_per_chunk=1)
        pending = av.chunks
    with pytest.raises(AsyncFramesError, match="closed"):
        list(pending)
    with pytest.raises(AsyncFramesError, match="closed"):
        list(av.chunks)


# -- item 13 and 10: a fake server that lies ----------------------------------------------------------------------

ChunkMaker = Callable[[protocol.Request], list[tuple[protocol.Message, Optional[np.ndarray]]]]


class FakeServer:
    """A ROUTER in a thread: greets like a server, then answers each request with ``reply(request)``."""

    def __init__(self, reply: ChunkMaker, offer_shm: bool = False, bind: str = "tcp://127.0.0.1:*") -> None:
        self.reply = reply
        self.heard: list[protocol.Message] = []  # every message received, in order
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.probe = shm.Probe() if offer_shm else None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            if not self.socket.poll(20):
                continue
            client, *frames = self.socket.recv_multipart()
            message, _ = protocol.parse(frames)
            self.heard.append(message)
            if isinstance(message, protocol.Hello):
                offer = None
                if self.probe is not None:
                    offer = protocol.ShmProbe(pid=os.getpid(), fd=self.probe.buffer.fd, token=self.probe.token)
                self._send(client, protocol.Welcome(version=protocol.PROTOCOL_VERSION, server="fake", shm=offer))
            elif isinstance(message, protocol.Request):
                for reply, payload in self.reply(message):
                    self._send(client, reply, payload)

    def _send(self, client: bytes, message: protocol.Message, payload: Optional[np.ndarray] = None) -> None:
        self.socket.send_multipart([client, protocol.encode(message), *([] if payload is None else [payload.tobytes()])])

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.socket.close(linger=0)
        if self.probe is not None:
            self.probe.close()


def chunk(request: protocol.Request, k: int, idxs: list[int], frames: np.ndarray, last: bool):
    return protocol.chunk_header(request.request_id, k, last, idxs, frames.shape, frames.dtype), frames


def frames(n: int, h: int = 4, w: int = 6, c: int = 3, dtype=np.uint8) -> np.ndarray:
    return np.zeros((n, h, w, c), dtype=dtype)


def test_a_server_that_sends_other_frames_than_asked_is_a_protocol_error():
    """Every check of a chunk is a pure test (tests/test_client_state.py); this is the story end to end."""
    server = FakeServer(lambda r: [chunk(r, 0, [1, 2], frames(2), False), chunk(r, 1, [3], frames(1, h=8), True)])
    try:
        with AsyncVideo(server.endpoint, timeout=10, shared_memory=False) as av:
            av.load_by_chunk("x.mp4", [1, 2, 3], frames_per_chunk=2)
            with pytest.raises(ProtocolError, match=r"sent frames of shape \[8, 6, 3\], earlier chunks had \[4, 6, 3\]"):
                list(av.chunks)
            assert av.done  # the request is over
            with pytest.raises(RequestCancelledError, match="failed \\(ProtocolError"):
                list(av.chunks)
    finally:
        server.close()


def test_a_server_that_only_chatters_cannot_hold_a_wait_past_its_timeout():
    """Messages that keep coming (pings here, as fast as the server can send them) do not stretch
    a wait: the chunk that never comes is a RequestTimeoutError about the timeout after the
    request, not once the chatter stops. A chunk already here is still handed over (the waits
    look for it between messages), which the other fake-server stories check."""
    stop = threading.Event()

    def chatter(_request: protocol.Request):
        while not stop.is_set():  # the fake server's thread, until the test ends
            yield protocol.Ping(request_id=0), None

    server = FakeServer(chatter)
    quiet_after = threading.Timer(10, stop.set)  # so that a wait without the bound ends (and fails below)
    quiet_after.start()
    try:
        with AsyncVideo(server.endpoint, timeout=0.5, shared_memory=False) as av:
            av.load_by_chunk("x.mp4", [1], frames_per_chunk=1)
            start = time.monotonic()
            with pytest.raises(RequestTimeoutError, match="no chunk arrived within 0.5 s"):
                list(av.chunks)
            took = time.monotonic() - start
            assert not stop.is_set()  # the pings never stopped
        # Without the bound, the wait lasted until the chatter stopped (10 s). 1,000 late messages take ~0.1 s.
        assert took < 5, f"the wait took {took:.1f} s for a 0.5 s timeout"
    finally:
        quiet_after.cancel()
        stop.set()
        server.close()


@pytest.mark.skipif(not shm.AVAILABLE, reason="shared memory needs Linux memfd")
def test_a_slot_lost_to_a_shutdown_is_reported_as_the_shutdown():
    """A SIGTERM'd server closes its slots as it says goodbye: the caller hears 'shut down', not '/proc/.../fd'."""

    def reply(r: protocol.Request):
        gone = protocol.ShmSlot(slot=1, fd=shm_gone_fd(), size=1 << 20)
        header = protocol.Chunk(r.request_id, 0, False, [1, 2], "|u1", [2, 4, 6, 3], shm=gone)
        return [(header, None), (protocol.Shutdown(reason="terminated"), None)]

    server = FakeServer(reply, offer_shm=True)
    try:
        with AsyncVideo(server.endpoint, timeout=10) as av:
            av.load_by_chunk("x.mp4", [1, 2, 3], frames_per_chunk=2)
            with pytest.raises(ServerShutdownError, match="shut down: terminated"):
                list(av.chunks)
    finally:
        server.close()


def shm_gone_fd() -> int:
    """A descriptor number that is not open in this process (a slot the server has closed)."""
    buf = shm.SharedBuffer(16, "asyncframes-slot-gone")
    fd = buf.fd
    buf.close()
    return fd


# -- item 10: fork ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_an_asyncvideo_in_a_forked_child_says_so_and_leaves_the_parent_alone(make_clip):
    clip = make_clip("gray.mp4")
    with AsyncVideo(timeout=10) as av:
        assert av.info(clip).frame_count == 40
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: a DataLoader worker, say
            code = 1
            try:
                os.close(read)
                try:
                    av.info(clip)
                    said = "no error"
                except AsyncFramesError as exc:
                    said = str(exc)
                av.close()
                del av
                gc.collect()
                os.write(write, said.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        said = b""
        while chunk_ := os.read(read, 4096):
            said += chunk_
        os.close(read)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "cannot be used across fork" in said.decode() and "create an AsyncVideo in the child" in said.decode()
        # The parent's server and sockets were not disturbed by the child's close().
        assert av.info(clip).frame_count == 40
        av.load_by_chunk(clip, [3, 1])
        (idxs, got), = list(av.chunks)
        assert_frames_exact(clip, idxs, got)


# -- item 9/10: arguments get clear errors, checked before anything starts ------------------------------------------


@pytest.mark.parametrize("endpoint", ["localhost:9010", "tcp://localhost", "tcp://host:99999", "http://x:1", "", "ipc://"])
def test_a_malformed_endpoint_names_the_forms_accepted(endpoint):
    with pytest.raises(ServerStartError, match=r"tcp://host:port .* or ipc://path") as info:
        AsyncVideo(endpoint)
    assert repr(endpoint) in str(info.value)


def test_a_bare_host_and_port_suggests_the_tcp_form():
    with pytest.raises(ServerError, match="did you mean 'tcp://localhost:9010'"):
        AsyncVideo("localhost:9010")


@pytest.mark.parametrize("workers", [-2, 0, 1.5, "2", True])
def test_workers_must_be_a_positive_count(workers):
    with pytest.raises(ValueError, match=f"workers must be a positive number.*got {workers!r}"):
        AsyncVideo(workers=workers)


@pytest.mark.parametrize("idxs", ["0123", b"\x00\x01"])
def test_frame_indices_as_a_string_are_refused_by_name(idxs):
    with pytest.raises(TypeError, match=f"frame_idxs must be frame numbers.*got {type(idxs).__name__}"):
        normalize_frame_idxs(idxs)


def test_video_options_accept_numpy_scalars_and_refuse_the_rest_clearly():
    video = Video("x.mp4", grayscale=np.bool_(True), stream=np.int64(1))
    assert (video.grayscale, video.stream) == (True, 1)
    assert type(video.grayscale) is bool and type(video.stream) is int  # plain types travel on the wire
    with pytest.raises(TypeError, match="grayscale must be None .*True or False, got str 'yes'"):
        Video("x.mp4", grayscale="yes")
    with pytest.raises(TypeError, match="stream must be a video stream number.*got float 1.0"):
        Video("x.mp4", stream=1.0)
    with pytest.raises(ValueError, match="stream must be >= 0"):
        Video("x.mp4", stream=-1)


@pytest.mark.parametrize("filename", [""])
def test_an_empty_filename_is_refused(filename):
    with pytest.raises(ValueError, match="filename is empty"):
        Video(filename)


@pytest.mark.parametrize("window", [0, -1, 1.5, "2", True])
def test_window_must_be_a_positive_count_of_chunks(window):
    with pytest.raises(ValueError, match=f"window must be a positive number of chunks.*got {window!r}"):
        AsyncVideo(window=window)
