"""``AsyncVideo``: ask frame servers for frames and receive them chunk by chunk.

The client never blocks without a bound: every wait polls in short slices and
checks that each server is still there (its process for a private server, the
connection for any server), so a dead server is reported as
:class:`ServerDiedError` within a second or so, and a silent one as
:class:`RequestTimeoutError` after ``timeout`` seconds.

Flow control is by credit: a server keeps at most ``prefetch`` chunks ahead of
what the caller has taken, so memory stays bounded however long the request.
Given several servers, a request is dealt out chunk by chunk (chunk *k* to
server *k mod n*), each server streams its share, and chunks are handed back
in order.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections import deque
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import attrs
import numpy as np
import zmq

from . import protocol, shm
from .errors import (
    AsyncFramesError,
    AuthenticationError,
    FrameIndexError,
    ProtocolError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerDiedError,
    ServerError,
    ServerShutdownError,
    ServerStartError,
    error_from_wire,
)
from .process import ServerProcess, prestart, take_prestarted
from .transport import ClientCurve, ClientSocket, poll_any
from .video import Video, VideoInfo, as_video

VideoLike = Union[Video, str, "os.PathLike[str]"]
FrameIdxs = Optional[Union[Sequence[int], range, np.ndarray, Iterable[int]]]
PathLike = Union[str, "os.PathLike[str]"]

_DEFAULT: Any = object()
#: Longest single wait between liveness checks.
_SLICE_S = 0.05


class FrameChunk(NamedTuple):
    """One chunk: the frame indices and their frames, ``(len(frame_idxs), h, w, c)`` uint8.

    ``frames`` is a zero-copy view of the received message; the caller owns it
    and may write to it.
    """

    frame_idxs: list[int]
    frames: np.ndarray


def normalize_frame_idxs(frame_idxs: FrameIdxs) -> "Optional[Union[range, np.ndarray]]":
    """Frame indices as a range or a one-dimensional integer array (None stays None: every frame).

    Never a list of Python ints: millions of indices stay one compact array, sent as raw bytes.
    """
    if frame_idxs is None:
        return None
    if isinstance(frame_idxs, (str, bytes, bytearray, memoryview)):
        raise TypeError(
            f"frame_idxs must be frame numbers (a list, range or 1-D integer array) or None, "
            f"got {type(frame_idxs).__name__} {frame_idxs!r:.60}"
        )
    if isinstance(frame_idxs, range):
        if len(frame_idxs) and min(frame_idxs[0], frame_idxs[-1]) < 0:
            raise FrameIndexError(f"frame index {min(frame_idxs[0], frame_idxs[-1])} is negative; frames are numbered from 0")
        return frame_idxs
    else:
        if not isinstance(frame_idxs, (np.ndarray, Sequence)):
            if isinstance(frame_idxs, (int, np.integer)) or not isinstance(frame_idxs, Iterable):
                raise TypeError(f"frame_idxs must be a sequence of ints, got {type(frame_idxs).__name__}")
            frame_idxs = list(frame_idxs)
        arr = np.asarray(frame_idxs)
        if arr.size == 0:
            return np.empty(0, dtype=np.int64)
        if arr.ndim != 1:
            raise TypeError(f"frame_idxs must be one-dimensional, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"frame indices must be integers, got {arr.dtype}")
    negative = np.flatnonzero(arr < 0)
    if negative.size:
        raise FrameIndexError(f"frame index {arr[negative[0]]} is negative; frames are numbered from 0")
    if arr.max() > protocol.MAX_FRAME_INDEX:
        raise FrameIndexError(f"frame index {arr.max()} is beyond the largest a video can have ({protocol.MAX_FRAME_INDEX})")
    return arr


class _Connection:
    """One server: its socket, whether it greeted us, and whether it is still there.

    When the connection is lost (or the server says it shuts down) the DEALER is
    closed and a fresh one made: nothing queued for the old connection (a
    ``Cancel``, a ``Credit``, a ``Shutdown`` from the old server) can reach or
    come from the new one, and the next message sent is always a new ``Hello``.
    """

    def __init__(self, endpoint: str, curve: Optional[ClientCurve], process: Optional[ServerProcess] = None) -> None:
        self.endpoint = endpoint
        self.process = process
        self._curve = curve
        self.socket = _open_socket(endpoint, curve)
        self.curve = curve is not None
        self.greeted = False
        self.connected = False  # a ZMTP handshake has succeeded at least once
        self.generation = 0  # bumped each time the socket is replaced
        self.ever_greeted = False  # a frame server with our settings has answered at this endpoint
        self.server_version = ""
        self.inbox: deque = deque()  # (message, payload) of the current stream, in arrival order
        self.chunks_received = 0
        self.shm_pid: Optional[int] = None  # the server's pid when we reach its shared memory
        self.max_request_frames: Optional[int] = None  # the server's limit, from its welcome
        self.slots = shm.ClientSlots()

    def welcome(self, message: protocol.Welcome) -> None:
        """The server greeted us: note its version and whether its shared memory is in reach."""
        self.greeted, self.server_version = True, message.server
        self.ever_greeted = True
        self.max_request_frames = message.max_request_frames
        probe = message.shm
        reachable = probe is not None and shm.can_reach(probe.pid, probe.fd, probe.token)
        self.shm_pid = probe.pid if reachable and probe is not None else None
        self.slots = shm.ClientSlots()  # slot numbers are per server process

    def reset(self) -> None:
        """The connection is lost: start over with a fresh socket (fresh queues) and no greeting."""
        for message, _payload in self.inbox:
            self.drop(message)
        self.inbox.clear()
        self.socket.close()
        self.greeted = self.connected = False
        self.shm_pid = None
        self.slots.clear()  # arrays the caller holds keep their own mapping
        self.slots = shm.ClientSlots()
        self.generation += 1
        self.socket = _open_socket(self.endpoint, self._curve)

    def send(self, message: protocol.Message, deadline: Optional[float], busy: bool = True) -> bool:
        """Queue ``message`` by ``deadline`` (False if it could not be), raising if the connection failed.

        ``busy``: the message belongs to this connection's conversation (a request, a
        credit), so losing the connection meanwhile is a :class:`ServerDiedError`;
        otherwise (a Hello) it returns False and the caller starts over.
        """
        generation = self.generation

        def between() -> None:
            self.check(busy=busy)
            if self.generation != generation:
                if busy:
                    raise ServerDiedError(f"lost the connection to the frame server at {self.endpoint}")
                raise _Replaced()

        try:
            return self.socket.send(message, deadline, between, _SLICE_S)
        except _Replaced:
            return False

    def send_soon(self, message: protocol.Message) -> None:
        """Best effort, bounded by a short wait: a message whose loss the protocol tolerates or a reset repairs."""
        _quietly(self.send, message, time.monotonic() + _SLICE_S)

    def drop(self, message: protocol.Message) -> None:
        """A chunk nobody will look at: hand its shared slot straight back."""
        if isinstance(message, protocol.Chunk) and message.shm is not None:
            self.slots.forget(message.shm.retired)
            self.slots.discard(message.shm.slot)

    def send_released(self, deadline: Optional[float]) -> None:
        """Tell the server which shared slots the caller has let go of since we last said."""
        freed = self.slots.take_freed()
        if freed:
            self.send(protocol.Release(slots=freed), deadline)

    def check(self, busy: bool) -> None:
        """Raise if the server is gone (``busy``: something is outstanding on this connection)."""
        self._check_process()
        for event in self.socket.events():
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise AuthenticationError(f"the frame server at {self.endpoint} refused our CURVE credentials")
            if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                if self.ever_greeted:
                    # A frame server with our settings answered here before: this is not it (yet), e.g.
                    # a reconnect to a free port that the kernel turned into a connection to ourselves.
                    self.reset()
                    return
                raise AuthenticationError(
                    f"the handshake with {self.endpoint} failed: its security settings differ from ours "
                    "(CURVE required on one side only, or not a frame server?)"
                )
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                was_connected = self.connected
                said = self._last_words()
                self.reset()
                if busy and was_connected:
                    if said is not None:
                        raise ServerShutdownError(f"the frame server at {self.endpoint} shut down: {said.reason}")
                    if self.process is not None:
                        self._wait_for_exit()
                    raise ServerDiedError(f"lost the connection to the frame server at {self.endpoint}")
                return  # the old socket's other events are history

    def _last_words(self) -> Optional[protocol.Shutdown]:
        """The connection is gone: the Shutdown it left in our queue, if any (the rest is of no use now)."""
        said = None
        try:
            while self.socket.has_message():
                message, _payload = self.socket.recv()
                if isinstance(message, protocol.Shutdown):
                    said = message
        except (zmq.ZMQError, AsyncFramesError):
            pass
        return said

    def _check_process(self) -> None:
        if self.process is None:
            return
        code = self.process.exit_code()
        if code is not None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise ServerDiedError(f"the frame server (pid {self.process.pid}) {how}")

    def _wait_for_exit(self, within: float = 1.0) -> None:
        """A private server's socket closed: report how the process ended, if it did."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self._check_process()
            time.sleep(0.01)

    def close(self) -> None:
        self.socket.close()
        self.slots.clear()  # arrays the caller still holds keep their own mapping
        if self.process is not None:
            self.process.stop()
            self.process = None

    def abandon(self) -> None:
        """In a forked child: forget the parent's socket and server without touching them."""
        self.process = None
        self.inbox.clear()


class _Replaced(Exception):
    """The connection was replaced while a message waited to be sent."""


@attrs.define
class _Stream:
    """A request in flight, dealt over ``conns``: global chunk k comes from ``conns[k % n]``.

    ``idxs``/``frames_per_chunk``/``spec`` are what we asked for, so each chunk
    can be checked against it; ``frame_shape`` is the ``(h, w, c)`` of its first
    non-empty chunk, which every later chunk must share.
    """

    request_id: int
    conns: list[_Connection]
    total_chunks: Optional[int]  # None: a single server decides (every frame of the video)
    idxs: "Optional[Union[range, np.ndarray]]" = None
    frames_per_chunk: int = 64
    spec: Optional[Video] = None
    next_chunk: int = 0
    done: bool = False
    frame_shape: Optional[tuple[int, ...]] = None
    ended: str = ""  # why it ended before its last chunk: "was cancelled by cancel()", ...
    end_seen: bool = False  # the caller has been given its end

    def expected_idxs(self, k: int, n: int) -> Optional[list[int]]:
        """The frame indices global chunk ``k`` must hold (``n``: how many it holds, for every-frame requests)."""
        fpc = self.frames_per_chunk
        if self.idxs is None:
            return list(range(k * fpc, k * fpc + n))
        selected = self.idxs[k * fpc : (k + 1) * fpc]
        return selected.tolist() if isinstance(selected, np.ndarray) else list(selected)


class AsyncVideo:
    """Frames from background frame servers, chunk by chunk.

    ``endpoint``: None starts a private server process that lives as long as this
    object; a string (or several) connects to running servers (``asyncframes serve``),
    each ``tcp://host:port`` or ``ipc://path``.
    ``timeout`` bounds every wait (None: wait as long as the server lives).
    ``curve_secret``/``curve_server_key``: this client's ``.key_secret`` file and
    the server's ``.key`` file, for servers that require CURVE authentication.
    ``workers``: decoder threads of a private server (None: one per 2 CPUs).
    ``shared_memory``: take frames through shared memory when the server is on
    this machine (no copy at all); False always receives them inline.
    Not thread-safe: use one AsyncVideo per thread, and not across ``fork``:
    make one in the child process (e.g. in a DataLoader worker).
    """

    def __init__(
        self,
        endpoint: Optional[Union[str, Sequence[str]]] = None,
        *,
        timeout: Optional[float] = 30.0,
        start_timeout: float = 30.0,
        prefetch: int = 2,
        curve_secret: Optional[PathLike] = None,
        curve_server_key: Optional[PathLike] = None,
        server_log_level: str = "WARNING",
        workers: Optional[int] = None,
        shared_memory: bool = True,
    ) -> None:
        self._closed = True  # until fully open, so __del__ of a half-made object is harmless
        self._conns: list[_Connection] = []
        self._pid = os.getpid()
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if (curve_secret is None) != (curve_server_key is None):
            raise ValueError("CURVE needs both curve_secret (ours) and curve_server_key (the server's)")
        _check_workers(workers)
        endpoints = None if endpoint is None else _check_endpoints(endpoint)
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.prefetch = prefetch
        self._ids = itertools.count(1)
        self._stream: Optional[_Stream] = None
        self._last: Optional[_Stream] = None  # the latest request, even once it is over
        self._replies: dict[int, Any] = {}
        self.shared_memory = shared_memory
        self._awaiting: set[int] = set()
        curve = ClientCurve.load(curve_secret, curve_server_key) if curve_secret and curve_server_key else None
        self._closed = False
        try:
            if endpoints is None:
                options = _server_options(workers)
                process = take_prestarted(server_log_level, options, start_timeout) or ServerProcess(
                    start_timeout=start_timeout, log_level=server_log_level, options=options
                )
                self._conns.append(_Connection(process.endpoint, None, process))
            else:
                self._conns.extend(_Connection(e, curve) for e in endpoints)
            deadline = time.monotonic() + start_timeout
            for conn in self._conns:
                self._greet(conn, deadline, start_timeout)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def prestart(*, workers: Optional[int] = None, server_log_level: str = "WARNING") -> int:
        """Start a private server now, in the background, for the next ``AsyncVideo()``; its pid.

        Starting Python, NumPy and PyAV takes a few hundred milliseconds. Call this
        when your app starts, and the first video it opens finds its server ready.
        The arguments must match the ``AsyncVideo`` that is to take it.
        """
        return prestart(server_log_level, _server_options(workers))

    @classmethod
    def from_video(
        cls,
        video: VideoLike,
        frame_idxs: FrameIdxs = None,
        frames_per_chunk: int = 64,
        **kwargs: Any,
    ) -> "AsyncVideo":
        """Start a client (``kwargs`` go to the constructor) and request frames of ``video``."""
        client = cls(**kwargs)
        try:
            client.load_by_chunk(video, frame_idxs, frames_per_chunk)
        except BaseException:
            client.close()
            raise
        return client

    # -- requests ----------------------------------------------------------------

    def load_by_chunk(self, video: VideoLike, frame_idxs: FrameIdxs = None, frames_per_chunk: int = 64) -> None:
        """Request ``frame_idxs`` of ``video`` (None: all frames), replacing any current request."""
        self._check_open()
        spec = self._spec(video)
        idxs = normalize_frame_idxs(frame_idxs)
        if isinstance(frames_per_chunk, bool) or not isinstance(frames_per_chunk, (int, np.integer)) or frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be a positive integer, got {frames_per_chunk!r}")
        fpc = int(frames_per_chunk)
        rid = next(self._ids)
        self.cancel(reason=f"was replaced by request {rid} (load_by_chunk)")
        deadline = self._deadline(self.timeout)
        if len(self._conns) == 1:
            self._stream = self._last = _Stream(rid, self._conns[:1], None, idxs, fpc, spec)
            requests = [(self._conns[0], protocol.Request(rid, spec, protocol.frame_selection(idxs), fpc, self.prefetch))]
        else:
            if idxs is None:
                idxs = range(self.info(spec).frame_count)
            chunks = [idxs[k : k + fpc] for k in range(0, len(idxs), fpc)]
            conns = self._conns[: max(1, min(len(self._conns), len(chunks)))]
            self._stream = self._last = _Stream(rid, conns, len(chunks), idxs, fpc, spec, done=not chunks)
            shares = [
                np.concatenate([np.asarray(chunk, dtype=np.int64) for chunk in chunks[j :: len(conns)]] or [np.empty(0, np.int64)])
                for j in range(len(conns))
            ]
            requests = [
                (conn, protocol.Request(rid, spec, protocol.frame_selection(share), fpc, self.prefetch))
                for conn, share in zip(conns, shares)
                if len(share)
            ]
        try:
            for conn, request in requests:
                self._request(conn, request, deadline)
        except BaseException as exc:
            self.cancel(reason=f"could not be sent ({type(exc).__name__}: {exc})")
            raise

    @property
    def done(self) -> bool:
        """True when there is no request or its last chunk has been taken."""
        return self._stream is None or self._stream.done

    @property
    def chunks(self) -> Iterator[FrameChunk]:
        """Yield ``(frame_idxs, frames)`` for every chunk of the current request, in order.

        Never ends silently: iterating after ``close()`` raises the closed error,
        after ``cancel()`` (or once ``load_by_chunk`` replaced the request)
        :class:`RequestCancelledError`, and once a request was fully consumed an
        :class:`AsyncFramesError` saying so.
        """
        return self._iterate()

    def _iterate(self) -> Iterator[FrameChunk]:
        self._check_open()
        stream = self._stream
        if stream is None:
            raise self._ended_error(self._last)
        if stream.done and stream.end_seen:
            raise self._ended_error(stream)
        while True:
            self._check_open()
            if stream.done:  # every chunk delivered: the end, even if another request followed
                stream.end_seen = True
                return
            if stream is not self._stream:
                raise self._ended_error(stream)
            chunk = self.next_chunk(timeout=self.timeout)
            if chunk is not None:
                yield chunk
            elif stream is self._stream and not stream.done:
                raise RequestTimeoutError(
                    f"no chunk arrived within {self.timeout:g} s (request {stream.request_id}, chunk {stream.next_chunk})"
                )

    def _ended_error(self, stream: Optional[_Stream]) -> AsyncFramesError:
        """Why there is nothing (more) to iterate."""
        if self._closed:
            return AsyncFramesError("this AsyncVideo is closed")
        if stream is None:
            return AsyncFramesError("there is no request to iterate: call load_by_chunk(video, frame_idxs) first")
        if stream.done:
            return AsyncFramesError(
                f"request {stream.request_id} was fully consumed: all {stream.next_chunk} of its chunks were delivered; "
                "call load_by_chunk(...) to request frames again"
            )
        return RequestCancelledError(
            f"request {stream.request_id} {stream.ended or 'was cancelled'} after {stream.next_chunk} of its chunks "
            "were delivered; call load_by_chunk(...) to request frames again"
        )

    def next_chunk(self, timeout: Optional[float] = _DEFAULT) -> Optional[FrameChunk]:
        """The next chunk if one arrives within ``timeout`` seconds (0: only if ready now), else None.

        Raises the request's error (e.g. :class:`FrameIndexError`) if a server reported one.
        """
        self._check_open()
        deadline = self._deadline(timeout)
        while True:
            stream = self._stream
            if stream is None or stream.done:
                return None
            conn = stream.conns[stream.next_chunk % len(stream.conns)]
            if conn.inbox:
                chunk = self._take(stream, conn, *conn.inbox.popleft(), deadline)
                if chunk is not None:
                    return chunk
                continue
            if not self._pump(deadline):
                return None

    def cancel(self, reason: str = "was cancelled by cancel()") -> None:
        """Abandon the current request; chunks still in flight are discarded."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        if not stream.done:
            stream.ended = reason
        for conn in stream.conns:
            for message, _payload in conn.inbox:
                conn.drop(message)
            conn.inbox.clear()
            if self._closed or not conn.greeted:
                continue  # a connection being replaced carries nothing stale to the next one
            if not stream.done:
                conn.send_soon(protocol.Cancel(request_id=stream.request_id))
            _quietly(conn.send_released, time.monotonic() + _SLICE_S)

    def info(self, video: VideoLike, timeout: Optional[float] = _DEFAULT) -> VideoInfo:
        """Metadata of ``video`` as the server sees it (frame count, size, channels, fps, codec)."""
        self._check_open()
        spec = self._spec(video)
        timeout = self.timeout if timeout is _DEFAULT else timeout
        deadline = self._deadline(timeout)
        rid = next(self._ids)
        self._awaiting.add(rid)
        try:
            self._request(self._conns[0], protocol.InfoRequest(request_id=rid, video=spec), deadline)
            reply = self._await_reply(rid, deadline, timeout)
        finally:
            self._awaiting.discard(rid)
        if isinstance(reply, protocol.Error):
            raise error_from_wire(reply.error, reply.message)
        assert isinstance(reply, protocol.InfoReply)
        return reply.info

    def ping(self, timeout: Optional[float] = _DEFAULT) -> float:
        """Round-trip time to the (first) server in seconds."""
        self._check_open()
        timeout = self.timeout if timeout is _DEFAULT else timeout
        deadline = self._deadline(timeout)
        rid = next(self._ids)
        start = time.perf_counter()
        self._awaiting.add(rid)
        try:
            self._request(self._conns[0], protocol.Ping(request_id=rid), deadline)
            self._await_reply(rid, deadline, timeout)
        finally:
            self._awaiting.discard(rid)
        return time.perf_counter() - start

    # -- what and where ----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The (first) server's endpoint."""
        return self._conns[0].endpoint

    @property
    def endpoints(self) -> list[str]:
        return [conn.endpoint for conn in self._conns]

    @property
    def server_version(self) -> str:
        return self._conns[0].server_version if self._conns else ""

    @property
    def server_pid(self) -> Optional[int]:
        """Process id of the private server, if this client owns one."""
        process = self._conns[0].process if self._conns else None
        return process.pid if process is not None else None

    @property
    def chunks_by_endpoint(self) -> dict[str, int]:
        """How many chunks each server has delivered to this client."""
        return {conn.endpoint: conn.chunks_received for conn in self._conns}

    # -- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Cancel any request, stop a private server, release the sockets. Safe to call twice.

        In a forked child this touches nothing the parent owns (its server, its
        sockets): the child only forgets them.
        """
        conns = getattr(self, "_conns", [])
        if not conns:
            self._closed = True
            return
        if getattr(self, "_pid", os.getpid()) != os.getpid():
            self._closed, self._stream, self._conns = True, None, []
            for conn in conns:
                conn.abandon()
            _FORKED_LEFTOVERS.extend(conns)  # never collected here: their sockets belong to the parent
            return
        try:
            if not getattr(self, "_closed", True):
                self.cancel(reason="was cancelled by close()")
                for conn in conns:
                    if conn.process is not None:
                        conn.send_soon(protocol.Stop())
        finally:
            self._closed = True
            self._stream = None
            self._conns = []
            for conn in conns:
                conn.close()

    def __enter__(self) -> "AsyncVideo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- internals ---------------------------------------------------------------

    def _spec(self, video: VideoLike) -> Video:
        spec = as_video(video)
        if self._conns and self._conns[0].process is not None and "://" not in spec.filename:
            # Our own server shares our filesystem; make the path independent of its cwd.
            spec = attrs.evolve(spec, filename=os.path.abspath(spec.filename))
        return spec

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            raise AsyncFramesError(
                f"this AsyncVideo was made in process {self._pid} and cannot be used across fork (this is process "
                f"{os.getpid()}, e.g. a DataLoader worker): create an AsyncVideo in the child process instead "
                "(e.g. lazily, on first use in the worker)"
            )
        if self._closed:
            raise AsyncFramesError("this AsyncVideo is closed")

    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        timeout = self.timeout if timeout is _DEFAULT else timeout
        return None if timeout is None else time.monotonic() + timeout

    def _greet(self, conn: _Connection, deadline: Optional[float], timeout: Optional[float]) -> None:
        """Handshake (again, after a reconnect) so the server knows our protocol version; by ``deadline``.

        If the connection is replaced meanwhile (the server went away), say hello again on the new one.
        """
        hello = protocol.Hello(version=protocol.PROTOCOL_VERSION, client=f"asyncframes pid={os.getpid()}")
        while not conn.greeted:
            generation = conn.generation
            if conn.send(hello, deadline, busy=False):
                while not conn.greeted and conn.generation == generation:
                    if not self._pump(deadline, hello=conn):
                        break
            if conn.greeted or conn.generation != generation:
                continue
            conn.check(busy=False)
            within = "" if timeout is None else f" within {_seconds(timeout)} s"
            if not conn.connected:
                raise ServerStartError(
                    f"could not reach a frame server at {conn.endpoint}{within} (is it running, and is the endpoint right?)"
                )
            raise ServerStartError(f"the frame server at {conn.endpoint} did not answer{within}")

    def _request(self, conn: _Connection, message: protocol.Message, deadline: Optional[float]) -> None:
        """Send ``message`` (greeting first if this connection is new), by ``deadline``."""
        conn.check(busy=False)
        if not conn.greeted:
            self._greet(conn, deadline, None if deadline is None else max(0.0, deadline - time.monotonic()))
        if isinstance(message, protocol.Request):
            count, limit = protocol.selection_count(message.frame_idxs), conn.max_request_frames
            if count is not None and limit is not None and count > limit:  # the server would drop a message this big
                raise ServerError(f"request for {count} frames exceeds the limit of {limit} of the server at {conn.endpoint}")
            message = attrs.evolve(message, shm=self.shared_memory and conn.shm_pid is not None)
            conn.send_released(deadline)
        if not conn.send(message, deadline):
            raise RequestTimeoutError(f"could not send to the frame server at {conn.endpoint} in time")

    def _await_reply(self, rid: int, deadline: Optional[float], timeout: Optional[float]) -> Any:
        while rid not in self._replies:
            if not self._pump(deadline):
                raise RequestTimeoutError(f"the frame server did not answer within {timeout:g} s")
        return self._replies.pop(rid)

    def _busy(self, conn: _Connection) -> bool:
        stream = self._stream
        return bool(self._awaiting) or (stream is not None and not stream.done and conn in stream.conns)

    def _pump(self, deadline: Optional[float], hello: Optional[_Connection] = None) -> bool:
        """Receive what is waiting (up to ``deadline``) and file it where it belongs. False on timeout."""
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            wait = _SLICE_S if remaining is None else max(0.0, min(_SLICE_S, remaining))
            ready = poll_any([conn.socket for conn in self._conns], int(wait * 1000))
            if ready:
                for conn in self._conns:
                    if conn.socket in ready:
                        self._file(conn, *conn.socket.recv())
                return True
            for conn in self._conns:
                try:
                    conn.check(busy=conn is hello or self._busy(conn))
                except ServerDiedError as exc:
                    self.cancel(reason=f"was lost with its server ({exc})")  # the next one starts afresh
                    raise
            if remaining is not None and remaining <= wait:
                return False

    def _file(self, conn: _Connection, message: protocol.Message, payload: Optional[memoryview]) -> None:
        stream = self._stream
        if isinstance(message, (protocol.Chunk, protocol.Error)) and stream is not None and message.request_id == stream.request_id:
            if conn in stream.conns:
                conn.inbox.append((message, payload))
            else:
                conn.drop(message)
        elif isinstance(message, protocol.Chunk):
            conn.drop(message)  # of a request we cancelled
        elif isinstance(message, protocol.Welcome):
            conn.welcome(message)
        elif isinstance(message, (protocol.InfoReply, protocol.Pong)) or (
            isinstance(message, protocol.Error) and message.request_id is not None
        ):
            if message.request_id in self._awaiting:
                self._replies[message.request_id] = message
        elif isinstance(message, protocol.Error):
            raise error_from_wire(message.error, message.message)
        elif isinstance(message, protocol.Shutdown):
            busy = self._busy(conn)
            conn.reset()  # that server is going away: nothing of this connection may reach the next one
            if busy:
                self.cancel(reason="ended when its server shut down")
                raise ServerShutdownError(f"the frame server at {conn.endpoint} shut down: {message.reason}")
        # Anything else (probes, chunks of cancelled requests) needs no action.

    def _take(
        self, stream: _Stream, conn: _Connection, message: protocol.Message, payload: Optional[memoryview], deadline: Optional[float]
    ) -> Optional[FrameChunk]:
        if isinstance(message, protocol.Error):
            self.cancel(reason=f"failed ({message.error}: {message.message})")
            raise error_from_wire(message.error, message.message)
        assert isinstance(message, protocol.Chunk)
        try:
            _check_chunk(stream, conn, message)
            frames = self._frames_of(conn, message, payload)
        except AsyncFramesError as exc:
            if self._stream is stream:
                self.cancel(reason=f"failed ({type(exc).__name__}: {exc})")
            raise
        stream.next_chunk += 1
        conn.chunks_received += 1
        if stream.total_chunks is None:
            stream.done = message.last_chunk
        else:
            stream.done = stream.next_chunk >= stream.total_chunks
        if not message.last_chunk:
            conn.send_released(_at_least(deadline))
            if not conn.send(protocol.Credit(request_id=stream.request_id, chunks=1), _at_least(deadline)):
                raise RequestTimeoutError(f"could not send to the frame server at {conn.endpoint} in time")
        if not message.frame_idxs:
            return None
        if stream.frame_shape is None:
            stream.frame_shape = tuple(message.shape[1:])
        return FrameChunk(list(message.frame_idxs), frames)

    def _frames_of(self, conn: _Connection, message: protocol.Chunk, payload: Optional[memoryview]) -> np.ndarray:
        """The chunk's frames: a view of its shared slot, or of the received payload."""
        where = message.shm
        if where is None:
            return protocol.chunk_array(message, payload)
        conn.slots.forget(where.retired)
        dtype, nbytes = protocol.chunk_layout(message)
        if conn.shm_pid is None or payload is not None or nbytes > where.size:
            raise ProtocolError(f"{conn.endpoint} sent a shared-memory chunk that does not fit what was agreed")
        try:
            return conn.slots.array(conn.shm_pid, where.fd, where.slot, where.size, tuple(message.shape), dtype.str)
        except (OSError, ValueError) as exc:
            self.cancel(reason="was lost with its server")
            raise self._why_shm_failed(conn, conn.shm_pid, exc) from exc

    def _why_shm_failed(self, conn: _Connection, pid: int, exc: BaseException) -> ServerDiedError:
        """A slot could not be mapped: find out (within a second or two) whether the server shut down or died."""
        deadline = time.monotonic() + _EXPLAIN_S
        while True:
            try:
                conn._check_process()  # our own server: how it ended
                while conn.socket.has_message():
                    message, _payload = conn.socket.recv()
                    if isinstance(message, protocol.Shutdown):
                        conn.reset()
                        return ServerShutdownError(f"the frame server at {conn.endpoint} shut down: {message.reason}")
                    conn.drop(message)
                conn.check(busy=True)
            except ServerDiedError as died:
                return died
            except AsyncFramesError:
                pass
            if not shm.process_alive(pid):
                if conn.process is not None:  # our own server: its exit status says how it ended
                    try:
                        conn._wait_for_exit()
                    except ServerDiedError as died:
                        return died
                conn.reset()
                return ServerDiedError(
                    f"lost the connection to the frame server at {conn.endpoint}: its process (pid {pid}) is gone"
                )
            if time.monotonic() >= deadline:
                return ServerDiedError(f"cannot map the shared memory of the frame server at {conn.endpoint}: {exc}")
            time.sleep(0.02)


#: How long a failed shared-memory mapping waits to learn whether the server shut down or died.
_EXPLAIN_S = 2.0

#: Connections of AsyncVideos closed in a forked child: kept, untouched, because they belong to the parent.
_FORKED_LEFTOVERS: list[_Connection] = []

_ENDPOINT = re.compile(r"^(?:tcp://(?:\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})|ipc://\S.*)$")
_ENDPOINT_FORMS = "tcp://host:port (e.g. tcp://127.0.0.1:9010) or ipc://path"


def _check_endpoints(endpoint: Union[str, Sequence[str]]) -> list[str]:
    """The endpoints as a list, each checked to be ``tcp://host:port`` or ``ipc://path``."""
    endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint) if isinstance(endpoint, Sequence) else None
    if endpoints is None:
        raise TypeError(f"endpoint must be a string or a list of strings ({_ENDPOINT_FORMS}), got {type(endpoint).__name__}")
    if not endpoints:
        raise ValueError(f"no endpoint given: pass one or more of {_ENDPOINT_FORMS}, or None for a private server")
    for e in endpoints:
        if not isinstance(e, str):
            raise TypeError(f"an endpoint must be a string ({_ENDPOINT_FORMS}), got {type(e).__name__} {e!r}")
        match = _ENDPOINT.match(e)
        if match is None or (match["port"] is not None and not 1 <= int(match["port"]) <= 65535):
            hint = f"; did you mean 'tcp://{e}'?" if "://" not in e and ":" in e else ""
            raise ServerStartError(f"{e!r} is not a frame server endpoint: use {_ENDPOINT_FORMS}{hint}")
    return endpoints


def _open_socket(endpoint: str, curve: Optional[ClientCurve]) -> ClientSocket:
    """A client socket connected to ``endpoint``; a refused endpoint is a ServerStartError."""
    try:
        return ClientSocket(endpoint, curve)
    except zmq.ZMQError as exc:
        raise ServerStartError(f"cannot connect to {endpoint!r} ({exc}): use {_ENDPOINT_FORMS}") from exc


def _check_workers(workers: Any) -> None:
    if workers is None:
        return
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive number of decoder threads, or None for one per 2 CPUs; got {workers!r}")


def _check_chunk(stream: _Stream, conn: _Connection, message: protocol.Chunk) -> None:
    """Raise ProtocolError unless ``message`` is the chunk we asked for next: its number, indices, dtype and shape."""
    n = len(stream.conns)
    k = stream.next_chunk
    where = f"{conn.endpoint} (request {stream.request_id}, chunk {k})"
    if message.chunk != k // n:
        raise ProtocolError(f"expected chunk {k // n} from {conn.endpoint}, it sent chunk {message.chunk}")
    got = list(message.frame_idxs)
    expected = stream.expected_idxs(k, len(got))
    if got != expected:
        raise ProtocolError(f"{where} sent frames {_short(got)}, we asked for {_short(expected or [])}")
    fpc = stream.frames_per_chunk
    if stream.idxs is None:
        if len(got) > fpc or (not message.last_chunk and len(got) != fpc) or (not got and k > 0):
            raise ProtocolError(f"{where} sent {len(got)} frames in a chunk of {fpc} (last_chunk={message.last_chunk})")
    elif stream.total_chunks is None:
        last = k >= max(1, -(-len(stream.idxs) // fpc)) - 1
        if message.last_chunk != last:
            raise ProtocolError(f"{where} says last_chunk={message.last_chunk}, but it is chunk {k} of {-(-len(stream.idxs) // fpc)}")
    if message.dtype != np.dtype(np.uint8).str:
        raise ProtocolError(f"{where} sent frames of dtype {message.dtype!r}, expected uint8 ('|u1')")
    shape = tuple(message.shape)
    if len(shape) != 4 or shape[0] != len(got):
        raise ProtocolError(f"{where} sent shape {list(shape)}, expected ({len(got)}, height, width, channels)")
    if not got:
        return
    channels = {None: (1, 3), True: (1,), False: (3,)}[stream.spec.grayscale if stream.spec is not None else None]
    if shape[3] not in channels or min(shape[1:3]) < 1:
        raise ProtocolError(f"{where} sent frames of shape {list(shape[1:])}, expected (height, width, {' or '.join(map(str, channels))})")
    if stream.frame_shape is not None and shape[1:] != stream.frame_shape:
        raise ProtocolError(f"{where} sent frames of shape {list(shape[1:])}, earlier chunks had {list(stream.frame_shape)}")


def _short(idxs: Sequence[int], most: int = 8) -> str:
    return str(list(idxs)) if len(idxs) <= most else f"[{', '.join(map(str, idxs[:most]))}, ... ({len(idxs)} indices)]"


def _at_least(deadline: Optional[float], slack: float = 1.0) -> Optional[float]:
    """A deadline for a message the protocol needs (a credit): the caller's, but never less than ``slack`` from now."""
    return None if deadline is None else max(deadline, time.monotonic() + slack)


def _seconds(t: float) -> str:
    """``t`` for a message: 3, 30, 0.5 (never 2.99846)."""
    return f"{t:.1f}".rstrip("0").rstrip(".")


def _server_options(workers: Optional[int]) -> list[str]:
    return ["--workers", str(int(workers))] if workers else []


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        pass


__all__ = ["AsyncVideo", "FrameChunk", "normalize_frame_idxs"]
