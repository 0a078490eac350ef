"""The wire protocol: message classes and how they become ZeroMQ frames.

A message is one ZeroMQ multipart message: a msgpack header (a map with a
``kind`` and the fields of one of the classes below, unstructured by cattrs),
optionally followed by one raw payload frame (the pixel buffer of a chunk,
sent zero-copy). Nothing is pickled. Headers are structured back into their
class and validated; anything malformed raises :class:`ProtocolError`.

See ``docs/protocol.md`` for the conversation between client and server.
"""

from __future__ import annotations

import enum
import math
import struct
from typing import Any, Optional, Sequence, Union

import attrs
import cattrs
import msgpack
import numpy as np
from cattrs.errors import BaseValidationError
from cattrs.gen import make_dict_unstructure_fn, override

from ._video import Video, VideoInfo
from .errors import ProtocolError

#: Bumped on any incompatible change; checked in the hello/welcome handshake.
PROTOCOL_VERSION = 3

#: Longest list in any header (slot ids in a release, frame indices of one chunk).
MAX_LIST_LEN = 65536
#: Most slot ids one release may name (a client holds at most a window's worth of slots).
MAX_RELEASE_SLOTS = 4096
#: Most msgpack values a client's header may hold (the server's limit).
MAX_CLIENT_HEADER_VALUES = MAX_RELEASE_SLOTS + 256
#: Most msgpack values (maps, lists, strings, numbers, ...) a header may hold; checked
#: before anything is unpacked, so no header can make the decoder build millions of objects.
MAX_HEADER_VALUES = MAX_LIST_LEN + 256
#: Largest bytes value a header may hold by default (a shared-memory token).
MAX_BIN_BYTES = 64 * 1024
#: Largest string (a file name, an error message).
MAX_STR_BYTES = 64 * 1024
#: Bytes per explicit frame index on the wire (little-endian uint32).
INDEX_BYTES = 4
#: Largest frame index an explicit index array can carry.
MAX_FRAME_INDEX = 2**32 - 1
#: Bytes per time on the wire (little-endian float64, in a ``frame_times_reply``).
TIME_BYTES = 8
#: Most frames a ``frame_times_reply`` may describe (2**25: over 12 days at 30 fps).
MAX_TIMES_FRAMES = 2**25
#: Largest bytes value a client accepts in a server's header (a frame-times array).
MAX_REPLY_BIN_BYTES = TIME_BYTES * MAX_TIMES_FRAMES

_v = attrs.validators
_int = _v.instance_of(int)
_nonneg = [_int, _v.ge(0)]
_positive = [_int, _v.ge(1)]
_idx_list = _v.and_(_v.deep_iterable(_int, _v.instance_of(list)), _v.max_len(MAX_LIST_LEN))


def max_header_bytes(max_request_frames: int) -> int:
    """The largest header a client may send to a server that takes ``max_request_frames`` frames.

    An explicit index array is the only large field; everything else fits in the slack.
    """
    return INDEX_BYTES * max_request_frames + MAX_STR_BYTES + 64 * 1024


@attrs.frozen
class FrameRange:
    """Frames ``range(start, stop, step)``: a request for many frames in a few bytes."""

    start: int = attrs.field(validator=[_int, _v.ge(0), _v.le(MAX_FRAME_INDEX)])
    stop: int = attrs.field(validator=[_int, _v.ge(-1), _v.le(MAX_FRAME_INDEX + 1)])
    step: int = attrs.field(default=1, validator=[_int, _v.ge(-MAX_FRAME_INDEX), _v.le(MAX_FRAME_INDEX)])

    def __attrs_post_init__(self) -> None:
        if self.step == 0:
            raise ValueError("step must not be zero")

    def as_range(self) -> range:
        return range(self.start, self.stop, self.step)


def _index_array_bytes(_instance: Any, _attribute: Any, value: Any) -> None:
    if isinstance(value, bytes) and len(value) % INDEX_BYTES:
        raise ValueError(f"an index array holds {INDEX_BYTES}-byte integers; {len(value)} bytes is not a multiple of {INDEX_BYTES}")


def _as_selection(idxs: Any) -> Any:
    """Frame indices given in Python (a list, range or array) as their wire form; the wire form
    itself (and anything else, for the validator to name) as it is. Off the wire, only the wire
    form gets this far: the structure hook for :data:`FrameSelection` refuses lists."""
    if isinstance(idxs, (range, list, tuple, np.ndarray)):
        return frame_selection(idxs)
    return idxs


#: Which frames a request wants on the wire: None (all), a range, or explicit indices as
#: a raw little-endian uint32 array (never a list of integers, which costs an object each).
FrameSelection = Optional[Union[FrameRange, bytes]]


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
    #: The most frames one request may name; a bigger request would not even be read.
    max_request_frames: Optional[int] = attrs.field(default=None, validator=_v.optional(_positive))


@attrs.frozen
class Request:
    """Client → server: stream frames ``frame_idxs`` (None = all) in chunks.

    ``window`` is the number of chunks the server may send before the client
    returns :class:`Credit`; it bounds memory on both sides. ``shm``: the client
    reached the server's probe, so chunks may come in shared memory.

    ``ahead``: the last ``ahead`` frames of ``frame_idxs`` are read ahead, not asked
    for: frames the client expects to ask for next (a person stepping forward), sent
    while it looks at the others. The server drops those past the video's end (the
    request then ends sooner) and treats the request by the frames asked for (a small
    one is served from, and kept in, the recent-frames cache, and read around).

    ``ahead_frames_per_chunk``: with ``ahead``, the frames asked for come in chunks of
    ``frames_per_chunk`` and the frames read ahead after them in chunks of this many, so
    that a person stepping forward takes most steps from a chunk already in hand (see
    :class:`Chunking`). 0: every chunk holds ``frames_per_chunk``, across both.

    ``release`` and ``replaces``: what a :class:`Release` and a :class:`Cancel` sent just
    before would say, carried by the request instead (a GUI asking for one frame after
    another sends one message a frame, not three): the server first takes back the slots
    ``release`` names, then cancels request ``replaces`` (if it is still going), then
    starts this one.
    """

    request_id: int = attrs.field(validator=_nonneg)
    video: Video
    frame_idxs: FrameSelection = attrs.field(
        converter=lambda idxs: _as_selection(idxs),
        validator=[_v.optional(_v.instance_of((FrameRange, bytes))), _index_array_bytes],
    )
    frames_per_chunk: int = attrs.field(default=64, validator=_positive)
    window: int = attrs.field(default=2, validator=_positive)
    shm: bool = attrs.field(default=False, validator=_v.instance_of(bool))
    ahead: int = attrs.field(default=0, validator=_nonneg)
    ahead_frames_per_chunk: int = attrs.field(default=0, validator=_nonneg)
    release: list[int] = attrs.field(factory=list, validator=[_idx_list, _v.max_len(MAX_RELEASE_SLOTS)])
    replaces: Optional[int] = attrs.field(default=None, validator=_v.optional(_nonneg))


@attrs.frozen
class Chunking:
    """Which of a request's frames chunk *k* holds: the one rule both sides follow.

    The first ``asked`` frames come in chunks of ``frames_per_chunk``; with
    ``ahead_frames_per_chunk`` set, the frames after them (read ahead) come in chunks of
    that many, never sharing a chunk with a frame asked for. Without it, every chunk
    holds ``frames_per_chunk`` frames, from the first frame on.
    """

    frames_per_chunk: int
    asked: int = 0
    ahead_frames_per_chunk: int = 0

    @property
    def most(self) -> int:
        """The most frames one chunk holds."""
        return max(self.frames_per_chunk, self.ahead_frames_per_chunk)

    def bounds(self, k: int) -> tuple[int, int]:
        """The positions ``[start, stop)`` of chunk ``k``'s frames among the request's (``stop`` may pass its end)."""
        fpc, asked, ahead = self.frames_per_chunk, self.asked, self.ahead_frames_per_chunk
        if not ahead:
            return k * fpc, (k + 1) * fpc
        asked_chunks = -(-asked // fpc)
        if k < asked_chunks:
            return k * fpc, min((k + 1) * fpc, asked)
        start = asked + (k - asked_chunks) * ahead
        return start, start + ahead

    def chunks(self, count: int) -> int:
        """How many chunks ``count`` frames make (at least one: an empty request sends one empty chunk)."""
        fpc, ahead = self.frames_per_chunk, self.ahead_frames_per_chunk
        if not ahead or count <= self.asked:
            return max(1, -(-count // fpc))
        return -(-self.asked // fpc) + -(-(count - self.asked) // ahead)


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

    slots: list[int] = attrs.field(validator=[_idx_list, _v.max_len(MAX_RELEASE_SLOTS)])


@attrs.frozen
class Bye:
    """Client → server: this connection is closing; the caller no longer holds the chunks in
    ``slots`` either. The server forgets the client at once (instead of at its next failed
    ping) and keeps its free slots for the next client."""

    slots: list[int] = attrs.field(factory=list, validator=[_idx_list, _v.max_len(MAX_RELEASE_SLOTS)])


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


def _float64_bytes(_inst: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bytes) or len(value) % TIME_BYTES:
        raise ValueError(f"{attribute.name} must be bytes of little-endian float64 ({TIME_BYTES} bytes each), got {len(value) if isinstance(value, bytes) else type(value).__name__}")


@attrs.frozen
class FrameTimesRequest:
    """Client → server: every frame's presentation time and duration in ``video``."""

    request_id: int = attrs.field(validator=_nonneg)
    video: Video


@attrs.frozen
class FrameTimesReply:
    """Server → client: frame i's presentation time and duration in seconds, for i = 0..n-1,
    as raw little-endian float64 arrays; the header's frame count if the container states one."""

    request_id: int = attrs.field(validator=_nonneg)
    pts_seconds: bytes = attrs.field(validator=_float64_bytes)
    duration_seconds: bytes = attrs.field(validator=_float64_bytes)
    num_frames_from_header: Optional[int] = attrs.field(default=None, validator=_v.optional(_nonneg))

    def __attrs_post_init__(self) -> None:
        if len(self.pts_seconds) != len(self.duration_seconds):
            raise ValueError(
                f"pts_seconds holds {len(self.pts_seconds) // TIME_BYTES} times but duration_seconds {len(self.duration_seconds) // TIME_BYTES}"
            )


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
    Hello, Welcome, Request, Chunk, Error, Cancel, Credit, Release, Bye, InfoRequest, InfoReply, Ping, Pong, Stop, Shutdown,
    FrameTimesRequest, FrameTimesReply,
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
    "bye": Bye,
    "info": InfoRequest,
    "info_reply": InfoReply,
    "ping": Ping,
    "pong": Pong,
    "stop": Stop,
    "shutdown": Shutdown,
    "frame_times": FrameTimesRequest,
    "frame_times_reply": FrameTimesReply,
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


#: The converter for everything that crosses the wire: strict (no coercion, no unknown
#: fields). It is this module's own: nothing else's behaviour changes when it is imported.
converter = cattrs.Converter(forbid_extra_keys=True)
converter.register_structure_hook(int, _strict((int,), "an integer"))
converter.register_structure_hook(str, _strict((str,), "a string"))
converter.register_structure_hook(float, _strict((int, float), "a number", float))
converter.register_structure_hook(bool, _strict((bool,), "a boolean"))
converter.register_structure_hook(bytes, _strict((bytes,), "bytes"))
# A Video's image files and transforms travel only when set, a VideoInfo's source size only
# when it differs, and a Request's frames read ahead only when there are some: peers that
# predate them (forbid_extra_keys) keep accepting the rest.
converter.register_unstructure_hook(
    Video,
    make_dict_unstructure_fn(
        Video, converter, files=override(omit_if_default=True), crop=override(omit_if_default=True),
        resize=override(omit_if_default=True), interpolation=override(omit_if_default=True),
        layout=override(omit_if_default=True),
    ),
)
converter.register_unstructure_hook(
    Request,
    make_dict_unstructure_fn(
        Request,
        converter,
        ahead=override(omit_if_default=True),
        ahead_frames_per_chunk=override(omit_if_default=True),
        release=override(omit_if_default=True),
        replaces=override(omit_if_default=True),
    ),
)
converter.register_unstructure_hook(
    VideoInfo,
    make_dict_unstructure_fn(
        VideoInfo, converter, source_height=override(omit_if_default=True), source_width=override(omit_if_default=True)
    ),
)


def _structure_selection(value: Any, _type: Any) -> FrameSelection:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        return converter.structure(value, FrameRange)
    raise TypeError(
        f"expected null (all frames), a range {{start, stop, step}} or bytes of little-endian uint32, got {type(value).__name__}"
    )


converter.register_structure_hook_func(lambda t: t == FrameSelection, _structure_selection)


def times_bytes(seconds: "np.ndarray | Sequence[float]") -> bytes:
    """The wire form of a times array: raw little-endian float64."""
    return np.asarray(seconds, dtype="<f8").tobytes()


def times_array(data: bytes) -> np.ndarray:
    """A times array from its wire form (float64, native order, writable)."""
    return np.frombuffer(data, dtype="<f8").astype(np.float64)


def frame_selection(idxs: "range | np.ndarray | Sequence[int] | None") -> FrameSelection:
    """The wire form of frame indices: ranges stay ranges, anything else a uint32 array."""
    if idxs is None:
        return None
    if isinstance(idxs, range):
        return FrameRange(idxs.start, idxs.stop, idxs.step) if len(idxs) else b""
    arr = np.asarray(idxs)
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > MAX_FRAME_INDEX):
        raise ValueError(f"frame indices must be integers in 0..{MAX_FRAME_INDEX}")
    return arr.astype("<u4", copy=False).tobytes()


def selection_count(selection: FrameSelection) -> Optional[int]:
    """How many frames a selection names, without building it (None: all frames)."""
    if selection is None:
        return None
    if isinstance(selection, FrameRange):
        return len(selection.as_range())
    return len(selection) // INDEX_BYTES


def selection_indices(selection: FrameSelection, frame_count: int) -> "range | np.ndarray":
    """The frames a selection names: a range, or a read-only uint32 array over the message."""
    if selection is None:
        return range(frame_count)
    if isinstance(selection, FrameRange):
        return selection.as_range()
    return np.frombuffer(selection, dtype="<u4")


# msgpack type bytes: (first, last, fixed payload bytes after the type byte or None, length-prefix bytes)
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
          0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4}
_CONTAINER = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
_UINT = {1: ">B", 2: ">H", 4: ">I"}


def count_values(header: bytes, limit: int) -> int:
    """How many msgpack values ``header`` holds, counting no further than ``limit``.

    A walk over type bytes that creates nothing: strings and bytes are skipped by
    their length, so a header is vetted in at most ``limit`` steps whatever its size.
    Raises ValueError when a length runs past the end.
    """
    pos, pending, count, size = 0, 1, 0, len(header)
    while pending and count <= limit:
        if pos >= size:
            raise ValueError("truncated msgpack")
        b = header[pos]
        pos += 1
        pending -= 1
        count += 1
        if b <= 0x7F or b >= 0xE0 or b in _FIXED:
            pos += _FIXED.get(b, 0)
        elif 0xA0 <= b <= 0xBF:
            pos += b & 0x1F
        elif 0x90 <= b <= 0x9F:
            pending += b & 0x0F
        elif 0x80 <= b <= 0x8F:
            pending += 2 * (b & 0x0F)
        elif b in _SIZED:
            width = _SIZED[b]
            (n,) = struct.unpack_from(_UINT[width], header, pos)
            pos += width + n + (1 if b in (0xC7, 0xC8, 0xC9) else 0)
        elif b in _CONTAINER:
            width, per = _CONTAINER[b]
            (n,) = struct.unpack_from(_UINT[width], header, pos)
            pos += width
            pending += per * n
        else:
            raise ValueError(f"invalid msgpack type byte 0x{b:02x}")
    return count


def encode(message: Message) -> bytes:
    """The msgpack header of ``message``."""
    body = converter.unstructure(message)
    assert "kind" not in body, "'kind' is reserved for the message type"
    body["kind"] = _KIND_OF[type(message)]
    return msgpack.packb(body, use_bin_type=True)


def decode(header: bytes, max_bin_len: int = MAX_BIN_BYTES, max_values: int = MAX_HEADER_VALUES) -> Message:
    """Parse and validate a header; raise :class:`ProtocolError` if it is not one of ours.

    Bounded before anything is built: at most ``max_values`` msgpack values (counted
    without unpacking), no bytes value over ``max_bin_len``, no string over
    :data:`MAX_STR_BYTES`, no list over :data:`MAX_LIST_LEN`.
    """
    try:
        values = count_values(header, max_values)
    except (ValueError, struct.error) as exc:
        raise ProtocolError(f"header is not msgpack ({exc or 'truncated'})") from exc
    if values > max_values:
        raise ProtocolError(f"header holds more than {max_values} values; the limit is {max_values}")
    try:
        body = msgpack.unpackb(
            header,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bin_len,
            max_str_len=MAX_STR_BYTES,
            max_array_len=MAX_LIST_LEN,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not msgpack or over a size limit ({type(exc).__name__}: {exc})") from exc
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


def parts_of(message: Message, payload: Any = None) -> list[Any]:
    """The parts of the ZeroMQ multipart message for ``message`` and its optional payload buffer."""
    return [encode(message)] if payload is None else [encode(message), payload]


def parse(
    parts: Sequence[Any], max_parts: int = 2, max_bin_len: int = MAX_BIN_BYTES
) -> tuple[Message, Optional[memoryview]]:
    """Message and payload from the parts of a received multipart message (bytes or zmq.Frame).

    A server passes ``max_parts=1``: no client message has a payload.
    """
    if not 1 <= len(parts) <= max_parts:
        expected = "1 part" if max_parts == 1 else f"1 to {max_parts} parts"
        raise ProtocolError(f"expected {expected}, got {len(parts)}")
    header = parts[0].bytes if hasattr(parts[0], "bytes") else parts[0]
    payload = None
    if len(parts) == 2:
        payload = parts[1].buffer if hasattr(parts[1], "buffer") else memoryview(parts[1])
    return decode(header, max_bin_len=max_bin_len), payload


def chunk_header(
    request_id: int,
    chunk: int,
    last_chunk: bool,
    frame_idxs: Sequence[int],
    shape: Sequence[int],
    dtype: Any = np.uint8,
    shm: Optional[ShmSlot] = None,
) -> Chunk:
    """The header of chunk ``chunk`` of a request: frames of ``shape`` and ``dtype``, inline or in ``shm``."""
    return Chunk(
        request_id=request_id,
        chunk=chunk,
        last_chunk=last_chunk,
        frame_idxs=[int(i) for i in frame_idxs],
        dtype=np.dtype(dtype).str,
        shape=[int(n) for n in shape],
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


class ConnectionEvent(enum.Enum):
    """What happened to a client's connection to a server, as the transport reports it to the
    client core (translated from ZeroMQ's monitor events, so the core never sees ZeroMQ)."""

    CONNECTED = "connected"  # a ZMTP handshake succeeded
    LOST = "lost"  # the connection closed
    AUTH_FAILED = "auth_failed"  # the server refused our CURVE credentials
    HANDSHAKE_FAILED = "handshake_failed"  # the peer's security settings differ from ours (or it is no frame server)


def warm_up() -> None:
    """Encode and parse one message of each kind a client exchanges, so that cattrs builds its
    (un)structuring code now rather than on the first real message (a few milliseconds each
    the first time): event-loop drivers call this at import, off the loop's time."""
    video = Video("warm-up.mp4")
    info = VideoInfo("warm-up.mp4", 1, 1, 1, 3, False, 1.0, "h264", "yuv420p", "mp4")
    for message in (
        Hello(PROTOCOL_VERSION, "warm-up"),
        Welcome(PROTOCOL_VERSION, "warm-up", ShmProbe(pid=1, fd=0, token=b"t"), 1),
        Request(1, video, None),
        InfoRequest(1, video),
        InfoReply(1, info),
        Credit(1),
        Release([1]),
        Cancel(1),
        Error(1, "ServerError", "warm-up"),
        Shutdown("warm-up"),
        chunk_header(1, 0, True, [0], (1, 1, 1, 3), shm=ShmSlot(slot=1, fd=0, size=3)),
    ):
        parse(parts_of(message))
