"""What clients send cannot crash, bloat or stall a standalone server (issue 8, items 1-3 and 5)."""

from __future__ import annotations

import faulthandler
import io
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import msgpack
import numpy as np
import pytest
import zmq

from asyncframes import AsyncVideo, ServerError

from .test_standalone_server import Server, pytestmark, video_root  # noqa: F401  (fixtures and skip mark)

#: libzmq's heartbeat interval on the server is 1 s: the abort came about a second after the flood.
HEARTBEATS = 3.5


def flood_and_leave(endpoint: str, messages: int = 2000, slots: int = 50_000, heartbeat_ms: int = 0) -> None:
    """A raw DEALER that sends pings and huge releases without reading a reply, then closes."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.SNDHWM, 0)
    if heartbeat_ms:
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.connect(endpoint)
    sock.send(msgpack.packb({"kind": "hello", "version": 3, "client": "flood"}))
    release = msgpack.packb({"kind": "release", "slots": list(range(1, slots + 1))})
    ping = msgpack.packb({"kind": "ping", "request_id": 1})
    for k in range(messages):
        sock.send(ping if k % 2 else release)
    sock.close()
    ctx.term()  # waits until everything is sent


def threads_of(pid: int) -> str:
    """What each thread of process ``pid`` is doing, from /proc: name, state, CPU ticks used, the
    system call it waits in (number and arguments) and the kernel function it sleeps in."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda t: int(t.name)):
        try:
            stat = (task / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            syscall = (task / "syscall").read_text().strip() if os.access(task / "syscall", os.R_OK) else "?"
            wchan = (task / "wchan").read_text().strip()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        lines.append(f"  {task.name} {comm!r} state {fields[0]} cpu_ticks {ticks} wchan {wchan} syscall {syscall[:60]}")
    return "\n".join(lines)


def tcp_queues(port: int) -> str:
    """The loopback TCP connections to or from ``port``: state and bytes queued each way (/proc/net/tcp)."""
    lines = []
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        local, remote = (int(addr.split(":")[1], 16) for addr in fields[1:3])
        if port in (local, remote):
            tx, rx = (int(q, 16) for q in fields[4].split(":"))
            lines.append(f"  {local} -> {remote} state {fields[3]} tx_queue {tx} rx_queue {rx} inode {fields[9]}")
    return "\n".join(lines)


def memory_of(pid: int) -> str:
    """Process ``pid``'s resident and swapped memory, the machine's free memory and the kernel's
    TCP buffers: whether a flood made the machine short of memory."""
    status = {k: v.strip() for k, _, v in (ln.partition(":") for ln in Path(f"/proc/{pid}/status").read_text().splitlines())}
    meminfo = {k: v.strip() for k, _, v in (ln.partition(":") for ln in Path("/proc/meminfo").read_text().splitlines())}
    tcp = next(ln for ln in Path("/proc/net/sockstat").read_text().splitlines() if ln.startswith("TCP:"))
    return (
        f"  pid {pid}: VmRSS {status.get('VmRSS')} VmSwap {status.get('VmSwap')}; machine: MemAvailable "
        f"{meminfo.get('MemAvailable')} SwapFree {meminfo.get('SwapFree')}; {tcp} (pages)"
    )


@pytest.fixture
def server(tmp_path, video_root):  # noqa: F811
    srv = Server(tmp_path, "--root", str(video_root), "--max-request-frames", "2000000")
    yield srv
    srv.stop()


def serve_for(server: Server, av: AsyncVideo, seconds: float) -> None:
    """Keep a good client busy until ``seconds`` have passed; the server must stay up all along."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        av.load_by_chunk("gops.mp4", [3, 100], frames_per_chunk=1)
        assert [idxs for idxs, _ in av.chunks] == [[3], [100]]
        assert server.proc.poll() is None, f"server died:\n{server.log}"


@pytest.mark.parametrize(
    "attack",
    [
        dict(),  # the reported attack: 2,000 messages, releases of 50,000 slot ids
        dict(messages=20_000, slots=4000),  # more messages, each a legal size
        dict(messages=5000, slots=100, heartbeat_ms=10),  # the attacker's own ZMTP pings mixed in
    ],
    ids=["reported", "more", "with-pings"],
)
def test_a_client_that_floods_and_leaves_does_not_kill_the_server(server, attack):
    with AsyncVideo(server.endpoint) as av:
        serve_for(server, av, 0)
        attackers = [threading.Thread(target=flood_and_leave, args=(server.endpoint,), kwargs=attack) for _ in range(2)]
        for t in attackers:
            t.start()
        for t in attackers:
            t.join(60)
        serve_for(server, av, HEARTBEATS)  # the abort came a heartbeat after the attacker left
    assert server.proc.poll() is None
    assert "without waiting for answers" in server.wait_for_log("dropped")


def test_a_huge_index_request_is_refused_without_stalling_others(server):
    """Over the limit: refused before it is sent; at the limit: served, and others are served meanwhile."""
    with AsyncVideo(server.endpoint) as big, AsyncVideo(server.endpoint) as other:
        with pytest.raises(ServerError, match="request for 3000000 frames exceeds the limit of 2000000"):
            big.load_by_chunk("gops.mp4", np.zeros(3_000_000, np.int64))
        idxs = np.random.default_rng(0).integers(0, 150, 2_000_000)
        big.load_by_chunk("gops.mp4", idxs, frames_per_chunk=4)
        served = []
        other.load_by_chunk("gops.mp4", [1, 20, 40, 60, 80, 100, 120], frames_per_chunk=7)
        served += [i for chunk, _ in other.chunks for i in chunk]
        first, _ = big.next_chunk()
        assert served == [1, 20, 40, 60, 80, 100, 120]
        assert first == idxs[:4].tolist()


FLOODER = """
import sys, zmq, msgpack
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.connect(sys.argv[1])
s.send(msgpack.packb({"kind": "hello", "version": 3, "client": "flood"}))
ping = msgpack.packb({"kind": "ping", "request_id": 1})
info = msgpack.packb({"kind": "info", "request_id": 2, "video": {"filename": "gops.mp4", "grayscale": None, "stream": 0}})
k = 0
while True:  # as fast as it can, reading answers only to keep its connection
    for _ in range(100):
        try:
            s.send(info if k % 2 else ping, zmq.NOBLOCK)
        except zmq.Again:  # cut (reconnecting) or its queue full: wait for room, not spin
            s.poll(10, zmq.POLLIN | zmq.POLLOUT)
            break
        k += 1
        if k == 20000:
            print("flooding", flush=True)
    while s.poll(0):
        s.recv_multipart()
"""


def test_a_flooding_client_does_not_stall_another_clients_stream(server):
    import select
    import sys

    gaps: list[float] = []  # seconds between chunks of the last stream, said if it was slow

    def stream(av: AsyncVideo) -> float:
        start = last = time.monotonic()
        av.load_by_chunk("gops.mp4", None, frames_per_chunk=8)
        got, gaps[:] = [], []
        for idxs, _ in av.chunks:
            got += idxs
            now = time.monotonic()
            gaps.append(round(now - last, 3))
            last = now
        assert got == list(range(150))
        return last - start

    flooder = None
    try:
        with AsyncVideo(server.endpoint, timeout=20) as av:
            stream(av)
            quiet = min(stream(av) for _ in range(2))
            flooder = subprocess.Popen([sys.executable, "-c", FLOODER, server.endpoint], stdout=subprocess.PIPE, text=True)
            # The flood is on once 20,000 messages went out. Whether the server's queue outgrew
            # its bound (and it said so) depends on how the processes share the cores: the server
            # may keep up. That rule is ServerState's, tested purely in test_server_state.py.
            assert select.select([flooder.stdout], [], [], 30)[0] and flooder.stdout.readline() == "flooding\n"
            # A stream still going after 3 s has failed already: both sides then write their stacks,
            # and what each holds, so a failure says where each was (the server logs its own on SIGUSR1).
            def dump(out: "IO[str]") -> None:  # the client's stacks and what its core waits for; the server's own
                with tempfile.TemporaryFile("w+") as stacks:  # faulthandler writes to a descriptor
                    faulthandler.dump_traceback(stacks)
                    stacks.seek(0)
                    out.write(stacks.read())
                stream, link = av._state.stream, av._state.links[0]
                print(f"client stream: request {getattr(stream, 'request_id', None)} next_chunk "
                      f"{getattr(stream, 'next_chunk', None)} done {getattr(stream, 'done', None)}; link health "
                      f"{link.health} generation {link.generation} arrivals waiting {len(link.inbox)}", file=out, flush=True)
                # Where each process's threads are (libzmq's I/O threads among them), twice (CPU
                # used in between: 0.5 s, or until the stream ends), and what the kernel holds on
                # each connection.
                for again in (False, True):
                    if again:
                        streamed.wait(0.5)
                    for name, pid in (("server", server.proc.pid), ("client", os.getpid()), ("flooder", flooder.pid)):
                        print(f"{name} threads:\n{threads_of(pid)}", file=out, flush=True)
                    print(f"connections:\n{tcp_queues(int(server.endpoint.rsplit(':', 1)[1]))}", file=out, flush=True)
                    print(f"memory:\n{memory_of(server.proc.pid)}", file=out, flush=True)
                gdb = shutil.which("gdb")  # the native stacks too (libzmq's threads), where gdb is at hand
                if gdb:
                    for name, pid in (("server", server.proc.pid), ("client", os.getpid())):
                        run = subprocess.run(
                            [gdb, "-p", str(pid), "-batch", "-ex", "thread apply all bt 10"],
                            capture_output=True, text=True, timeout=60,
                        )
                        print(f"{name} native stacks (gdb):\n{run.stdout[-6000:]}", file=out, flush=True)
                os.kill(server.proc.pid, signal.SIGUSR1)

            # Again after the client's 20 s timeout: a stream that is still going then has
            # also failed to raise RequestTimeoutError (one did, in a full run: 270 s).
            out, streamed = io.StringIO(), threading.Event()
            watchdogs = [threading.Timer(delay, dump, args=(out,)) for delay in (3.0, 25.0)]
            for watchdog in watchdogs:
                watchdog.start()
            try:
                flooded = stream(av)
            finally:
                streamed.set()
                for watchdog in watchdogs:
                    watchdog.cancel()
                    if watchdog.is_alive():  # a dump under way is finished, so that the failure holds it
                        watchdog.join(180)
            assert flooder.poll() is None  # the flood lasted the whole stream
        # Relative and generous: the flooder shares the machine's cores, so some slowdown is fair;
        # before, the loop handled every waiting message before each chunk (~50x slower here).
        assert flooded < max(10 * quiet, 3.0), (
            f"stream took {flooded:.2f}s under a flood, {quiet:.2f}s without; between chunks: {gaps}\n"
            f"the client's stacks at 3 s and 25 s:\n{out.getvalue()}\nthe server's log (its stacks and state in it):\n{server.log[-12000:]}"
        )
    finally:
        if flooder is not None:
            flooder.kill()
            flooder.wait(10)


def test_a_client_queueing_more_bytes_than_two_of_the_largest_requests_is_dropped(tmp_path):
    """The per-client queue is bounded in bytes too: a few hundred big (legal) requests sent
    without waiting cannot make the server hold them all (each may be megabytes)."""
    from asyncframes import _protocol as protocol
    from asyncframes._server import FrameServer, ServerConfig
    from asyncframes._server_actions import Send
    from asyncframes._server_state import FLOODED_MESSAGE
    from asyncframes._video import Video

    server = FrameServer([f"ipc://{tmp_path}/s.sock"], ServerConfig(max_request_frames=1000, shared_memory=False))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.endpoints[0])
        big = protocol.encode(
            protocol.Request(1, Video("x" * 60_000 + ".mp4"), protocol.frame_selection(range(0, 2000, 2)), 8, 2)
        )
        limit = server.state.inbox_bytes_limit
        n = limit // len(big) + 2
        assert n < 100  # far below the message-count bound: only the byte bound can catch it
        for _ in range(n):
            sock.send(big)
        read, deadline = 0, time.monotonic() + 10
        while read < n and time.monotonic() < deadline:
            server.socket.poller()(0.1)
            read += server._receive(n)
        actions = server.state.handle_round(time.monotonic())  # dropped when its turn comes
        assert isinstance(actions[0], Send) and actions[0].message.message == FLOODED_MESSAGE
    finally:
        sock.close(linger=0)
        server._shutdown()


def test_a_client_flooding_on_after_it_was_dropped_has_its_connection_cut(server):
    """Throwing a silenced client's messages away cannot bound memory by itself: libzmq reads
    every connection into an unbounded queue, and a flooder with more CPU than the server
    outpaced the throwing away (30 MiB/s of server memory, without end). So the server cuts
    the connection: the flooder sees it disconnected, and the server's memory stays put.

    Whether a flood outpaces a server depends on how the two share the cores (a server that
    keeps up is right not to drop anyone, and a slow flooder in one full run never got
    dropped in 1.8 million messages). So the test makes the server fall behind for certain:
    it stops the server's process while a burst of several queues' worth goes out, then lets
    it go on while the flood goes on."""
    from zmq.utils.monitor import recv_monitor_message

    from asyncframes._server_state import CLIENT_QUEUE

    with AsyncVideo(server.endpoint) as av:
        serve_for(server, av, 0)  # warm: what serving costs is not counted as growth
        baseline = server.rss_bytes()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # the burst waits in full on this side while the server is stopped
        sock.setsockopt(zmq.RECONNECT_IVL, 60_000)  # one connection: a reconnect would start afresh
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(server.endpoint)
        try:
            sock.send(msgpack.packb({"kind": "hello", "version": 3, "client": "flood"}))
            ping = msgpack.packb({"kind": "ping", "request_id": 1})
            assert sock.poll(10_000), f"no welcome\n{server.log}"  # connected, and heard
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                for _ in range(4 * CLIENT_QUEUE):
                    sock.send(ping)
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 30
            sent = 4 * CLIENT_QUEUE
            while not monitor.poll(0):
                assert time.monotonic() < deadline, f"the connection was not cut after {sent} messages\n{server.log}"
                for _ in range(200):
                    try:
                        sock.send(ping, zmq.NOBLOCK)
                        sent += 1
                    except zmq.Again:
                        break
                while sock.poll(0):
                    sock.recv_multipart()
            assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            ctx.term()
        serve_for(server, av, 0)  # and everyone else is still served
        grown = server.rss_bytes() - baseline
    assert "its connection: cut descriptor" in server.log
    assert grown < 64 * 2**20, f"server memory grew by {grown / 2**20:.0f} MiB during the flood"
