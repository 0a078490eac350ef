"""Decoder worker processes (``serve --worker-processes N``): GOP shares decoded in other processes,
straight into the chunk's shared-memory slot.

:class:`ProcessWorkers` runs N :mod:`asyncframes._procworker` processes. For a chunk going
to a shared slot, :class:`asyncframes._pool.DecoderPool` groups the frames by GOP (GOP *g*
to process *g mod N*, as with threads) and hands each share here with the slot's
:class:`~asyncframes._shm.SharedBuffer`; each process decodes its frames into their places
in the slot. Chunks that go inline (no shared memory: TCP clients, shared memory off or
full) are decoded by the threads as before: their buffers are private to the server.

Exactness: a worker opens the path the server's opener resolved and opened (confined,
with its FFmpeg options), checks it is the same file (identity), and reads through the
same reader code with the same frame index (the on-disk store).

Failure: a worker that dies (or whose socket breaks) fails the chunk with a ServerError
naming the process and how it ended; the other shares of the chunk are cancelled and
waited for (nothing may still write into the slot), the dead process is reaped and a new
one starts for the next chunk. A worker that raises sends the error back, and the chunk
fails with it. Cancelling: the caller's ``interrupt`` is asked while the shares decode;
when it says so, each busy worker is told through its shared control word, which its
reader asks before each frame, and the read ends with ReadInterrupted.

Lifetime: workers are started by the server, one socket pair each; they exit when their
socket reaches end of file (:meth:`ProcessWorkers.close`, or the server's death) and the
kernel kills them if the server dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import subprocess
import sys
import time
import weakref
from typing import Any, Callable, Optional

import numpy as np

from . import _procwire as procwire
from . import _shm as shm
from ._procworker import MAX_MESSAGE
from ._reader import FrameCache, ReadInterrupted, VideoReader
from ._video import Video
from .errors import ServerError, process_ended

log = logging.getLogger(__name__)

#: Seconds a worker may take to exit after its socket closes before it is killed.
EXIT_GRACE_S = 2.0
#: Seconds between asking ``interrupt`` while shares decode.
WAIT_STEP_S = 0.005
#: Seconds a worker may take to stop after a cancel (or another share's failure) before it
#: is killed and replaced: a reader asks for a cancel before every frame, so only a worker
#: stuck inside one frame takes this long.
STOP_GRACE_S = 10.0


class _Process:
    """One worker process: its socket, control word and what it has mapped."""

    def __init__(self, index_cache: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
        self.ctl = shm.SharedBuffer(8, "asyncframes-worker-ctl")
        self.cancel = self.ctl.array.view(np.int64)
        self.cancel[0] = -1
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from asyncframes._procworker import main; main()",
                 str(theirs.fileno()), str(self.ctl.fd), str(os.getpid()), index_cache],
                pass_fds=(theirs.fileno(), self.ctl.fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            self.ctl.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.pid = self.proc.pid
        self.ready = False
        #: Serials of the shared buffers this worker has mapped.
        self.mapped: set[int] = set()
        #: Tokens of the request caches this worker keeps.
        self.caches: set[int] = set()

    def how_it_ended(self) -> str:
        """Reap the process (killing it if it lingers) and say how it ended."""
        return process_ended(self._reap())

    def close(self) -> None:
        """Close the socket (the worker exits after its job) and reap it."""
        try:
            self.sock.close()
        finally:
            self._reap()
            self.ctl.close()

    def let_go(self) -> None:
        """Close our end of its socket and its control word (the process has ended)."""
        try:
            self.sock.close()
            self.ctl.close()
        except OSError:
            pass

    def _reap(self) -> int:
        """Wait up to ``EXIT_GRACE_S`` for the process to end, then kill it; its exit code."""
        try:
            return self.proc.wait(EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class ProcessWorkers:
    """N decoder worker processes (started at once, replaced when one dies)."""

    def __init__(self, count: int, index_cache: Optional[str] = None) -> None:
        if count < 1:
            raise ValueError("worker processes must be at least 1")
        self.count = count
        self._index_cache = index_cache or ""
        self._procs: list[Optional[_Process]] = [None] * count
        self._jobs = 0
        #: Shared buffers workers may have mapped, by serial (dead or closed: unmapped at the next job).
        self._buffers: dict[int, "weakref.ref[shm.SharedBuffer]"] = {}
        #: Request caches by object, and the token workers keep theirs under.
        self._cache_tokens: "weakref.WeakKeyDictionary[FrameCache, int]" = weakref.WeakKeyDictionary()
        #: Tokens of request caches the server dropped (appended by garbage collection, any thread).
        self._dead_tokens: "collections.deque[int]" = collections.deque()
        self._forgotten_caches: set[int] = set()
        self._next_token = 0
        for k in range(count):
            self._procs[k] = _Process(self._index_cache)

    def pids(self) -> list[int]:
        """The worker processes now running (for tests and logs)."""
        return [p.pid for p in self._procs if p is not None]

    def read(
        self,
        main: VideoReader,
        video: Video,
        shares: dict[int, list[int]],
        idxs: list[int],
        grayscale: bool,
        out: np.ndarray,
        shared: shm.SharedBuffer,
        identity: Any,
        cache: Optional[FrameCache],
        interrupt: Optional[Callable[[], bool]],
    ) -> None:
        """Decode ``shares`` (worker -> positions in ``idxs``) into ``out``, a view of ``shared``.

        Raises:
            ReadInterrupted: ``interrupt`` said so (every share has stopped).
            ServerError: a worker died (it is replaced for the next chunk).
            VideoError: a worker could not open or decode the video.
        """
        self._buffers[shared.serial] = weakref.ref(shared)
        cache_spec = self._cache_spec(cache)
        busy: dict[int, _Process] = {}
        number = self._jobs = self._jobs + 1
        failure: Optional[BaseException] = None
        for worker, share in shares.items():
            proc = None
            try:
                proc = self._process(worker)
                self._send(proc, number, main, video, [idxs[p] for p in share], share, grayscale, out.shape, shared, identity, cache_spec)
            except Exception as exc:  # noqa: BLE001  (a worker that cannot take its share fails the chunk)
                if proc is not None and proc.proc.poll() is None and not isinstance(exc, ConnectionError):
                    failure = ServerError(f"could not hand frames to decoder worker process {proc.pid}: {exc}")
                else:
                    failure = self._failed(worker, exc, video)
                break
            busy[worker] = proc
        if failure is not None:
            for proc in busy.values():
                proc.cancel[0] = number
        interrupted = False
        stopping_since: Optional[float] = time.monotonic() if failure is not None else None
        killed: set[int] = set()
        with selectors.DefaultSelector() as sel:
            for worker, proc in busy.items():
                sel.register(proc.sock, selectors.EVENT_READ, worker)
            while busy:
                for key, _ in sel.select(WAIT_STEP_S):
                    worker = key.data
                    proc = busy[worker]
                    reply = self._receive(proc, number)
                    if reply is None:
                        continue  # the worker is still on this job
                    del busy[worker]
                    sel.unregister(proc.sock)
                    kind = reply[0]
                    if kind == "error":
                        failure = failure or reply[2]
                    elif kind == "dead":
                        error = self._failed(worker, reply[1], video, quiet=worker in killed)
                        if worker not in killed:
                            failure = failure or error
                    elif kind == "interrupted":
                        interrupted = True
                    if kind != "done" and stopping_since is None:
                        stopping_since = time.monotonic()
                        for other in busy.values():
                            other.cancel[0] = number
                if not busy:
                    break
                if stopping_since is None and interrupt is not None and interrupt():
                    interrupted = True
                    stopping_since = time.monotonic()
                    for proc in busy.values():
                        proc.cancel[0] = number
                if stopping_since is not None and time.monotonic() - stopping_since > STOP_GRACE_S:
                    for worker, proc in busy.items():  # stuck inside one frame: a new one takes its place
                        if worker not in killed:
                            log.error("decoder worker process %d did not stop within %g s; killing it", proc.pid, STOP_GRACE_S)
                            proc.proc.kill()
                            killed.add(worker)
        if failure is not None:
            raise failure
        if interrupted:
            raise ReadInterrupted()

    def tidy(self) -> None:
        """Have idle workers unmap the shared buffers the server closed and drop the request
        caches it forgot (a job does this too; call it when the server goes idle)."""
        self._note_dead_caches()
        for worker, proc in enumerate(self._procs):
            if proc is None:
                continue
            forget = [s for s in proc.mapped if _closed(self._buffers.get(s))]
            forget_caches = [t for t in self._forgotten_caches if t in proc.caches]
            if not forget and not forget_caches:
                continue
            number = self._jobs = self._jobs + 1
            try:
                proc.sock.settimeout(STOP_GRACE_S)  # an idle worker answers at once
                proc.sock.sendall(procwire.pack_job({"job": number, "forget_buffers": forget, "forget_caches": forget_caches}))
                while True:
                    reply = self._receive(proc, number)
                    if reply is not None:
                        break
            except OSError as exc:
                reply = ("dead", exc)
            finally:
                proc.sock.settimeout(None)
            if reply[0] == "dead":
                self._failed(worker, reply[1])
                continue
            proc.mapped.difference_update(forget)
            proc.caches.difference_update(forget_caches)
        self._prune()

    def close(self) -> None:
        """Stop every worker (each after its job) and reap it."""
        procs, self._procs = self._procs, [None] * self.count
        for proc in procs:
            if proc is not None:
                try:
                    proc.sock.close()
                except OSError:
                    pass
        for proc in procs:
            if proc is not None:
                proc.close()

    # -- inside --------------------------------------------------------------------------------

    def _process(self, worker: int) -> _Process:
        proc = self._procs[worker]
        if proc is not None and proc.proc.poll() is not None:  # died while idle: not a request's fault
            log.warning("decoder worker process %d %s while idle; it is replaced", proc.pid, proc.how_it_ended())
            proc.let_go()
            proc = self._procs[worker] = None
        if proc is None:
            proc = self._procs[worker] = _Process(self._index_cache)
            log.info("decoder worker process %d started (worker %d)", proc.pid, worker)
        return proc

    def _failed(self, worker: int, exc: Any, video: Optional[Video] = None, quiet: bool = False) -> BaseException:
        """Worker ``worker`` is gone: reap it, forget it (a new one starts for the next chunk)."""
        proc = self._procs[worker]
        self._procs[worker] = None
        how = proc.how_it_ended() if proc is not None else "not running"
        if proc is not None:
            proc.let_go()
        what = f" while decoding {video.filename}" if video is not None else ""
        pid = proc.pid if proc is not None else "?"
        (log.info if quiet else log.error)("decoder worker process %s %s%s (%s); it is replaced", pid, how, what, exc)
        return ServerError(f"a decoder worker process (pid {pid}) {how}{what}; the request failed, the server goes on with a new worker")

    def _send(
        self, proc: _Process, number: int, main: VideoReader, video: Video, idxs: list[int], positions: list[int],
        grayscale: bool, shape: tuple[int, ...], shared: shm.SharedBuffer, identity: Any, cache_spec: Optional[tuple],
    ) -> None:
        forget = [s for s in proc.mapped if s != shared.serial and _closed(self._buffers.get(s))]
        proc.mapped.difference_update(forget)
        self._note_dead_caches()
        forget_caches = [t for t in self._forgotten_caches if t in proc.caches]
        proc.caches.difference_update(forget_caches)
        if cache_spec is not None:
            proc.caches.add(cache_spec[0])
        job = {
            "job": number, "path": main.filename, "stream": main.stream_index, "options": main.container_options,
            "thread_type": main.thread_type, "identity": identity, "video": video, "grayscale": grayscale,
            "idxs": idxs, "positions": positions, "shape": shape, "serial": shared.serial, "cache": cache_spec,
            "forget_buffers": forget, "forget_caches": forget_caches,
        }
        data = procwire.pack_job(job)
        fds = [] if shared.serial in proc.mapped else [shared.fd]
        socket.send_fds(proc.sock, [data], fds)
        proc.mapped.add(shared.serial)
        self._prune()

    def _receive(self, proc: _Process, number: int) -> Optional[tuple]:
        """The worker's answer to job ``number`` (``("dead", why)`` when its socket broke), or
        None for a stale answer or the ready note."""
        try:
            data = proc.sock.recv(MAX_MESSAGE)
        except OSError as exc:
            return ("dead", exc)
        if not data:
            return ("dead", "its socket closed")
        reply = procwire.unpack_answer(data)
        if reply[0] == "ready":
            proc.ready = True
            return None
        if reply[1] != number:
            return None
        return reply

    def _cache_spec(self, cache: Optional[FrameCache]) -> Optional[tuple]:
        """What a worker needs to keep its own part of ``cache``: each keeps the frames of its
        GOPs (it alone decodes them), within an equal share of the budget."""
        if cache is None:
            return None
        token = self._cache_tokens.get(cache)
        if token is None:
            token = self._next_token = self._next_token + 1
            self._cache_tokens[cache] = token
            weakref.finalize(cache, self._dead_tokens.append, token)
        return (token, cache.max_bytes // self.count, cache.finish_gops, cache.later, list(cache.now))

    def _prune(self) -> None:
        """Forget buffers and caches no worker holds any more."""
        held = set().union(*(p.mapped for p in self._procs if p is not None)) if any(self._procs) else set()
        for serial in [s for s in self._buffers if s not in held]:
            del self._buffers[serial]
        cached = set().union(*(p.caches for p in self._procs if p is not None)) if any(self._procs) else set()
        self._note_dead_caches()
        self._forgotten_caches &= cached


    def _note_dead_caches(self) -> None:
        """Move the tokens of request caches garbage collection dropped to the forgotten ones."""
        while self._dead_tokens:
            self._forgotten_caches.add(self._dead_tokens.popleft())


def _closed(ref: "Optional[weakref.ref[shm.SharedBuffer]]") -> bool:
    buf = ref() if ref is not None else None
    return buf is None or buf.fd < 0
