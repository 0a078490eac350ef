"""What the server core and its driver tell each other: the facts the driver reports and the
actions the core hands out (:mod:`asyncframes._server_state`).

Layer rule: plain attrs data only. No zmq, av, os, time or threads; nothing here decides
anything or does anything.
"""

from __future__ import annotations

from typing import Hashable, Optional, Union

import attrs

from . import _protocol as protocol
from ._times import FrameTimes
from ._video import Video, VideoInfo

# -- what the driver reports ------------------------------------------------------------------


@attrs.frozen
class VideoFacts:
    """What opening a video told the driver: all the core needs to validate and plan a request."""

    frame_count: int
    #: Grayscale as served (the request's choice, or what the first frame showed).
    grayscale: bool
    #: ``(h, w, c)`` of one decoded frame.
    frame_shape: tuple[int, int, int]
    #: The file's identity when opened: decoding checks the file is still this one.
    identity: Hashable = ()
    #: The video's description (asked for by ``info`` messages only).
    info: Optional[VideoInfo] = None
    #: Every frame's time (asked for by ``frame_times`` messages only).
    frame_times: Optional[FrameTimes] = None


# -- actions ------------------------------------------------------------------------------------


@attrs.frozen
class Send:
    """Send ``message`` to ``client``; ``payload``: the frames just decoded follow inline."""

    client: bytes
    message: protocol.Message
    payload: bool = False


@attrs.frozen
class OpenVideo:
    """Open ``video`` (resolving, confining and indexing it) and report
    :meth:`ServerState.video_opened` with ``ticket``; ``info``: include its :class:`VideoInfo`;
    ``frame_times``: include its :class:`FrameTimes`."""

    ticket: int
    video: Video
    info: bool = False
    frame_times: bool = False


@attrs.frozen
class SlotUse:
    """A shared-memory slot a chunk is decoded into; ``new``: the driver makes a buffer of
    ``size`` bytes for it first and reports its fd (:meth:`ServerState.slot_made`);
    ``spare``: the driver gives it the spare buffer kept under that key instead."""

    slot: int
    size: int
    new: bool
    spare: Optional[int] = None


@attrs.frozen
class CacheUse:
    """The request's frame cache: its size now, how it keeps frames, the frames it wants next."""

    max_bytes: int
    finish_gops: bool
    later: list[int]


@attrs.frozen(eq=False)
class Decode:
    """Decode ``frames`` of ``video`` (an array of ``shape``, uint8) for one chunk of a request,
    then report :meth:`ServerState.chunk_decoded` (or ``chunk_failed`` / ``chunk_interrupted``)."""

    client: bytes
    request_id: int
    video: Video
    grayscale: bool
    frames: list[int]
    shape: tuple[int, ...]
    identity: Hashable
    #: A small request: its frames go through the recent-frames cache.
    recent: bool
    slot: Optional[SlotUse] = None
    cache: Optional[CacheUse] = None
    #: Slots of this client retired to make room: the driver closes their buffers.
    close_slots: tuple[int, ...] = ()
    #: Spare buffers closed to make room for a new slot.
    close_spares: tuple[int, ...] = ()
    #: (client, slot, key): free slots of idle clients that become spares under ``key``
    #: first (the driver moves their buffers), one of which this chunk's slot takes.
    to_spares: tuple[tuple[bytes, int, int], ...] = ()


@attrs.frozen
class ReadAround:
    """While idle, decode ``frames`` of ``video`` into the recent-frames cache, in that order
    (stopping when a message arrives; what was decoded by then is kept)."""

    video: Video
    grayscale: bool
    frames: tuple[int, ...]


@attrs.frozen
class ResizeCache:
    """The frame cache of a request gets a new size (0: keep nothing)."""

    client: bytes
    request_id: int
    max_bytes: int


@attrs.frozen
class ForgetRequest:
    """A request is over: drop what the driver keeps for it (its frame cache)."""

    client: bytes
    request_id: int


@attrs.frozen
class ForgetClient:
    """A client is gone: close its shared slots and drop its requests' caches.

    ``spares``: (slot, key) of its free slots to keep, under ``key``, as spares for the
    next clients instead of closing them (a new slot's memory costs about 1 ms per MB
    the first time it is written; a reused one nothing).
    """

    client: bytes
    spares: tuple[tuple[int, int], ...] = ()


@attrs.frozen
class CloseSpares:
    """Close the spare buffers kept under these keys (the server has been idle)."""

    keys: tuple[int, ...]


@attrs.frozen
class ForgetVideo:
    """Close the open readers of a video (an internal error made them suspect)."""

    video: Video


@attrs.frozen
class FreeBuffers:
    """No chunk for a while: free the kept chunk buffers; ``release_memory``: also hand the heap back."""

    release_memory: bool


@attrs.frozen
class ReleaseMemory:
    """Hand freed heap memory back to the system: a flood was read and thrown away, and glibc
    keeps what libzmq held for it otherwise (the server's RSS would stay at the flood's peak)."""


@attrs.frozen
class Stop:
    """End the serve loop (a client sent ``stop`` to a server that allows it)."""

    reason: str


Action = Union[
    Send, OpenVideo, Decode, ReadAround, ResizeCache, ForgetRequest, ForgetClient, CloseSpares, ForgetVideo, FreeBuffers,
    ReleaseMemory, Stop,
]
