"""A standalone `asyncframes serve` shared by many clients: confinement, fairness, security, scale-out."""

from __future__ import annotations

import collections
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import zmq

from asyncframes import (
    AsyncVideo,
    AuthenticationError,
    ServerDiedError,
    ServerError,
    ServerShutdownError,
    VideoAccessError,
    VideoNotFoundError,
    VideoOpenError,
)
from asyncframes import (
    _protocol as protocol,
)
from asyncframes._process import READY_LINE
from asyncframes._protocol import PROTOCOL_VERSION
from asyncframes._video import Video

from .conftest import assert_frames_exact, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals and loopback tcp")


def free_tcp_endpoint() -> str:
    """A loopback endpoint on a port that is free now (for a server restarted on the same port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class Server:
    """`asyncframes serve` in a subprocess, with its log captured."""

    def __init__(self, tmp_path: Path, *args: str, bind: str = "tcp://127.0.0.1:*", start_within: float = 60.0) -> None:
        self.log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncframes", "serve", "--bind", bind, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        line = self._ready_line(start_within)
        assert line.startswith(READY_LINE), f"no readiness line: {line!r}\n{self.log}"
        self.endpoint = line.split()[-1]

    def _ready_line(self, within: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(within):
                self.stop()
                raise AssertionError(f"server not ready within {within} s:\n{self.log}")
        return self.proc.stdout.readline()

    @property
    def log(self) -> str:
        return self.log_path.read_text()  # the server writes it; our handle only passes it on

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"the server died (exit {self.proc.returncode}):\n{self.log[-4000:]}"

    def rss_bytes(self) -> int:
        """The server's resident memory, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def wait_for_log(self, text: str, within: float = 10) -> str:
        deadline = time.monotonic() + within
        while text not in self.log:
            assert time.monotonic() < deadline, f"{text!r} not in server log:\n{self.log}"
            time.sleep(0.05)
        return self.log

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL if it does not exit within 10 s; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def video_root(tmp_path, make_clip):
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    shutil.copy(make_clip("h264_gops.mp4"), root / "gops.mp4")
    shutil.copy(make_clip("gray.mp4"), root / "sub" / "gray.mp4")
    secret = tmp_path / "secret.mp4"
    shutil.copy(make_clip("gray.mp4"), secret)
    (root / "link-out.mp4").symlink_to(secret)
    return root


@pytest.fixture
def server(tmp_path, video_root):
    srv = Server(tmp_path, "--root", str(video_root))
    yield srv
    srv.stop()


def test_clients_connect_to_a_running_server(server, video_root):
    with AsyncVideo(server.endpoint) as av:
        assert av.server_pid is None  # nothing was spawned
        assert av.ping() < 1
        info = av.info("gops.mp4")
        assert (info.filename, info.frame_count) == ("gops.mp4", 150)
        av.load_by_chunk("sub/gray.mp4", [5, 0, 39], frames_per_chunk=2)
        got = list(av.chunks)
    assert [idxs for idxs, _ in got] == [[5, 0], [39]]
    for idxs, frames in got:
        assert_frames_exact(video_root / "sub" / "gray.mp4", idxs, frames)
    log = server.wait_for_log("video=sub/gray.mp4 frames=3/3 chunks=2")
    assert "done" in log


def test_sigusr1_logs_the_stacks_and_what_the_server_holds_and_it_goes_on_serving(server, video_root):
    with AsyncVideo(server.endpoint) as av:
        av.load_by_chunk("gops.mp4", range(40), frames_per_chunk=8)
        first = av.next_chunk()  # a request under way, its window sent
        server.proc.send_signal(signal.SIGUSR1)
        log = server.wait_for_log("state (kill -USR1)")
        assert "Current thread" in log or "Thread 0x" in log, "no stacks in the log"
        state = log[log.index("state (kill -USR1)") :]
        assert "requests in the round" in state and "gops.mp4: chunk" in state and "credit=" in state
        assert first is not None and first.frame_idxs == list(range(8))
        rest = [idxs for idxs, _ in av.chunks]
    assert rest == [list(range(k, k + 8)) for k in range(8, 40, 8)]
    assert server.proc.poll() is None


def test_ping_and_info_from_the_command_line(server):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "asyncframes", *a], capture_output=True, text=True, timeout=60)

    ping = run("ping", server.endpoint)
    assert ping.returncode == 0 and "pong from" in ping.stdout
    info = run("info", "--endpoint", server.endpoint, "gops.mp4")
    assert info.returncode == 0 and "frame_count  150" in info.stdout
    dead = run("ping", "tcp://127.0.0.1:1", "--timeout", "1")
    assert dead.returncode == 1 and "could not reach" in dead.stderr


@pytest.mark.parametrize("name", ["../secret.mp4", "sub/../../secret.mp4", "link-out.mp4", "/etc/passwd", "/etc/../etc/hostname"])
def test_paths_outside_the_root_are_refused(server, name):
    with AsyncVideo(server.endpoint) as av:
        with pytest.raises(VideoAccessError, match="outside this server's video folder"):
            av.info(name)
        av.load_by_chunk(name, [0])
        with pytest.raises(VideoAccessError):
            list(av.chunks)
        assert av.info("gops.mp4").frame_count == 150  # and the server keeps serving


def test_absolute_paths_inside_the_root_are_fine_and_missing_files_say_so(server, video_root):
    with AsyncVideo(server.endpoint) as av:
        assert av.info(str(video_root / "sub" / "gray.mp4")).frame_count == 40
        with pytest.raises(VideoNotFoundError):
            av.info("nope.mp4")


def test_playlists_cannot_reach_outside_the_root(server, video_root, tmp_path):
    (video_root / "list.ffconcat").write_text(f"ffconcat version 1.0\nfile {tmp_path / 'secret.mp4'}\n")
    (video_root / "list.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{tmp_path / 'secret.mp4'}\n#EXT-X-ENDLIST\n")
    with AsyncVideo(server.endpoint) as av:
        for name in ("list.ffconcat", "list.m3u8"):
            with pytest.raises(VideoOpenError):
                av.info(name)


def test_limits_are_enforced_with_clear_errors(tmp_path, video_root):
    srv = Server(
        tmp_path, "--root", str(video_root), "--max-frames-per-chunk", "16", "--max-request-frames", "100", "--max-chunk-mb", "0.5"
    )
    try:
        with AsyncVideo(srv.endpoint) as av:
            av.load_by_chunk("gops.mp4", range(10), frames_per_chunk=64)
            with pytest.raises(ServerError, match="frames_per_chunk 64 exceeds this server's limit of 16"):
                list(av.chunks)
            av.load_by_chunk("gops.mp4", None, frames_per_chunk=16)  # 150 frames
            with pytest.raises(ServerError, match="150 frames exceeds this server's limit of 100"):
                list(av.chunks)
            av.load_by_chunk("gops.mp4", range(32), frames_per_chunk=16)  # 16 x 36 KiB: too big for 0.5 MiB
            with pytest.raises(ServerError, match="0.562 MiB, over this server's limit of 0.5 MiB; ask for fewer frames per chunk"):
                list(av.chunks)
            av.load_by_chunk("gops.mp4", range(20), frames_per_chunk=10)
            assert len(list(av.chunks)) == 2
    finally:
        srv.stop()


def test_a_client_that_vanishes_mid_stream_is_forgotten(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    sock.send(protocol.encode(protocol.Hello(version=PROTOCOL_VERSION)))
    sock.send(protocol.encode(protocol.Request(1, Video("gops.mp4"), None, frames_per_chunk=2, window=2)))
    chunks = 0
    while chunks < 2:
        message, _ = protocol.parse(sock.recv_multipart())
        chunks += isinstance(message, protocol.Chunk)
    sock.close()  # gone without a word, with 73 chunks still to come
    server.wait_for_log("abandoned: client disconnected", within=10)
    with AsyncVideo(server.endpoint) as av:  # and the server is fine
        assert av.info("gops.mp4").frame_count == 150


@pytest.mark.parametrize("sig, reason", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_a_signal_ends_streams_with_a_clear_error(tmp_path, video_root, sig, reason):
    srv = Server(tmp_path, "--root", str(video_root))
    with AsyncVideo.from_video("gops.mp4", list(range(150)) * 10, frames_per_chunk=2, endpoint=srv.endpoint) as av:
        chunks = av.chunks
        next(chunks)
        srv.proc.send_signal(sig)
        start = time.monotonic()
        with pytest.raises(ServerShutdownError, match=f"shut down: {reason}"):
            for _ in chunks:
                pass
        assert time.monotonic() - start < 5
    assert srv.proc.wait(10) == 0  # it exits by itself, cleanly
    srv.stop()
    assert f"server stopped: {reason}" in srv.log


def test_a_stopped_server_whose_last_chunks_cannot_be_mapped_still_reports_its_shutdown(tmp_path, video_root):
    """The race behind a flaky signal test: chunks sent in shared memory just before a SIGTERM
    arrive after the server has closed that memory. The client must still say "shut down"."""
    srv = Server(tmp_path, "--root", str(video_root))
    try:
        with AsyncVideo(srv.endpoint, window=2) as av:
            av.load_by_chunk("gops.mp4", list(range(150)) * 10, frames_per_chunk=2)
            chunks = av.chunks
            next(chunks)  # the server now owes us more chunks; wait until one is here, unread
            (conn,) = av._conns
            wait_until(conn.socket.has_message, 10, "a chunk to arrive")
            if conn.shm_pid is None:
                pytest.skip("the server's shared memory is out of reach here: nothing to race")
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(10) == 0  # gone, and its shared memory with it
            with pytest.raises(ServerShutdownError, match="shut down: terminated"):
                collections.deque(chunks, maxlen=0)
    finally:
        srv.stop()


def test_a_killed_remote_server_is_reported_within_5s(tmp_path, video_root):
    srv = Server(tmp_path, "--root", str(video_root))
    try:
        with AsyncVideo(srv.endpoint) as av:
            av.load_by_chunk("gops.mp4", list(range(150)) * 10, frames_per_chunk=2)
            chunks = av.chunks
            next(chunks)
            srv.proc.kill()
            start = time.monotonic()
            with pytest.raises(ServerDiedError, match="lost the connection"):
                for _ in chunks:
                    pass
            assert time.monotonic() - start < 5
            assert av.done and av.next_chunk(timeout=0) is None  # the lost request is over, not pending
    finally:
        srv.stop()


def test_a_restarted_server_is_used_again_after_a_fresh_handshake(tmp_path, video_root):
    first = Server(tmp_path, "--root", str(video_root))
    endpoint = first.endpoint
    av = AsyncVideo(endpoint)
    try:
        assert av.info("gops.mp4").frame_count == 150
        first.stop()
        second = Server(tmp_path, "--root", str(video_root), bind=endpoint)
        try:
            # Nothing was outstanding, so nothing is lost: the next request re-handshakes and just works.
            av.load_by_chunk("gops.mp4", [1, 2])
            (idxs, frames), = list(av.chunks)
            assert idxs == [1, 2]
            assert_frames_exact(video_root / "gops.mp4", idxs, frames)
        finally:
            second.stop()
    finally:
        av.close()


def test_curve_lets_in_only_known_clients(tmp_path, video_root):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "asyncframes", *a], capture_output=True, text=True, timeout=60, check=True)

    run("keygen", str(tmp_path / "server"), "--name", "server")
    run("keygen", str(tmp_path / "clients"), "--name", "alice")
    run("keygen", str(tmp_path / "strangers"), "--name", "mallory")
    srv = Server(
        tmp_path,
        "--root", str(video_root),
        "--curve-secret", str(tmp_path / "server" / "server.key_secret"),
        "--allow-client-keys", str(tmp_path / "clients"),
    )
    server_key = tmp_path / "server" / "server.key"
    try:
        with AsyncVideo(srv.endpoint, curve_secret=tmp_path / "clients" / "alice.key_secret", curve_server_key=server_key) as av:
            av.load_by_chunk("sub/gray.mp4", [3])
            (idxs, frames), = list(av.chunks)
            assert_frames_exact(video_root / "sub" / "gray.mp4", idxs, frames)
        with pytest.raises(AuthenticationError, match="refused our CURVE credentials"):
            AsyncVideo(srv.endpoint, curve_secret=tmp_path / "strangers" / "mallory.key_secret", curve_server_key=server_key, start_timeout=5)
        with pytest.raises(AuthenticationError, match="security settings differ"):
            AsyncVideo(srv.endpoint, start_timeout=5)
        # A raw socket without CURVE gets nothing at all, not even an error message.
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(srv.endpoint)
        raw.send(protocol.encode(protocol.Hello(version=PROTOCOL_VERSION)))
        assert not raw.poll(1000)
        raw.close()
        assert srv.log.count("client=") == 1  # alice's request; strangers were never served
        health = subprocess.run(
            [sys.executable, "-m", "asyncframes", "ping", "--any-answer", srv.endpoint, "--timeout", "5"],
            capture_output=True, text=True, timeout=60,
        )
        assert health.returncode == 0 and "is up but will not talk to us" in health.stdout
    finally:
        srv.stop()


def test_several_servers_share_one_request(tmp_path, video_root):
    servers = [Server(tmp_path, "--root", str(video_root)) for _ in range(3)]
    try:
        with AsyncVideo([s.endpoint for s in servers]) as av:
            av.load_by_chunk("gops.mp4", frames_per_chunk=10)
            got = list(av.chunks)
            spread = av.chunks_by_endpoint
        assert [i for idxs, _ in got for i in idxs] == list(range(150))
        for idxs, frames in got:
            assert_frames_exact(video_root / "gops.mp4", idxs, frames)
        assert sorted(spread.values()) == [5, 5, 5], spread
        for s in servers:
            assert "frames=50/50 chunks=5" in s.wait_for_log("done")
    finally:
        for s in servers:
            s.stop()


def test_scale_out_with_errors_and_short_requests(tmp_path, video_root):
    servers = [Server(tmp_path, "--root", str(video_root)) for _ in range(2)]
    try:
        with AsyncVideo([s.endpoint for s in servers]) as av:
            av.load_by_chunk("gops.mp4", [7], frames_per_chunk=4)  # one chunk: one server
            assert [idxs for idxs, _ in av.chunks] == [[7]]
            av.load_by_chunk("gops.mp4", [])
            assert list(av.chunks) == []
            av.load_by_chunk("gops.mp4", list(range(8)) + [150], frames_per_chunk=4)
            with pytest.raises(Exception, match="150 is out of range"):
                list(av.chunks)
            av.load_by_chunk("sub/gray.mp4", list(range(39, -1, -1)), frames_per_chunk=3)
            got = [i for idxs, _ in av.chunks for i in idxs]
            assert got == list(range(39, -1, -1))
    finally:
        for s in servers:
            s.stop()
