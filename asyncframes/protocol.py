"""The wire protocol: message classes and how they become ZeroMQ frames.

A message is one ZeroMQ multipart message: a msgpack header (a map with a
``kind`` and the fields of one of the classes below, unstructured by cattrs),
optionally followed by one raw payload frame (the pixel buffer of a chunk,
sent zero-copy). Nothing is pickled. Headers are structured back into their
class and validated; anything malformed raises :class:`ProtocolError`.

See ``docs/protocol.md`` for the conversation between client and server.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import attrs
import msgpack
import numpy as np
from cattrs.errors import BaseValidationError

from .errors import ProtocolError
from .video import Video, VideoInfo, converter

#: Bumped on any incompatible change; checked in the hello/welcome handshake.
PROTOCOL_VERSION = 2

_v = attrs.validators
_int = _v.instance_of(int)
_nonneg = [_int, _v.ge(0)]
_positive = [_int, _v.ge(1)]
_idx_list = _v.deep_iterable(_int, _v.instance_of(list))


@attrs.frozen
class Hello:
    """Client → server, first message: which protocol the client speaks."""

    version: int = attrs.field(validator=_int)
    client: str = attrs.field(default="", validator=_v.instance_of(str))


@attrs.frozen
class ShmProbe:
    """Where a client on the same machine can prove it reaches the server's shared memory."""

    pid: int = attrs.field(validator=_positive)
    fd: int = attrs.field(validator=_nonneg)
    token: bytes = attrs.field(validator=_v.instance_of(bytes))


@attrs.frozen
class Welcome:
    """Server → client: handshake accepted; ``shm`` is offered by servers that can share memory."""

    version: int = attrs.field(validator=_int)
    server: str = attrs.field(validator=_v.instance_of(str))
    shm: Optional[ShmProbe] = None


@attrs.frozen
class Request:
    """Client → server: stream frames ``frame_idxs`` (None = all) in chunks.

    ``window`` is the number of chunks the server may send before the client
    returns :class:`Credit`; it bounds memory on both sides. ``shm``: the client
    reached the server's probe, so chunks may come in shared memory.
    """

    request_id: int = attrs.field(validator=_nonneg)
    video: Video
    frame_idxs: Optional[list[int]] = attrs.field(validator=_v.optional(_idx_list))
    frames_per_chunk: int = attrs.field(default=64, validator=_positive)
    window: int = attrs.field(default=2, validator=_positive)
    shm: bool = attrs.field(default=False, validator=_v.instance_of(bool))


@attrs.frozen
class ShmSlot:
    """Where a chunk's pixels are: slot ``slot``, the server's memfd ``fd`` of ``size`` bytes.

    ``retired``: slots the server has closed; the client drops its mappings of them.
    """

    slot: int = attrs.field(validator=_positive)
    fd: int = attrs.field(validator=_nonneg)
    size: int = attrs.field(validator=_positive)
    retired: list[int] = attrs.field(factory=list, validator=_idx_list)


@attrs.frozen
class Chunk:
    """Server → client: one chunk of frames; the payload frame (or a shared slot) holds the pixels."""

    request_id: int = attrs.field(validator=_nonneg)
    chunk: int = attrs.field(validator=_nonneg)
    last_chunk: bool = attrs.field(validator=_v.instance_of(bool))
    frame_idxs: list[int] = attrs.field(validator=_idx_list)
    dtype: str = attrs.field(validator=_v.instance_of(str))
    shape: list[int] = attrs.field(validator=_v.deep_iterable(_nonneg, _v.instance_of(list)))
    #: Set when the pixels are in shared memory instead of a payload frame.
    shm: Optional[ShmSlot] = None


@attrs.frozen
class Error:
    """Server → client: request ``request_id`` (None: the connection) failed.

    ``error`` is the name of an :mod:`asyncframes.errors` class.
    """

    request_id: Optional[int] = attrs.field(validator=_v.optional(_int))
    error: str = attrs.field(validator=_v.instance_of(str))
    message: str = attrs.field(validator=_v.instance_of(str))


@attrs.frozen
class Cancel:
    """Client → server: stop request ``request_id``; no more chunks will follow it."""

    request_id: int = attrs.field(validator=_nonneg)


@attrs.frozen
class Credit:
    """Client → server: the client consumed ``chunks`` chunks of ``request_id``."""

    request_id: int = attrs.field(validator=_nonneg)
    chunks: int = attrs.field(default=1, validator=_positive)


@attrs.frozen
class Release:
    """Client → server: the caller no longer holds the chunks in these shared slots."""

    slots: list[int] = attrs.field(validator=_idx_list)


@attrs.frozen
class InfoRequest:
    """Client → server: describe ``video``."""

    request_id: int = attrs.field(validator=_nonneg)
    video: Video


@attrs.frozen
class InfoReply:
    """Server → client: what ``video`` holds."""

    request_id: int = attrs.field(validator=_nonneg)
    info: VideoInfo


@attrs.frozen
class Ping:
    """Either way: are you there? Answered with :class:`Pong`."""

    request_id: int = attrs.field(default=0, validator=_nonneg)


@attrs.frozen
class Pong:
    """Answer to :class:`Ping`, with the server's version."""

    request_id: int = attrs.field(default=0, validator=_nonneg)
    server: str = attrs.field(default="", validator=_v.instance_of(str))


@attrs.frozen
class Stop:
    """Client → server: shut down (honoured only by servers that allow it)."""


@attrs.frozen
class Shutdown:
    """Server → client: the server is going away; outstanding requests are over."""

    reason: str = attrs.field(default="", validator=_v.instance_of(str))


Message = Union[
    Hello, Welcome, Request, Chunk, Error, Cancel, Credit, Release, InfoRequest, InfoReply, Ping, Pong, Stop, Shutdown
]

KINDS: dict[str, type] = {
    "hello": Hello,
    "welcome": Welcome,
    "request": Request,
    "chunk": Chunk,
    "error": Error,
    "cancel": Cancel,
    "credit": Credit,
    "release": Release,
    "info": InfoRequest,
    "info_reply": InfoReply,
    "ping": Ping,
    "pong": Pong,
    "stop": Stop,
    "shutdown": Shutdown,
}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}


def _strict(accepts: tuple[type, ...], what: str, then: Any = None) -> Any:
    """A structure hook that takes only ``accepts`` (never a bool posing as a number).

    cattrs would turn "3" or 3.7 into an int; on the wire that is a protocol error.
    """

    def hook(value: Any, _type: type) -> Any:
        if not isinstance(value, accepts) or (isinstance(value, bool) and bool not in accepts):
            raise TypeError(f"expected {what}, got {type(value).__name__}")
        return value if then is None else then(value)

    return hook


converter.register_structure_hook(int, _strict((int,), "an integer"))
converter.register_structure_hook(str, _strict((str,), "a string"))
converter.register_structure_hook(float, _strict((int, float), "a number", float))
converter.register_structure_hook(bool, _strict((bool,), "a boolean"))
converter.register_structure_hook(bytes, _strict((bytes,), "bytes"))


def encode(message: Message) -> bytes:
    """The msgpack header of ``message``."""
    body = converter.unstructure(message)
    assert "kind" not in body, "'kind' is reserved for the message type"
    body["kind"] = _KIND_OF[type(message)]
    return msgpack.packb(body, use_bin_type=True)


def decode(header: bytes) -> Message:
    """Parse and validate a header; raise :class:`ProtocolError` if it is not one of ours."""
    try:
        body = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not msgpack ({exc})") from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"header is a {type(body).__name__}, expected a map")
    kind = body.pop("kind", None)
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    try:
        return converter.structure(body, cls)
    except (BaseValidationError, TypeError, ValueError, KeyError) as exc:
        raise ProtocolError(f"invalid {kind} message: {_describe(exc)}") from exc


def frames_of(message: Message, payload: Any = None) -> list[Any]:
    """The multipart frames for ``message`` and its optional payload buffer."""
    return [encode(message)] if payload is None else [encode(message), payload]


def parse(frames: Sequence[Any]) -> tuple[Message, Optional[memoryview]]:
    """Message and payload from received frames (bytes or zmq.Frame)."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"expected 1 or 2 frames, got {len(frames)}")
    header = frames[0].bytes if hasattr(frames[0], "bytes") else frames[0]
    payload = None
    if len(frames) == 2:
        payload = frames[1].buffer if hasattr(frames[1], "buffer") else memoryview(frames[1])
    return decode(header), payload


def chunk_header(
    request_id: int, chunk: int, last_chunk: bool, frame_idxs: Sequence[int], frames: np.ndarray, shm: Optional[ShmSlot] = None
) -> Chunk:
    """Describe ``frames`` for the wire."""
    return Chunk(
        request_id=request_id,
        chunk=chunk,
        last_chunk=last_chunk,
        frame_idxs=[int(i) for i in frame_idxs],
        dtype=frames.dtype.str,
        shape=list(frames.shape),
        shm=shm,
    )


def chunk_layout(chunk: Chunk) -> tuple[np.dtype, int]:
    """The dtype and byte size a chunk's header announces, checked for sense."""
    try:
        dtype = np.dtype(chunk.dtype)
    except TypeError as exc:
        raise ProtocolError(f"chunk has an unknown dtype {chunk.dtype!r}") from exc
    if dtype.hasobject:
        raise ProtocolError("chunk dtype holds Python objects")
    if not chunk.shape or chunk.shape[0] != len(chunk.frame_idxs):
        raise ProtocolError(f"chunk shape {chunk.shape} does not match {len(chunk.frame_idxs)} frame indices")
    return dtype, math.prod(chunk.shape) * dtype.itemsize


def chunk_array(chunk: Chunk, payload: Optional[memoryview]) -> np.ndarray:
    """The zero-copy array a chunk's payload holds, checked against its header."""
    dtype, expected = chunk_layout(chunk)
    size = 0 if payload is None else payload.nbytes
    if size != expected:
        raise ProtocolError(f"chunk payload has {size} bytes, header says {chunk.shape} {dtype} ({expected} bytes)")
    if expected == 0 or payload is None:
        return np.empty(chunk.shape, dtype=dtype)
    return np.frombuffer(payload, dtype=dtype).reshape(chunk.shape)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseValidationError):
        from cattrs import transform_error

        def say(error: BaseException, _type: Any) -> str:
            return "required field missing" if isinstance(error, KeyError) else (str(error) or type(error).__name__)

        return "; ".join(transform_error(exc, format_exception=say))
    return str(exc)
