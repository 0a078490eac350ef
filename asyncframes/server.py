"""The frame server: answers requests from many clients with chunks of decoded frames.

One thread, one ROUTER socket. The loop reads what is waiting (cheaply, without
decoding) into a bounded queue per client, handles a fair share of each client's
queue (a few small messages, or one request that opens a video), then decodes one
chunk for the next request (round-robin across requests, so a long request never
starves another) that still has credit from its client, and repeats. A client that
floods the server delays nobody else by more than its share of one round. Decoding happens only against credit, so a slow client never makes
the server buffer without bound. Any failure while serving a request becomes
an error message for that request; the server keeps serving.

Run privately by :class:`asyncframes.AsyncVideo` (``asyncframes serve --lifeline``:
it exits when its client process is gone), or standalone with ``asyncframes serve``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Optional, Sequence

import attrs
import numpy as np
import zmq

from . import __version__, files, protocol, shm
from ._opener import VideoOpener
from .config import ServerConfig
from .errors import AsyncFramesError, ProtocolError, ServerError
from .pool import DecoderPool, default_workers
from .protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Credit,
    Error,
    Hello,
    InfoReply,
    InfoRequest,
    Ping,
    Pong,
    Release,
    Request,
    ShmProbe,
    ShmSlot,
    Shutdown,
    Stop,
    Welcome,
)
from .reader import FrameCache, ReadInterrupted
from .transport import PeerBusy, PeerGone, ServerCurve, ServerSocket
from .video import Video

log = logging.getLogger(__name__)

#: How often a chunk being decoded looks for a cancel of its request, in seconds.
INTERRUPT_CHECK_S = 0.005
#: A request with no credit that has not been sent a chunk for this long counts as idle (its
#: client is paused, not just slow): its frame cache shrinks so that active requests get theirs.
CACHE_IDLE_S = 5.0
#: A server that has sent no chunk for this long frees the chunk buffers it keeps for reuse.
BUFFERS_IDLE_S = 2.0
#: How often a request waiting for room to send looks again, in seconds.
ROOM_RETRY_S = 0.01
#: Raw messages read off the socket per loop iteration at most (about a millisecond's work;
#: libzmq reads connections in turn, so a batch holds every client's messages) ...
READ_BATCH = 1024
#: ... and per check for a cancel while a chunk decodes (every INTERRUPT_CHECK_S).
INTERRUPT_READ_BATCH = 128
#: Messages of one client read but not yet handled; a client that has more waiting (it
#: sends without waiting for answers, far beyond any window) is dropped with an error.
CLIENT_QUEUE = 1024
#: ... and their bytes: room for this many of the largest request the server takes.
CLIENT_QUEUE_REQUESTS = 2
#: Seconds one read of the socket may spend throwing away what silenced (dropped for
#: flooding) connections send, in the loop and in a cancel check: reading keeps up with a
#: flood without letting it take the loop from the clients being served.
SILENCED_DRAIN_S = 0.02
INTERRUPT_SILENCED_DRAIN_S = 0.002
#: Silenced connections remembered (ZeroMQ gives a reconnecting peer a new identity).
MAX_SILENCED = 4096
#: Units of one client's messages handled per round: small ones count 1; one that opens
#: or indexes a video (hello, request, info) takes the whole share.
CLIENT_SHARE = 16
#: Quiet time after a small request before the server reads around it: a client that asks
#: again at once (the same frame, the next one) is answered before any of that starts.
READ_AROUND_DELAY_S = 0.02

#: Demuxers a confined server will open (kept here for old imports; see :mod:`asyncframes.files`).
VIDEO_DEMUXERS = files.VIDEO_DEMUXERS


@attrs.define
class _Job:
    """One request in flight."""

    client: bytes
    request: Request
    reader_key: tuple[str, int]
    grayscale: bool
    #: A range, or a read-only uint32 array over the request message (never a list of ints).
    frame_idxs: "range | np.ndarray"
    credit: int
    #: Bytes of one decoded frame.
    frame_bytes: int = 0
    #: ``(h, w, c)`` of one decoded frame.
    frame_shape: tuple[int, ...] = (0, 0, 0)
    cache: Optional[FrameCache] = None
    #: The file's identity when the request started: a change later fails the request.
    identity: files.SourceIdentity = ()
    next_chunk: int = 0
    started: float = attrs.field(factory=time.monotonic)
    #: When a chunk was last sent (or the request started).
    last_sent: float = attrs.field(factory=time.monotonic)
    #: No shared slot could be had: do not try again before this time.
    shm_retry_at: float = 0.0

    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(len(self.frame_idxs) / self.request.frames_per_chunk))

    def next_chunk_bytes(self) -> int:
        """Bytes of the chunk this request sends next."""
        start = self.next_chunk * self.request.frames_per_chunk
        return len(self.frame_idxs[start : start + self.request.frames_per_chunk]) * self.frame_bytes

    def idle(self, now: float) -> bool:
        """No credit and nothing sent for a while: its client is not taking chunks."""
        return self.credit <= 0 and now - self.last_sent >= CACHE_IDLE_S


def cache_shares(total: int, per_request: int, active: int, idle: int) -> tuple[int, int]:
    """Frame-cache bytes for each (active, idle) request.

    Active requests share ``total`` equally, each up to ``per_request``; idle requests
    (their clients are not taking chunks) share what is left the same way. So the sum
    never exceeds ``total``, a request's share shrinks as more arrive, and requests
    nobody is reading cannot keep the cache from those that are being read (nor get more).
    """
    active_share = min(per_request, total // active) if active > 0 else 0
    left = max(0, total - active * active_share)
    idle_share = min(active_share if active > 0 else per_request, left // idle) if idle > 0 else 0
    return active_share, idle_share


def inline_room(queued: int, client_queued: int, chunk: int, total_cap: int, client_cap: int) -> bool:
    """Whether a ``chunk`` of inline bytes may be queued now: it must fit the server-wide cap on
    bytes queued in ZeroMQ (``queued`` now) and its client's share (``client_queued`` now)."""
    return queued + chunk <= total_cap and client_queued + chunk <= client_cap


class _BufferPool:
    """Chunk buffers reused once ZeroMQ has sent them, and the count of bytes it has not sent yet.

    Fresh memory costs a page fault per 4 KiB on first touch, which for large
    frames costs more than decoding; reusing buffers avoids it. Free buffers are
    bounded by ``max_bytes`` and dropped by :meth:`trim`. Buffers lent to ZeroMQ
    are counted per client (:meth:`queued`), so the server can bound them.
    """

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._free: list[np.ndarray] = []
        self._lent: list[tuple[np.ndarray, Any, bytes]] = []

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        self._collect()
        for k, buf in enumerate(self._free):
            if buf.shape == shape:
                return self._free.pop(k)
        return np.empty(shape, dtype=np.uint8)

    def lend(self, buf: np.ndarray, tracker: Any, client: bytes = b"") -> None:
        """``buf`` is being sent to ``client``; it returns to the pool when ``tracker`` is done."""
        if tracker is not None and not tracker.done:
            self._lent.append((buf, tracker, client))
        else:
            self._free.append(buf)

    def queued(self, client: Optional[bytes] = None) -> int:
        """Bytes lent to ZeroMQ and not yet sent: to ``client``, or to everyone (None)."""
        self._collect()
        return sum(buf.nbytes for buf, _tracker, to in self._lent if client is None or to == client)

    def trim(self, keep: int = 0) -> int:
        """Free all but ``keep`` bytes of the buffers kept for reuse; returns the bytes freed."""
        self._collect()
        before = self.free_bytes
        self._shrink(keep)
        return before - self.free_bytes

    @property
    def free_bytes(self) -> int:
        return sum(b.nbytes for b in self._free)

    def _collect(self) -> None:
        if any(tracker.done for _buf, tracker, _to in self._lent):
            self._free += [buf for buf, tracker, _to in self._lent if tracker.done]
            self._lent = [lent for lent in self._lent if not lent[1].done]
        self._shrink(self.max_bytes)

    def _shrink(self, keep: int) -> None:
        while self._free and self.free_bytes > keep:
            self._free.pop(0)


@attrs.define
class _Client:
    hello: bool = False
    jobs: dict[int, _Job] = attrs.field(factory=dict)
    #: Shared-memory chunk slots, once the client asked for shared memory.
    slots: Optional[shm.ServerSlots] = None

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()
            self.slots = None


class FrameServer:
    """Serves frames on ``binds`` until stopped, its lifeline breaks, or a signal arrives."""

    def __init__(
        self,
        binds: Sequence[str],
        config: Optional[ServerConfig] = None,
        lifeline_fd: Optional[int] = None,
        curve: Optional[ServerCurve] = None,
    ) -> None:
        self.config = config = config if config is not None else ServerConfig()
        self.socket = ServerSocket(binds, curve=curve, max_message_bytes=protocol.max_header_bytes(config.max_request_frames))
        self.endpoints = self.socket.endpoints
        self.lifeline_fd = lifeline_fd
        self._parent_pid = os.getppid()
        self._opener = VideoOpener(config.root, config.max_open_files)
        self._clients: dict[bytes, _Client] = {}
        self._jobs: deque[_Job] = deque()
        #: Per client, messages read but not yet handled: raw frames, or decoded (None: malformed, answered).
        self._inbox: "OrderedDict[bytes, deque[Any]]" = OrderedDict()
        #: Per client, bytes of the messages in its queue not decoded yet; over the limit, it is dropped.
        self._inbox_bytes: dict[bytes, int] = {}
        self._inbox_bytes_limit = CLIENT_QUEUE_REQUESTS * protocol.max_header_bytes(config.max_request_frames)
        #: Connections dropped for flooding: what they send is read and thrown away.
        self._silenced: "OrderedDict[bytes, None]" = OrderedDict()
        self._buffers = _BufferPool(config.buffer_pool_bytes)
        self._last_step = time.monotonic()
        self._trimmed = True  # whether memory went back to the system since the last chunk
        #: (video, grayscale, frame) of the last small request, to read around when idle
        self._around: Optional[tuple[Video, bool, int]] = None
        self._around_at = 0.0
        self._pool = DecoderPool(self._opener, config.workers or default_workers(), config.recent_cache_bytes)
        self._probe = shm.Probe() if config.shared_memory and shm.AVAILABLE else None
        self._running = False
        self._stop_reason = ""
        self._next_probe = time.monotonic() + config.probe_interval

    # -- main loop -------------------------------------------------------------

    def serve_forever(self) -> str:
        """Run until asked to stop; returns why it stopped."""
        poller = zmq.Poller()
        poller.register(self.socket.socket, zmq.POLLIN)
        if self.lifeline_fd is not None:
            poller.register(self.lifeline_fd, zmq.POLLIN)
        self._running = True
        try:
            while self._running:
                events = dict(poller.poll(0 if self._runnable() or self._inbox else self._idle_wait_ms()))
                if self.lifeline_fd is not None and (self.lifeline_fd in events or os.getppid() != self._parent_pid):
                    self.stop("client process is gone")
                    break
                self._drain()
                if self._running and self._runnable():
                    self._step()
                elif self._running and self._around is not None and self._idle_wait_ms() == 0:
                    self._read_around()
                if time.monotonic() >= self._next_probe:
                    self._probe_clients()
                self._tidy()
        finally:
            self._shutdown()
        return self._stop_reason

    def _runnable(self) -> bool:
        """Whether some request has credit for a chunk and room to send it."""
        now = time.monotonic()
        return any(job.credit > 0 and self._may_send(job, now) for job in self._jobs)

    def _may_send(self, job: _Job, now: float) -> bool:
        """Whether ``job``'s next chunk can go now: in a shared slot (worth a try), or inline
        within the server's and its client's caps on bytes queued in ZeroMQ."""
        state = self._clients.get(job.client)
        if job.request.shm and state is not None and state.slots is not None and now >= job.shm_retry_at:
            return True
        return self._inline_room(job)

    def _inline_room(self, job: _Job) -> bool:
        cfg = self.config
        return inline_room(
            self._buffers.queued(),
            self._buffers.queued(job.client),
            job.next_chunk_bytes(),
            cfg.max_inline_bytes,
            min(cfg.client_inline_bytes, self._window_bytes(job.client)),
        )

    def _window_bytes(self, client: bytes) -> int:
        """What credit lets ``client`` have in flight: its requests' windows of full chunks.

        A client that returns credit without reading (a liar) still cannot make more than
        this wait in ZeroMQ for it; an honest client never has more queued than this.
        """
        state = self._clients.get(client)
        jobs = state.jobs.values() if state is not None else ()
        return sum(
            min(job.request.window, self.config.max_window) * job.request.frames_per_chunk * job.frame_bytes
            for job in jobs
        )

    def _waiting_for_room(self) -> bool:
        """Whether some request has credit but no room to send yet (the loop then looks again soon)."""
        return any(job.credit > 0 for job in self._jobs)

    def _tidy(self) -> None:
        """Between chunks: return idle requests' cache, and free kept buffers once the server is idle."""
        self._rebalance_caches()
        if time.monotonic() - self._last_step >= BUFFERS_IDLE_S:
            freed = self._buffers.trim()
            if freed or not self._trimmed:
                _release_free_memory()
            self._trimmed = True

    def stop(self, reason: str) -> None:
        """Ask the loop to end after the current chunk (safe from a signal handler)."""
        self._stop_reason = self._stop_reason or reason
        self._running = False

    def _drain(self) -> None:
        """Read what waits, then handle one fair round: each client's share of its queue."""
        self._receive(READ_BATCH)
        for client in list(self._inbox):
            queue = self._inbox.get(client)
            budget = CLIENT_SHARE
            while queue and budget > 0 and self._running:
                message = self._decoded(client, queue, 0)
                queue.popleft()
                if message is None:
                    budget -= 1
                    continue
                budget -= CLIENT_SHARE if isinstance(message, (Hello, Request, InfoRequest)) else 1
                self._handle(client, message)
            if not queue:
                self._inbox.pop(client, None)
                self._inbox_bytes.pop(client, None)
            else:
                self._inbox.move_to_end(client)  # the next round starts with the next client

    def _receive(self, limit: int, drain_s: float = SILENCED_DRAIN_S) -> int:
        """Read up to ``limit`` waiting messages into their clients' queues; how many were read.

        Reading is cheap and never decodes, so what libzmq holds stays small. A client
        whose queue is full is dropped: it sends without waiting for answers, and from then
        on what its connection sends is read and thrown away unanswered (for at most
        ``drain_s`` per call), so that libzmq does not hold it either.
        """
        count = 0
        drain_until: Optional[float] = None
        while count < limit:
            try:
                client, frames = self.socket.recv()
            except zmq.Again:
                return count
            if client in self._silenced:
                now = time.monotonic()
                if drain_until is None:
                    drain_until = now + drain_s
                elif now > drain_until:
                    return count
                continue
            count += 1
            queue = self._inbox.get(client)
            if queue is None:
                queue = self._inbox[client] = deque()
            queued = self._inbox_bytes.get(client, 0) + sum(len(part) for part in frames)
            if len(queue) < CLIENT_QUEUE and queued <= self._inbox_bytes_limit:
                queue.append(frames)
                self._inbox_bytes[client] = queued
            else:  # dropped on its turn (with an error); silenced from now on
                queue.clear()
                queue.append(_FLOODED)
                self._inbox_bytes[client] = 0
                self._silenced[client] = None
                while len(self._silenced) > MAX_SILENCED:
                    self._silenced.popitem(last=False)
        return count

    def _decoded(self, client: bytes, queue: "deque[Any]", pos: int) -> Optional[protocol.Message]:
        """The message at ``queue[pos]``, decoded in place (None: malformed, and answered)."""
        entry = queue[pos]
        if entry is _FLOODED:
            queue[pos] = None
            self._fail(client, None, ServerError(_FLOODED_MESSAGE))
            log.warning("client %s sent more than the server handles without waiting for answers; dropped", client.hex())
            self._drop_client(client, "flooded the server")
            return None
        if not isinstance(entry, list):
            return entry
        self._inbox_bytes[client] = self._inbox_bytes.get(client, 0) - sum(len(part) for part in entry)
        try:
            message, _payload = protocol.parse(entry, max_frames=1, max_bin_len=self._max_bin_len)
        except ProtocolError as exc:
            log.warning("client %s sent a malformed message: %s", client.hex(), exc)
            self._fail(client, None, exc)
            message = None
        queue[pos] = message
        return message

    @property
    def _max_bin_len(self) -> int:
        """The largest bytes value a client's header may hold: an explicit index array."""
        return protocol.INDEX_BYTES * self.config.max_request_frames

    def _interrupter(self, job: _Job) -> Callable[[], bool]:
        """Asked between frames: has ``job``'s client cancelled it? Other messages wait their turn.

        A client that moves on (a GUI jumping elsewhere) then waits for at most a few
        milliseconds, not for the rest of a chunk nobody wants.
        """
        next_check = [time.monotonic() + INTERRUPT_CHECK_S]

        def cancelled() -> bool:
            now = time.monotonic()
            if now < next_check[0]:
                return False
            next_check[0] = now + INTERRUPT_CHECK_S
            self._receive(INTERRUPT_READ_BATCH, INTERRUPT_SILENCED_DRAIN_S)
            queue = self._inbox.get(job.client)
            for pos in range(len(queue) if queue is not None else 0):
                flooded = queue[pos] is _FLOODED  # type: ignore[index]
                message = self._decoded(job.client, queue, pos)  # type: ignore[arg-type]
                if flooded or (isinstance(message, Cancel) and message.request_id == job.request.request_id):
                    return True
            return False

        return cancelled

    def _shutdown(self) -> None:
        for client, state in list(self._clients.items()):
            if state.jobs or state.hello:
                self._send(client, Shutdown(reason=self._stop_reason or "server stopped"))
        self._jobs.clear()
        for state in self._clients.values():
            state.close()
        self._clients.clear()
        if self._probe is not None:
            self._probe.close()
        self._pool.close()
        self._opener.close()
        self.socket.close()
        log.info("server stopped: %s", self._stop_reason or "stopped")

    # -- messages --------------------------------------------------------------

    def _handle(self, client: bytes, message: protocol.Message) -> None:
        state = self._clients.setdefault(client, _Client())
        if isinstance(message, Hello):
            if message.version != PROTOCOL_VERSION:
                self._fail(
                    client,
                    None,
                    ProtocolError(
                        f"protocol version {message.version} is not supported; "
                        f"this server ({__version__}) speaks version {PROTOCOL_VERSION}"
                    ),
                )
                return
            state.hello = True
            probe = self._probe
            offer = ShmProbe(pid=os.getpid(), fd=probe.buffer.fd, token=probe.token) if probe is not None else None
            welcome = Welcome(version=PROTOCOL_VERSION, server=__version__, shm=offer, max_request_frames=self.config.max_request_frames)
            self._send(client, welcome)
            return
        if isinstance(message, Ping):
            self._send(client, Pong(request_id=message.request_id, server=__version__))
            return
        if not state.hello:
            self._fail(client, None, ProtocolError("send hello before anything else"))
            return
        if isinstance(message, Request):
            self._start(client, state, message)
        elif isinstance(message, Credit):
            job = state.jobs.get(message.request_id)
            if job is not None:
                job.credit = min(job.credit + message.chunks, self.config.max_window)
        elif isinstance(message, Release):
            if state.slots is not None:
                state.slots.release(message.slots)
        elif isinstance(message, Cancel):
            job = state.jobs.pop(message.request_id, None)
            if job is not None:
                self._jobs.remove(job)
                self._log_job(job, "cancelled")
        elif isinstance(message, InfoRequest):
            try:
                reader = self._opener.open(message.video)
                info = attrs.evolve(reader.info(message.video.grayscale), filename=message.video.filename)
            except Exception as exc:
                self._fail(client, message.request_id, exc)
                log.info("client=%s info video=%s refused: %s", client.hex(), message.video.filename, exc)
                return
            self._send(client, InfoReply(request_id=message.request_id, info=info))
        elif isinstance(message, Stop):
            if self.config.allow_stop:
                self.stop("a client asked it to stop")
            else:
                self._fail(client, None, ServerError("this server does not accept stop"))
        else:
            self._fail(client, None, ProtocolError(f"{type(message).__name__} is not a client message"))

    def _start(self, client: bytes, state: _Client, request: Request) -> None:
        """Take ``request`` on, or answer with the error that refuses it."""
        try:
            job = self._new_job(client, state, request)
        except Exception as exc:
            self._fail(client, request.request_id, exc)
            log.info("client=%s video=%s refused: %s", client.hex(), request.video.filename, exc)
            return
        if request.shm and self._probe is not None and state.slots is None:
            # Enough slots for the window, the chunk the caller holds, and releases on their way.
            state.slots = shm.ServerSlots(max_slots=self.config.max_window + 3)
        state.jobs[request.request_id] = job
        self._jobs.append(job)
        self._rebalance_caches()

    def _new_job(self, client: bytes, state: _Client, request: Request) -> _Job:
        """The job for ``request``; raises what refuses it (a limit, a bad file or index)."""
        cfg = self.config
        rid = request.request_id
        if rid in state.jobs:
            raise ProtocolError(f"request id {rid} is already in use")
        if len(state.jobs) >= cfg.max_requests_per_client:
            raise ServerError(f"too many concurrent requests from this client (limit {cfg.max_requests_per_client})")
        if request.frames_per_chunk > cfg.max_frames_per_chunk:
            raise ServerError(
                f"frames_per_chunk {request.frames_per_chunk} exceeds this server's limit of {cfg.max_frames_per_chunk}"
            )
        count = protocol.selection_count(request.frame_idxs)
        if count is not None:  # counted before anything is opened or built
            self._check_count(count)
        reader = self._opener.open(request.video)
        idxs = protocol.selection_indices(request.frame_idxs, reader.frame_count)
        self._check_count(len(idxs))
        reader.check_indices(idxs)
        gray = reader.resolve_grayscale(request.video.grayscale)
        frame_shape = reader.frame_shape(gray)
        frame_bytes = math.prod(frame_shape)
        chunk_bytes = min(request.frames_per_chunk, max(len(idxs), 1)) * frame_bytes
        limit = self._chunk_limit()
        if chunk_bytes > limit:
            raise ServerError(
                f"a chunk of {request.frames_per_chunk} frames of this video is {chunk_bytes / 2**20:.3g} MiB, "
                f"over this server's limit of {limit / 2**20:.3g} MiB; ask for fewer frames per chunk"
            )
        return _Job(
            client=client,
            request=request,
            reader_key=_reader_key(request.video),
            grayscale=gray,
            frame_idxs=idxs,
            credit=min(request.window, cfg.max_window),
            frame_bytes=frame_bytes,
            frame_shape=frame_shape,
            cache=_request_cache(idxs, min(cfg.request_cache_bytes, cfg.total_cache_bytes)),
            identity=reader.signature,
        )

    def _chunk_limit(self) -> int:
        """Largest chunk a request may ask for: it must also fit one client's share of inline bytes."""
        cfg = self.config
        return min(cfg.max_chunk_bytes, cfg.client_inline_bytes, cfg.max_inline_bytes)

    def _check_count(self, count: int) -> None:
        limit = self.config.max_request_frames
        if count > limit:
            raise ServerError(f"request for {count} frames exceeds this server's limit of {limit}")

    def _rebalance_caches(self) -> None:
        """Give each request its share of the frame cache (see :func:`cache_shares`); a cache over
        its new share releases the frames it needs last."""
        cached = [job for job in self._jobs if job.cache is not None]
        if not cached:
            return
        now = time.monotonic()
        idle = [job.idle(now) for job in cached]
        cfg = self.config
        active_share, idle_share = cache_shares(cfg.total_cache_bytes, cfg.request_cache_bytes, idle.count(False), idle.count(True))
        for job, is_idle in zip(cached, idle):
            assert job.cache is not None
            share = idle_share if is_idle else active_share
            if job.cache.max_bytes != share:
                job.cache.resize(share)

    def _choose(self) -> Optional[tuple[_Job, Optional[tuple[int, shm.SharedBuffer]]]]:
        """The next request (round-robin) that has credit and room for its next chunk, with the
        shared slot it goes in (None: inline). Requests waiting for room are skipped, so a
        client that stopped reading holds up nobody else."""
        now = time.monotonic()
        for _ in range(len(self._jobs)):
            job = self._jobs[0]
            self._jobs.rotate(-1)
            if job.credit <= 0 or not self._may_send(job, now):
                continue
            state = self._clients.get(job.client)
            slots = state.slots if state is not None and job.request.shm else None
            chunk_bytes = job.next_chunk_bytes()
            if slots is not None and chunk_bytes and now >= job.shm_retry_at:
                try:
                    lease = slots.take(chunk_bytes, self.config.max_shared_bytes - self._shared_bytes())
                except OSError as exc:  # no shared memory to be had now: the chunk goes inline
                    log.warning("no shared-memory slot for client %s: %s", job.client.hex(), exc)
                    lease = None
                if lease is not None:
                    return job, lease
                job.shm_retry_at = now + ROOM_RETRY_S
            if self._inline_room(job):
                return job, None
        return None

    def _step(self) -> None:
        """Decode and send one chunk of the next request that has credit and room to send it."""
        chosen = self._choose()
        if chosen is None:
            return
        job, lease = chosen
        self._last_step = job.last_sent = time.monotonic()
        self._trimmed = False
        self._rebalance_caches()
        request = job.request
        fpc = request.frames_per_chunk
        start = job.next_chunk * fpc
        idxs = _frames_at(job.frame_idxs, start, start + fpc)
        last = job.next_chunk + 1 >= job.n_chunks
        if job.cache is not None:
            ahead = self.config.cache_lookahead_frames
            job.cache.want(later=_frames_at(job.frame_idxs, start + fpc, start + fpc + ahead), now=idxs)
        state = self._clients.get(job.client)
        slots = state.slots if state is not None and request.shm else None
        try:
            shape = (len(idxs), *job.frame_shape)
            frames = lease[1].view(shape) if lease is not None else self._buffers.take(shape)
            self._read(job, idxs, frames)
        except Exception as exc:
            if lease is not None and slots is not None:
                slots.release([lease[0]])
            if not isinstance(exc, ReadInterrupted):  # interrupted: its client cancelled it (see self._inbox)
                self._finish(job, error=exc)
            return
        where = None
        if lease is not None and slots is not None:
            where = ShmSlot(slot=lease[0], fd=lease[1].fd, size=lease[1].size, retired=slots.take_retired())
        header = protocol.chunk_header(request.request_id, job.next_chunk, last, idxs, frames, shm=where)
        job.next_chunk += 1
        job.credit -= 1
        if not self._send(job.client, header, frames if where is None else None):
            return
        if last:
            self._finish(job)

    def _shared_bytes(self) -> int:
        """Shared memory held for all clients' chunk slots."""
        return sum(state.slots.nbytes for state in self._clients.values() if state.slots is not None)

    def _read(self, job: _Job, idxs: list[int], frames: np.ndarray) -> None:
        """Decode ``idxs`` into ``frames``; small requests go through the recent-frames cache.

        The file must be the one the request started on, before and after decoding.
        """
        recent = len(job.frame_idxs) <= self.config.recent_request_frames
        self._pool.read(
            job.request.video,
            idxs,
            job.grayscale,
            frames,
            identity=job.identity,
            cache=job.cache,
            recent=recent,
            interrupt=self._interrupter(job),
        )
        if recent and idxs:
            self._around = (job.request.video, job.grayscale, idxs[-1])
            self._around_at = time.monotonic() + READ_AROUND_DELAY_S

    def _idle_wait_ms(self) -> int:
        """How long the loop may sleep: until reading around is due, else a quarter second
        (a request waiting for room to send looks again every ``ROOM_RETRY_S``)."""
        longest = math.ceil(ROOM_RETRY_S * 1000) if self._waiting_for_room() else 250
        if self._around is None:
            return longest
        return min(longest, max(0, math.ceil((self._around_at - time.monotonic()) * 1000)))

    def _read_around(self) -> None:
        """While idle, decode the frames around the last small request into the recent-frames cache.

        A GUI stepping back or forth from the frame it just showed then finds its next
        frame ready. Any message that arrives stops this between two frames.
        """
        assert self._around is not None
        video, gray, i = self._around
        self._around = None
        reader = self._opener.opened(video)
        if reader is None:
            return
        cfg = self.config
        frame_bytes = math.prod(reader.frame_shape(gray))
        span = min(cfg.read_around_frames, cfg.recent_cache_bytes // 4 // max(frame_bytes, 1))
        lo, hi = max(0, i - span // 2), min(reader.frame_count, i + span // 2 + 1)
        kept = self._pool.read_around(video, gray, range(lo, hi), interrupt=lambda: bool(self.socket.socket.poll(0)))
        if kept:
            log.debug("read around frame %d of %s: kept frames %d..%d", i, video.filename, lo, hi - 1)

    def _finish(self, job: _Job, error: Optional[BaseException] = None) -> None:
        job.cache = None
        state = self._clients.get(job.client)
        if state is not None:
            state.jobs.pop(job.request.request_id, None)
        if job in self._jobs:
            self._jobs.remove(job)
        if error is not None:
            if not isinstance(error, AsyncFramesError):
                log.exception("internal error serving request", exc_info=error)
                self._opener.forget(job.request.video)
            self._fail(job.client, job.request.request_id, error)
            self._log_job(job, f"failed: {error}")
        else:
            self._log_job(job, "done")

    def _log_job(self, job: _Job, outcome: str) -> None:
        sent = min(len(job.frame_idxs), job.next_chunk * job.request.frames_per_chunk)
        log.info(
            "client=%s video=%s frames=%d/%d chunks=%d time=%.3fs %s",
            job.client.hex(),
            job.request.video.filename,
            sent,
            len(job.frame_idxs),
            job.next_chunk,
            time.monotonic() - job.started,
            outcome,
        )

    # -- clients ---------------------------------------------------------------

    def _fail(self, client: bytes, request_id: Optional[int], exc: BaseException) -> bool:
        """Tell ``client`` that its request ``request_id`` (None: its message) failed with ``exc``."""
        return self._send(client, _error_for(request_id, exc, self.config.root))

    def _send(self, client: bytes, message: protocol.Message, payload: Any = None) -> bool:
        """Send, dropping the client and its work if it has gone. True if sent."""
        try:
            tracker = self.socket.send(client, message, payload)
            if payload is not None:
                self._buffers.lend(payload, tracker, client)
            return True
        except PeerGone:
            self._drop_client(client, "disconnected")
        except PeerBusy:
            # Credit keeps queues short, so a full queue means a client that stopped reading;
            # a probe that does not fit is simply skipped.
            if not isinstance(message, Ping):
                self._drop_client(client, "stopped reading (queue full)")
        return False

    def _drop_client(self, client: bytes, why: str) -> None:
        state = self._clients.pop(client, None)
        if state is None:
            return
        state.close()
        for job in state.jobs.values():
            job.cache = None
            if job in self._jobs:
                self._jobs.remove(job)
            self._log_job(job, f"abandoned: client {why}")
        # Its chunks still queued are freed by ZeroMQ with its connection; kept buffers go once idle.
        self._rebalance_caches()

    def _probe_clients(self) -> None:
        """Find clients that went away without a word, so their requests are freed."""
        self._next_probe = time.monotonic() + self.config.probe_interval
        for client in list(self._clients):
            self._send(client, Ping(request_id=0))


#: Marks a client queue that overflowed: the client is dropped when its turn comes.
_FLOODED = object()
_FLOODED_MESSAGE = (
    f"this client sent more messages (over {CLIENT_QUEUE}, or over {CLIENT_QUEUE_REQUESTS} of the largest "
    "requests in bytes) than the server had handled yet; "
    "its requests are cancelled and what this connection sends is ignored from now on "
    "(wait for answers before sending more; a new connection is served again)"
)


def _request_cache(idxs: "range | np.ndarray", budget: int) -> Optional[FrameCache]:
    """The cache a request needs: none when it strictly moves forward (nothing decoded is asked
    for again); for requests that only move forward, no decoding ahead within GOPs.
    ``budget`` is its size until the server rebalances shares."""
    if budget <= 0:
        return None
    if isinstance(idxs, range):
        return None if idxs.step > 0 or len(idxs) <= 1 else FrameCache(budget)
    before, after = idxs[:-1], idxs[1:]  # views: one byte per index compared, no copies
    if bool((after > before).all()):
        return None
    return FrameCache(budget, finish_gops=not bool((after >= before).all()))


def _frames_at(idxs: "range | np.ndarray", start: int, stop: int) -> list[int]:
    """Frames ``idxs[start:stop]`` as Python ints (one chunk's worth, never the whole request)."""
    part = idxs[start:stop]
    return part.tolist() if isinstance(part, np.ndarray) else list(part)


def _release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise); a no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError, TypeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _reader_key(video: Video) -> tuple[str, int]:
    return (video.filename, video.stream)


def _error_for(request_id: Optional[int], exc: BaseException, root: Optional[str] = None) -> Error:
    """The error message a failure becomes on the wire (paths under ``root`` relative to it)."""
    if isinstance(exc, AsyncFramesError):
        error, message = type(exc).__name__, str(exc)
    elif isinstance(exc, MemoryError):
        error, message = "ServerError", "the server ran out of memory for this request"
    else:
        error, message = "ServerError", f"internal server error: {type(exc).__name__}: {exc}"
    return Error(request_id=request_id, error=error, message=files.hide_root(message, root))
