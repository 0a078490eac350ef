"""``AsyncVideo``: ask a frame server for frames and receive them chunk by chunk.

The client never blocks without a bound: every wait polls in short slices and
checks that the server is still alive, so a dead server is reported as
:class:`ServerDiedError` within a fraction of a second (private servers) and
a silent one as :class:`RequestTimeoutError` after ``timeout`` seconds.
Flow control is by credit: the server keeps at most ``prefetch`` chunks
ahead of what the caller has taken, so memory stays bounded however long the
request.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import attrs
import numpy as np

from . import protocol
from .errors import (
    AsyncFramesError,
    FrameIndexError,
    ProtocolError,
    RequestTimeoutError,
    ServerDiedError,
    ServerError,
    ServerStartError,
    error_from_wire,
)
from .process import ServerProcess
from .protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Credit,
    Error,
    Hello,
    InfoReply,
    InfoRequest,
    Ping,
    Pong,
    Request,
    Shutdown,
    Stop,
    Welcome,
)
from .transport import ClientSocket
from .video import Video, VideoInfo, as_video

VideoLike = Union[Video, str, "os.PathLike[str]"]
FrameIdxs = Optional[Union[Sequence[int], range, np.ndarray, Iterable[int]]]

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


@attrs.define
class _Stream:
    request_id: int
    next_chunk: int = 0
    done: bool = False
    inbox: deque = attrs.field(factory=deque)


def normalize_frame_idxs(frame_idxs: FrameIdxs) -> Optional[list[int]]:
    """Frame indices as a list of Python ints (None stays None: every frame)."""
    if frame_idxs is None:
        return None
    if isinstance(frame_idxs, range):
        idxs = list(frame_idxs)
    else:
        if not isinstance(frame_idxs, (np.ndarray, Sequence)):
            if isinstance(frame_idxs, (int, np.integer)) or not isinstance(frame_idxs, Iterable):
                raise TypeError(f"frame_idxs must be a sequence of ints, got {type(frame_idxs).__name__}")
            frame_idxs = list(frame_idxs)
        arr = np.asarray(frame_idxs)
        if arr.size == 0:
            return []
        if arr.ndim != 1:
            raise TypeError(f"frame_idxs must be one-dimensional, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"frame indices must be integers, got {arr.dtype}")
        idxs = arr.tolist()
    for i in idxs:
        if i < 0:
            raise FrameIndexError(f"frame index {i} is negative; frames are numbered from 0")
    return idxs


class AsyncVideo:
    """Frames from a background frame server, chunk by chunk.

    With no ``endpoint`` a private server process is started and stopped with
    this object; with one, a running server (``asyncframes serve``) is used.
    ``timeout`` bounds every wait (``None``: wait as long as the server lives).
    Not thread-safe: use one AsyncVideo per thread.
    """

    def __init__(
        self,
        endpoint: Optional[str] = None,
        *,
        timeout: Optional[float] = 30.0,
        start_timeout: float = 30.0,
        prefetch: int = 2,
        server_log_level: str = "WARNING",
    ) -> None:
        self._closed = True  # until fully open, so __del__ of a half-made object is harmless
        self._server: Optional[ServerProcess] = None
        self._socket: Optional[ClientSocket] = None
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.timeout = timeout
        self.prefetch = prefetch
        self._ids = itertools.count(1)
        self._stream: Optional[_Stream] = None
        self._replies: dict[int, Any] = {}
        self.server_version = ""
        if endpoint is None:
            self._server = ServerProcess(start_timeout=start_timeout, log_level=server_log_level)
            endpoint = self._server.endpoint
        self.endpoint = endpoint
        self._closed = False
        try:
            self._socket = ClientSocket([endpoint])
            self._handshake(start_timeout)
        except BaseException:
            self.close()
            raise

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
        self.cancel()
        rid = next(self._ids)
        self._send(
            Request(request_id=rid, video=spec, frame_idxs=idxs, frames_per_chunk=int(frames_per_chunk), window=self.prefetch)
        )
        self._stream = _Stream(request_id=rid)

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

        Raises the request's error (e.g. :class:`FrameIndexError`) if the server reported one.
        """
        self._check_open()
        timeout = self.timeout if timeout is _DEFAULT else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            stream = self._stream
            if stream is None or stream.done:
                return None
            while stream.inbox:
                chunk = self._take(stream, *stream.inbox.popleft())
                if chunk is not None:
                    return chunk
                if stream.done:
                    return None
            if not self._pump(deadline):
                return None

    def cancel(self) -> None:
        """Abandon the current request; chunks still in flight are discarded."""
        stream, self._stream = self._stream, None
        if stream is not None and not stream.done and not self._closed:
            self._send(Cancel(request_id=stream.request_id))

    def info(self, video: VideoLike, timeout: Optional[float] = _DEFAULT) -> VideoInfo:
        """Metadata of ``video`` as the server sees it (frame count, size, channels, fps, codec)."""
        self._check_open()
        rid = next(self._ids)
        self._send(InfoRequest(request_id=rid, video=self._spec(video)))
        reply = self._await_reply(rid, timeout)
        if isinstance(reply, Error):
            raise error_from_wire(reply.error, reply.message)
        assert isinstance(reply, InfoReply)
        return reply.info

    def ping(self, timeout: Optional[float] = _DEFAULT) -> float:
        """Round-trip time to the server in seconds."""
        self._check_open()
        rid = next(self._ids)
        start = time.perf_counter()
        self._send(Ping(request_id=rid))
        self._await_reply(rid, timeout)
        return time.perf_counter() - start

    # -- lifetime ----------------------------------------------------------------

    @property
    def server_pid(self) -> Optional[int]:
        """Process id of the private server, if this client owns one."""
        return self._server.pid if self._server is not None else None

    def close(self) -> None:
        """Cancel any request, stop a private server, release the socket. Safe to call twice."""
        if getattr(self, "_closed", True) and getattr(self, "_socket", None) is None and getattr(self, "_server", None) is None:
            return
        self._closed = True
        socket, self._socket = getattr(self, "_socket", None), None
        server, self._server = getattr(self, "_server", None), None
        try:
            if socket is not None:
                stream = getattr(self, "_stream", None)
                if stream is not None and not stream.done:
                    _quietly(socket.send, Cancel(request_id=stream.request_id))
                if server is not None:
                    _quietly(socket.send, Stop())
                socket.close()
        finally:
            self._stream = None
            if server is not None:
                server.stop()

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
        if self._server is not None and "://" not in spec.filename:
            # Our own server shares our filesystem; make the path independent of its cwd.
            spec = attrs.evolve(spec, filename=os.path.abspath(spec.filename))
        return spec

    def _check_open(self) -> None:
        if self._closed:
            raise AsyncFramesError("this AsyncVideo is closed")

    def _send(self, message: protocol.Message) -> None:
        assert self._socket is not None
        self._socket.send(message)

    def _handshake(self, timeout: float) -> None:
        self._send(Hello(version=PROTOCOL_VERSION, client=f"asyncframes-client pid={os.getpid()}"))
        deadline = time.monotonic() + timeout
        while True:
            received = self._receive(deadline)
            if received is None:
                raise ServerStartError(f"no answer from the frame server at {self.endpoint} within {timeout:g} s")
            message, _ = received
            if isinstance(message, Welcome):
                self.server_version = message.server
                return
            if isinstance(message, Error):
                raise error_from_wire(message.error, message.message)

    def _await_reply(self, rid: int, timeout: Optional[float]) -> Any:
        timeout = self.timeout if timeout is _DEFAULT else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while rid not in self._replies:
            if not self._pump(deadline):
                raise RequestTimeoutError(f"the frame server did not answer within {timeout:g} s")
        return self._replies.pop(rid)

    def _receive(self, deadline: Optional[float]) -> Optional[tuple[protocol.Message, Optional[memoryview]]]:
        """One message, or None once ``deadline`` passes; raises ServerDiedError if the server is gone."""
        assert self._socket is not None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            wait = _SLICE_S if remaining is None else max(0.0, min(_SLICE_S, remaining))
            if self._socket.poll(int(wait * 1000)):
                return self._socket.recv()
            self._check_server()
            if remaining is not None and remaining <= wait:
                return None

    def _check_server(self) -> None:
        if self._server is None:
            return
        code = self._server.exit_code()
        if code is not None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            self._stream = None
            raise ServerDiedError(f"the frame server (pid {self._server.pid}) {how}")

    def _pump(self, deadline: Optional[float]) -> bool:
        """Receive one message and file it where it belongs. False on timeout."""
        received = self._receive(deadline)
        if received is None:
            return False
        message, payload = received
        stream = self._stream
        if isinstance(message, (Chunk, Error)) and stream is not None and message.request_id == stream.request_id:
            stream.inbox.append((message, payload))
        elif isinstance(message, (InfoReply, Pong)) or (isinstance(message, Error) and message.request_id is not None):
            self._replies[message.request_id] = message
        elif isinstance(message, Error):
            raise error_from_wire(message.error, message.message)
        elif isinstance(message, Shutdown):
            self._stream = None
            raise ServerDiedError(f"the frame server shut down: {message.reason}")
        # Anything else (probes, chunks of cancelled requests) needs no action.
        return True

    def _take(self, stream: _Stream, message: protocol.Message, payload: Optional[memoryview]) -> Optional[FrameChunk]:
        if isinstance(message, Error):
            stream.done = True
            raise error_from_wire(message.error, message.message)
        assert isinstance(message, Chunk)
        if message.chunk != stream.next_chunk:
            stream.done = True
            raise ProtocolError(f"expected chunk {stream.next_chunk}, the server sent chunk {message.chunk}")
        frames = protocol.chunk_array(message, payload)
        stream.next_chunk += 1
        if message.last_chunk:
            stream.done = True
        else:
            self._send(Credit(request_id=stream.request_id, chunks=1))
        if not message.frame_idxs:
            return None
        return FrameChunk(list(message.frame_idxs), frames)


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        pass


__all__ = ["AsyncVideo", "FrameChunk", "normalize_frame_idxs", "ServerError"]
