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
    """One server: its socket, whether it greeted us, and whether it is still there."""

    def __init__(self, endpoint: str, curve: Optional[ClientCurve], process: Optional[ServerProcess] = None) -> None:
        self.endpoint = endpoint
        self.process = process
        self.socket = ClientSocket(endpoint, curve)
        self.curve = curve is not None
        self.greeted = False
        self.connected = False  # a ZMTP handshake has succeeded at least once
        self.server_version = ""
        self.inbox: deque = deque()  # (message, payload) of the current stream, in arrival order
        self.chunks_received = 0
        self.shm_pid: Optional[int] = None  # the server's pid when we reach its shared memory
        self.max_request_frames: Optional[int] = None  # the server's limit, from its welcome
        self.slots = shm.ClientSlots()

    def welcome(self, message: protocol.Welcome) -> None:
        """The server greeted us: note its version and whether its shared memory is in reach."""
        self.greeted, self.server_version = True, message.server
        self.max_request_frames = message.max_request_frames
        probe = message.shm
        reachable = probe is not None and shm.can_reach(probe.pid, probe.fd, probe.token)
        self.shm_pid = probe.pid if reachable and probe is not None else None
        self.slots = shm.ClientSlots()  # slot numbers are per server process

    def drop(self, message: protocol.Message) -> None:
        """A chunk nobody will look at: hand its shared slot straight back."""
        if isinstance(message, protocol.Chunk) and message.shm is not None:
            self.slots.forget(message.shm.retired)
            self.slots.discard(message.shm.slot)

    def send_released(self) -> None:
        """Tell the server which shared slots the caller has let go of since we last said."""
        freed = self.slots.take_freed()
        if freed:
            self.socket.send(protocol.Release(slots=freed))

    def check(self, busy: bool) -> None:
        """Raise if the server is gone (``busy``: something is outstanding on this connection)."""
        self._check_process()
        for event in self.socket.events():
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise AuthenticationError(f"the frame server at {self.endpoint} refused our CURVE credentials")
            if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                raise AuthenticationError(
                    f"the handshake with {self.endpoint} failed: its security settings differ from ours "
                    "(CURVE required on one side only, or not a frame server?)"
                )
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.greeted = False
                if busy and self.connected:
                    if self.process is not None:
                        self._wait_for_exit()
                    raise ServerDiedError(f"lost the connection to the frame server at {self.endpoint}")

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


@attrs.define
class _Stream:
    """A request in flight, dealt over ``conns``: global chunk k comes from ``conns[k % n]``."""

    request_id: int
    conns: list[_Connection]
    total_chunks: Optional[int]  # None: a single server decides (every frame of the video)
    next_chunk: int = 0
    done: bool = False


class AsyncVideo:
    """Frames from background frame servers, chunk by chunk.

    ``endpoint``: None starts a private server process that lives as long as this
    object; a string (or several) connects to running servers (``asyncframes serve``).
    ``timeout`` bounds every wait (None: wait as long as the server lives).
    ``curve_secret``/``curve_server_key``: this client's ``.key_secret`` file and
    the server's ``.key`` file, for servers that require CURVE authentication.
    ``workers``: decoder threads of a private server (None: one per 2 CPUs).
    ``shared_memory``: take frames through shared memory when the server is on
    this machine (no copy at all); False always receives them inline.
    Not thread-safe: use one AsyncVideo per thread.
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
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if (curve_secret is None) != (curve_server_key is None):
            raise ValueError("CURVE needs both curve_secret (ours) and curve_server_key (the server's)")
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.prefetch = prefetch
        self._ids = itertools.count(1)
        self._stream: Optional[_Stream] = None
        self._replies: dict[int, Any] = {}
        self.shared_memory = shared_memory
        self._awaiting: set[int] = set()
        curve = ClientCurve.load(curve_secret, curve_server_key) if curve_secret and curve_server_key else None
        self._closed = False
        try:
            if endpoint is None:
                options = _server_options(workers)
                process = take_prestarted(server_log_level, options, start_timeout) or ServerProcess(
                    start_timeout=start_timeout, log_level=server_log_level, options=options
                )
                self._conns.append(_Connection(process.endpoint, None, process))
            else:
                endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
                if not endpoints:
                    raise ValueError("no endpoint given")
                self._conns.extend(_Connection(e, curve) for e in endpoints)
            for conn in self._conns:
                self._greet(conn)
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
        self.cancel()
        rid = next(self._ids)
        if len(self._conns) == 1:
            self._stream = _Stream(rid, self._conns[:1], total_chunks=None)
            try:
                self._request(self._conns[0], protocol.Request(rid, spec, protocol.frame_selection(idxs), fpc, self.prefetch))
            except ServerError:  # over the server's limit: nothing was sent
                self._stream = None
                raise
            return
        if idxs is None:
            idxs = range(self.info(spec).frame_count)
        chunks = [idxs[k : k + fpc] for k in range(0, len(idxs), fpc)]
        conns = self._conns[: max(1, min(len(self._conns), len(chunks)))]
        self._stream = _Stream(rid, conns, total_chunks=len(chunks), done=not chunks)
        for j, conn in enumerate(conns):
            share = [np.asarray(chunk) for chunk in chunks[j :: len(conns)]]
            if share:
                self._request(conn, protocol.Request(rid, spec, protocol.frame_selection(np.concatenate(share)), fpc, self.prefetch))

    @property
    def done(self) -> bool:
        """True when there is no request or its last chunk has been taken."""
        return self._stream is None or self._stream.done

    @property
    def chunks(self) -> Iterator[FrameChunk]:
        """Yield ``(frame_idxs, frames)`` for every chunk of the current request, in order."""
        stream = self._stream
        while stream is not None and stream is self._stream and not stream.done:
            chunk = self.next_chunk(timeout=self.timeout)
            if chunk is None:
                if stream.done or stream is not self._stream:
                    return
                raise RequestTimeoutError(
                    f"no chunk arrived within {self.timeout:g} s (request {stream.request_id}, chunk {stream.next_chunk})"
                )
            yield chunk

    def next_chunk(self, timeout: Optional[float] = _DEFAULT) -> Optional[FrameChunk]:
        """The next chunk if one arrives within ``timeout`` seconds (0: only if ready now), else None.

        Raises the request's error (e.g. :class:`FrameIndexError`) if a server reported one.
        """
        self._check_open()
        timeout = self.timeout if timeout is _DEFAULT else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            stream = self._stream
            if stream is None or stream.done:
                return None
            conn = stream.conns[stream.next_chunk % len(stream.conns)]
            if conn.inbox:
                chunk = self._take(stream, conn, *conn.inbox.popleft())
                if chunk is not None:
                    return chunk
                continue
            if not self._pump(deadline):
                return None

    def cancel(self) -> None:
        """Abandon the current request; chunks still in flight are discarded."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        for conn in stream.conns:
            for message, _payload in conn.inbox:
                conn.drop(message)
            conn.inbox.clear()
            if not stream.done and not self._closed:
                _quietly(conn.socket.send, protocol.Cancel(request_id=stream.request_id))
            if not self._closed:
                _quietly(conn.send_released)

    def info(self, video: VideoLike, timeout: Optional[float] = _DEFAULT) -> VideoInfo:
        """Metadata of ``video`` as the server sees it (frame count, size, channels, fps, codec)."""
        self._check_open()
        rid = next(self._ids)
        self._request(self._conns[0], protocol.InfoRequest(request_id=rid, video=self._spec(video)))
        reply = self._await_reply(rid, timeout)
        if isinstance(reply, protocol.Error):
            raise error_from_wire(reply.error, reply.message)
        assert isinstance(reply, protocol.InfoReply)
        return reply.info

    def ping(self, timeout: Optional[float] = _DEFAULT) -> float:
        """Round-trip time to the (first) server in seconds."""
        self._check_open()
        rid = next(self._ids)
        start = time.perf_counter()
        self._request(self._conns[0], protocol.Ping(request_id=rid))
        self._await_reply(rid, timeout)
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
        """Cancel any request, stop a private server, release the sockets. Safe to call twice."""
        conns = getattr(self, "_conns", [])
        if not conns:
            self._closed = True
            return
        try:
            if not getattr(self, "_closed", True):
                self.cancel()
                for conn in conns:
                    if conn.process is not None:
                        _quietly(conn.socket.send, protocol.Stop())
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
        if self._closed:
            raise AsyncFramesError("this AsyncVideo is closed")

    def _greet(self, conn: _Connection) -> None:
        """Handshake (again, after a reconnect) so the server knows our protocol version."""
        conn.socket.send(protocol.Hello(version=protocol.PROTOCOL_VERSION, client=f"asyncframes pid={os.getpid()}"))
        deadline = time.monotonic() + self.start_timeout
        while not conn.greeted:
            if not self._pump(deadline, hello=conn):
                conn.check(busy=False)
                if not conn.connected:
                    raise ServerStartError(
                        f"could not reach a frame server at {conn.endpoint} within {self.start_timeout:g} s "
                        "(is it running, and is the endpoint right?)"
                    )
                raise ServerStartError(f"the frame server at {conn.endpoint} did not answer within {self.start_timeout:g} s")

    def _request(self, conn: _Connection, message: protocol.Message) -> None:
        conn.check(busy=False)
        if not conn.greeted:
            self._greet(conn)
        if isinstance(message, (protocol.InfoRequest, protocol.Ping)):
            self._awaiting.add(message.request_id)
        if isinstance(message, protocol.Request):
            count, limit = protocol.selection_count(message.frame_idxs), conn.max_request_frames
            if count is not None and limit is not None and count > limit:  # the server would drop a message this big
                raise ServerError(f"request for {count} frames exceeds the limit of {limit} of the server at {conn.endpoint}")
            message = attrs.evolve(message, shm=self.shared_memory and conn.shm_pid is not None)
            conn.send_released()
        conn.socket.send(message)

    def _await_reply(self, rid: int, timeout: Optional[float]) -> Any:
        timeout = self.timeout if timeout is _DEFAULT else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while rid not in self._replies:
                if not self._pump(deadline):
                    raise RequestTimeoutError(f"the frame server did not answer within {timeout:g} s")
            return self._replies.pop(rid)
        finally:
            self._awaiting.discard(rid)

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
                except ServerDiedError:
                    self.cancel()  # that request is over; the next one starts afresh
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
            conn.greeted = False
            if self._busy(conn):
                self.cancel()
                raise ServerShutdownError(f"the frame server at {conn.endpoint} shut down: {message.reason}")
        # Anything else (probes, chunks of cancelled requests) needs no action.

    def _take(self, stream: _Stream, conn: _Connection, message: protocol.Message, payload: Optional[memoryview]) -> Optional[FrameChunk]:
        if isinstance(message, protocol.Error):
            self.cancel()
            raise error_from_wire(message.error, message.message)
        assert isinstance(message, protocol.Chunk)
        n = len(stream.conns)
        expected = stream.next_chunk // n
        if message.chunk != expected:
            self.cancel()
            raise ProtocolError(f"expected chunk {expected} from {conn.endpoint}, it sent chunk {message.chunk}")
        frames = self._frames_of(conn, message, payload)
        stream.next_chunk += 1
        conn.chunks_received += 1
        if stream.total_chunks is None:
            stream.done = message.last_chunk
        else:
            stream.done = stream.next_chunk >= stream.total_chunks
        if not message.last_chunk:
            conn.send_released()
            conn.socket.send(protocol.Credit(request_id=stream.request_id, chunks=1))
        if not message.frame_idxs:
            return None
        return FrameChunk(list(message.frame_idxs), frames)

    def _frames_of(self, conn: _Connection, message: protocol.Chunk, payload: Optional[memoryview]) -> np.ndarray:
        """The chunk's frames: a view of its shared slot, or of the received payload."""
        where = message.shm
        if where is None:
            return protocol.chunk_array(message, payload)
        conn.slots.forget(where.retired)
        dtype, nbytes = protocol.chunk_layout(message)
        if conn.shm_pid is None or payload is not None or nbytes > where.size:
            self.cancel()
            raise ProtocolError(f"{conn.endpoint} sent a shared-memory chunk that does not fit what was agreed")
        try:
            return conn.slots.array(conn.shm_pid, where.fd, where.slot, where.size, tuple(message.shape), dtype.str)
        except (OSError, ValueError) as exc:
            self.cancel()
            if conn.process is not None:
                conn._wait_for_exit()  # our own server: say how it ended
            if not shm.process_alive(conn.shm_pid):
                raise ServerDiedError(
                    f"lost the connection to the frame server at {conn.endpoint}: its process (pid {conn.shm_pid}) is gone"
                ) from exc
            raise ServerDiedError(f"cannot map the shared memory of the frame server at {conn.endpoint}: {exc}") from exc


def _server_options(workers: Optional[int]) -> list[str]:
    return ["--workers", str(workers)] if workers else []


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        pass


__all__ = ["AsyncVideo", "FrameChunk", "normalize_frame_idxs"]
