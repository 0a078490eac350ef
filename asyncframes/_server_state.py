"""The server's protocol state machine: everything that decides what the server sends lives here.

Layer rule: no zmq, av, os, time or threads. The caller (the driver, :mod:`asyncframes._server`)
passes in what clients sent (raw message parts), the outcomes of opening and decoding, the
bytes it still has queued in ZeroMQ, and the time (``now``, monotonic seconds); it gets back
*actions* (attrs classes, in :mod:`asyncframes._server_actions`) and carries them out.
This module may import attrs, numpy, logging and the package's pure modules (protocol,
errors, config, video, files' string helpers); it never touches a socket, a file, a
decoder or a clock.

What it decides, each rule in one place:

* **Inbox and floods** (:meth:`ServerState.receive`, :meth:`ServerState.handle_round`): a
  bounded queue per client (``CLIENT_QUEUE`` messages, ``CLIENT_QUEUE_REQUESTS`` of the largest
  requests in bytes); a client over it is dropped on its turn and silenced; each round
  handles one share (``CLIENT_SHARE``) of every client's queue.
* **Handshake and limits** (:meth:`ServerState._handle`, :meth:`ServerState._start`,
  :meth:`ServerState.video_opened`): hello first, one protocol version, requests per client,
  frames per chunk, frames per request, chunk bytes.
* **Credit, window and fairness** (:meth:`ServerState.next_chunk`): a request sends only
  against credit (at most ``max_window``), round-robin over requests, skipping those without
  credit or room; inline chunks within the server's and the client's caps on bytes queued
  in ZeroMQ, the client's cap also its requests' windows of chunks in bytes.
* **Shared-memory slots** (:class:`SlotBook`): which slot numbers exist, are lent, free or
  retired, and their sizes; ``max_window + 3`` per client, ``max_shared_bytes`` overall;
  the released slots of clients that left are spares for the next (:class:`Spares`).
* **Cancel** (:meth:`ServerState.cancel_queued`), **cache shares** (:func:`cache_shares`),
  **read-around** (:meth:`ServerState.read_around`), **pings, idle buffers and idle exit**
  (:meth:`ServerState.tick`), **how long to sleep** (:meth:`ServerState.wait_s`),
  **dropping clients** (:meth:`ServerState.client_gone`, :meth:`ServerState.send_failed`),
  **shutdown** (:meth:`ServerState.shutdown`) and **wire errors** (:func:`wire_error`).

The actions and the facts the driver reports are in :mod:`asyncframes._server_actions`.
Opening a video is an action whose outcome the driver feeds back later
(:meth:`ServerState.video_opened`); nothing here assumes it comes back at once.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import attrs
import numpy as np

from . import _protocol as protocol
from ._config import ServerConfig
from ._index import check_frame_idxs, first_outside
from ._protocol import (
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    Credit,
    Error,
    FrameTimesReply,
    FrameTimesRequest,
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
    Welcome,
)
from ._server_actions import (
    Action,
    CacheUse,
    CloseSpares,
    Decode,
    ForgetClient,
    ForgetRequest,
    ForgetVideo,
    FreeBuffers,
    OpenVideo,
    ReadAround,
    ReleaseMemory,
    ResizeCache,
    Send,
    SlotUse,
    Stop,
    VideoFacts,
)
from ._video import Video
from .errors import AsyncFramesError, ProtocolError, ServerError, UnknownClientError

log = logging.getLogger("asyncframes._server")

#: A request with no credit that has not been sent a chunk for this long counts as idle (its
#: client is paused, not just slow): its frame cache shrinks so that active requests get theirs.
CACHE_IDLE_S = 5.0
#: A server that has sent no chunk for this long frees the chunk buffers it keeps for reuse.
BUFFERS_IDLE_S = 2.0
#: Messages of silenced connections thrown away before the heap they held is handed back
#: (:class:`ReleaseMemory`), and the least time between two such hand-backs; a flood that
#: stops with fewer is handed back once it has been quiet that long.
TRIM_AFTER_DISCARDS = 20_000
TRIM_EVERY_S = 1.0
#: How long a request waiting for room to send (or for a shared slot) waits before looking again.
ROOM_RETRY_S = 0.01
#: The longest the loop sleeps when nothing is due.
IDLE_WAIT_S = 0.25
#: Messages of one client read but not yet handled; a client that has more waiting (it
#: sends without waiting for answers, far beyond any window) is dropped with an error.
CLIENT_QUEUE = 1024
#: ... and their bytes: room for this many of the largest request the server takes.
CLIENT_QUEUE_REQUESTS = 2
#: Silenced connections remembered (ZeroMQ gives a reconnecting peer a new identity).
MAX_SILENCED = 4096
#: Messages a silenced connection may still send (thrown away unread: time for the error
#: telling it why to go out) before the server cuts the connection itself. Few: until the
#: cut, libzmq keeps buffering what it sends (a soak under load saw a ~80 MiB step at 1,024). Reading and
#: throwing away cannot bound memory on its own: libzmq keeps reading a connection into an
#: unbounded queue (no RCVHWM, see _transport.py), and a flooder given more CPU than the
#: server outpaces the throwing away (seen: 30 MiB/s of server memory, without end).
DISCARDS_BEFORE_DISCONNECT = 64
#: Units of one client's messages handled per round: small ones count 1; one that opens
#: or indexes a video (hello, request, info) takes the whole share.
CLIENT_SHARE = 16
#: Quiet time after a small request before the server reads around it: a client that asks
#: again at once (the same frame, the next one) is answered before any of that starts.
READ_AROUND_DELAY_S = 0.02
#: Quiet time after a request's chunk goes (or its client's credit comes) before the frames it
#: reads ahead are decoded (see ``Request.ahead``): a client that asks again at once (the same
#: frame, a frame elsewhere) does not wait for a frame nobody may want; a person stepping,
#: tens of milliseconds apart, still finds the next one there.
READ_AHEAD_DELAY_S = 0.005
#: Shared slots per client beyond its window: the chunk the caller holds, and releases on their way.
SLOTS_BEYOND_WINDOW = 3
#: A small request this many frames or fewer before the last one is a step back (reading
#: around then goes behind first); further back it is a jump, read around like one forward.
STEP_BACK_FRAMES = 2
#: A server that has sent no chunk for this long closes its spare slots (see :class:`Spares`).
SPARES_IDLE_S = 30.0

FLOODED_MESSAGE = (
    f"this client sent more messages (over {CLIENT_QUEUE}, or over {CLIENT_QUEUE_REQUESTS} of the largest "
    "requests in bytes) than the server had handled yet; "
    "its requests are cancelled and what this connection sends is ignored from now on "
    "(wait for answers before sending more; a new connection is served again)"
)

Frames = Union[range, np.ndarray]


# -- pure rules ---------------------------------------------------------------------------------


def _within(idxs: Frames, asked: int, frame_count: int) -> Frames:
    """``idxs`` without the frames read ahead (after the first ``asked``) past the video's end."""
    if isinstance(idxs, range):
        outside = first_outside(idxs[asked:], frame_count)
        return idxs if outside is None else idxs[: asked + idxs[asked:].index(outside)]
    ahead = idxs[asked:]
    if not len(ahead) or int(ahead.max()) < frame_count:
        return idxs
    kept = np.concatenate([idxs[:asked], ahead[ahead < frame_count]])
    kept.flags.writeable = False
    return kept


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


def wire_error(request_id: Optional[int], exc: BaseException, root: Sequence[str] = ()) -> Error:
    """The error message a failure becomes on the wire.

    Our own errors travel by class name; anything else is an internal ``ServerError``.
    ``root``: the spellings of the server's root folder (see :func:`files.root_spellings`);
    paths under it are named relative to it, so a client never learns where it lies.
    """
    if isinstance(exc, AsyncFramesError):
        error, message = type(exc).__name__, str(exc)
    elif isinstance(exc, MemoryError):
        error, message = "ServerError", "the server ran out of memory for this request"
    else:
        error, message = "ServerError", f"internal server error: {type(exc).__name__}: {exc}"
    return Error(request_id=request_id, error=error, message=hide_root(message, root))


def hide_root(text: str, root: Sequence[str]) -> str:
    """``text`` with every spelling in ``root`` of the root folder taken out of the paths in it."""
    for prefix in root:
        text = text.replace(prefix + "/", "").replace(prefix, ".")
    return text


def request_cache(idxs: Frames) -> Optional[bool]:
    """Whether a request needs a frame cache, as its ``finish_gops`` (None: no cache).

    A request that strictly moves forward never asks for a decoded frame again: no cache.
    One that only moves forward (repeats) needs no decoding ahead within GOPs.
    """
    if isinstance(idxs, range):
        return None if idxs.step > 0 or len(idxs) <= 1 else True
    before, after = idxs[:-1], idxs[1:]  # views: one comparison per index, no copies
    if bool((after > before).all()):
        return None
    return not bool((after >= before).all())


def _frames_at(idxs: Frames, start: int, stop: int) -> list[int]:
    """Frames ``idxs[start:stop]`` as Python ints (one chunk's worth, never the whole request)."""
    part = idxs[start:stop]
    return part.tolist() if isinstance(part, np.ndarray) else list(part)


def _round_up(n: int, unit: int = 1 << 20) -> int:
    """Slot sizes in whole MiB, so the slightly smaller last chunk reuses a slot."""
    return max(unit, -(-n // unit) * unit)


class SlotBook:
    """One client's shared-memory slots, as numbers and sizes: free ones are reused, lent ones
    wait for the client's ``release``; at most ``max_slots`` exist. The buffers themselves are
    the driver's."""

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self._next = 1
        self.free: dict[int, int] = {}
        self.lent: dict[int, int] = {}
        self.fds: dict[int, int] = {}
        #: Slots closed since the last chunk told the client.
        self.retired: list[int] = []

    @property
    def nbytes(self) -> int:
        return sum(self.free.values()) + sum(self.lent.values())

    def take(self, nbytes: int, room: int, spares: Optional["Spares"] = None) -> Optional[tuple[SlotUse, list[int]]]:
        """A slot of at least ``nbytes`` (now lent) and the slots closed to make it, or None.

        Its own free slot if one fits; else a spare of ``spares`` that fits (its memory has
        been written before, so it costs nothing to fill); else a new one, for which spares
        are closed if that makes room.

        ``room``: bytes the server may still add to shared memory (spares counted as used).
        """
        fits = [(size, slot) for slot, size in self.free.items() if size >= nbytes]
        if fits:
            _, slot = min(fits)
            use = SlotUse(slot, self.free.pop(slot), new=False)
            self.lent[use.slot] = use.size
            return use, []
        if not self.can_add():
            return None
        full = len(self.free) + len(self.lent) >= self.max_slots
        spare = spares.fitting(nbytes) if spares is not None else None
        size = spare[1] if spare is not None else _round_up(nbytes)
        if spare is None and size > room and not (spares is not None and spares.close_for(size - room)):
            return None
        closed: list[int] = []
        if full:
            small = min(self.free, key=lambda s: self.free[s])  # retire the smallest free slot
            del self.free[small]
            self.fds.pop(small, None)
            self.retired.append(small)
            closed.append(small)
        if spare is not None:
            assert spares is not None
            key = spare[0]
            use = SlotUse(self._next, size, new=False, spare=key)
            self.fds[use.slot] = spares.adopt(key)
        else:
            use = SlotUse(self._next, size, new=True)
        self._next += 1
        self.lent[use.slot] = use.size
        return use, closed

    def can_add(self) -> bool:
        """Whether a slot can be added (retiring a free one if need be)."""
        return len(self.free) + len(self.lent) < self.max_slots or bool(self.free)

    def fits(self, nbytes: int) -> bool:
        """Whether a free slot holds ``nbytes``."""
        return any(size >= nbytes for size in self.free.values())

    def give_up(self, slot: int) -> tuple[int, int]:
        """Hand free slot ``slot`` on (it is retired here): its (size, fd)."""
        size = self.free.pop(slot)
        self.retired.append(slot)
        return size, self.fds.pop(slot)

    def release(self, slots: "list[int]") -> None:
        """The client let go of these slots (unknown numbers are ignored)."""
        for slot in slots:
            size = self.lent.pop(slot, None)
            if size is not None:
                self.free[slot] = size

    def unmake(self, slot: int) -> None:
        """A new slot could not be made: forget it."""
        self.lent.pop(slot, None)
        self.fds.pop(slot, None)

    def take_retired(self) -> list[int]:
        out, self.retired = self.retired, []
        return out


class Spares:
    """Free slots of clients that left, kept for the next ones: the server-wide spare buffers.

    Writing a new slot's memory the first time costs about 1 ms per MB (the kernel finds
    and zeroes each page); a spare has been written before and costs nothing. So the free
    slots of a client that leaves (the caller holds no array over them: it released them)
    go here, and a client that needs a slot it does not have takes the smallest spare that
    fits. They count against ``max_shared_bytes``, are closed first when a new slot needs
    the room, and all of them after ``SPARES_IDLE_S`` without a chunk.
    """

    def __init__(self) -> None:
        self._next = 1
        #: Spare key -> (size, fd).
        self.kept: dict[int, tuple[int, int]] = {}
        #: Keys closed to make room since the driver was last told.
        self.closed: list[int] = []
        #: (client, slot, key) of idle clients' slots made spares since the driver was last told.
        self.moved: list[tuple[bytes, int, int]] = []

    @property
    def nbytes(self) -> int:
        return sum(size for size, _ in self.kept.values())

    def keep(self, size: int, fd: int) -> int:
        """Keep a slot of ``size`` bytes (memfd ``fd``); returns its key."""
        key = self._next
        self._next += 1
        self.kept[key] = (size, fd)
        return key

    def fitting(self, nbytes: int) -> Optional[tuple[int, int]]:
        """(key, size) of the smallest spare of at least ``nbytes``, or None."""
        fits = [(size, key) for key, (size, _) in self.kept.items() if size >= nbytes]
        if not fits:
            return None
        size, key = min(fits)
        return key, size

    def adopt(self, key: int) -> int:
        """Take the spare ``key`` out: its fd."""
        return self.kept.pop(key)[1]

    def close_for(self, nbytes: int) -> bool:
        """Close the oldest spares until ``nbytes`` are freed; False (closing none) if all of
        them would not free that much."""
        if nbytes > self.nbytes:
            return False
        freed = 0
        while freed < nbytes:
            key = next(iter(self.kept))
            freed += self.kept.pop(key)[0]
            self.closed.append(key)
        return True

    def take_closed(self) -> list[int]:
        out, self.closed = self.closed, []
        return out

    def take_moved(self) -> list[tuple[bytes, int, int]]:
        out, self.moved = self.moved, []
        return out

    def close_all(self) -> list[int]:
        """Every key, all closed now."""
        keys = list(self.kept)
        self.kept.clear()
        return keys


# -- the state ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Request:
    """The server's record of one request in flight."""

    client: bytes
    request: Request
    grayscale: bool
    #: A range, or a read-only uint32 array over the request message (never a list of ints).
    frame_idxs: Frames
    frame_shape: tuple[int, int, int]
    frame_count: int
    identity: Hashable
    credit: int
    started: float
    #: When a chunk was last begun (or the request started).
    last_sent: float
    #: Which frames each chunk holds (see ``Request.ahead_frames_per_chunk``).
    chunking: protocol.Chunking
    #: The frame cache's finish_gops (None: the request needs no cache), and its share now.
    cache: Optional[bool] = None
    cache_bytes: int = 0
    next_chunk: int = 0
    #: No shared slot could be had: do not try again before this time.
    shm_retry_at: float = 0.0
    #: A chunk of it is being decoded.
    decoding: bool = False
    #: Frames asked for: the first of ``frame_idxs``; the rest are read ahead (see ``Request.ahead``).
    asked: int = 0
    #: Chunks of frames read ahead wait until this time (see READ_AHEAD_DELAY_S).
    ahead_at: float = 0.0

    def held_back(self, now: float) -> bool:
        """Whether its next chunk holds frames read ahead that must wait for quiet (see READ_AHEAD_DELAY_S)."""
        return now < self.ahead_at and self.chunking.bounds(self.next_chunk)[0] >= self.asked

    @property
    def rid(self) -> int:
        return self.request.request_id

    @property
    def frame_bytes(self) -> int:
        return math.prod(self.frame_shape)

    @property
    def n_chunks(self) -> int:
        return self.chunking.chunks(len(self.frame_idxs))

    def next_chunk_bytes(self) -> int:
        start, stop = self.chunking.bounds(self.next_chunk)
        return len(self.frame_idxs[start:stop]) * self.frame_bytes

    def idle(self, now: float) -> bool:
        """No credit and nothing sent for a while: its client is not taking chunks."""
        return self.credit <= 0 and not self.decoding and now - self.last_sent >= CACHE_IDLE_S


@attrs.define
class _Client:
    hello: bool = False
    requests: dict[int, _Request] = attrs.field(factory=dict)
    #: Request ids waiting for their video to open, with the ticket.
    opening: dict[int, int] = attrs.field(factory=dict)
    #: Shared-memory slots, once the client asked for shared memory.
    slots: Optional[SlotBook] = None


@attrs.frozen
class _Opening:
    client: bytes
    message: Union[Request, InfoRequest, FrameTimesRequest]
    at: float


#: Marks a client queue that overflowed: the client is dropped when its turn comes.
_FLOODED = object()


class ServerState:
    """The server's decisions, driven by its driver: messages and outcomes in, actions out.

    Args:
        config: the server's limits and policies.
        version: the package version, sent in ``welcome`` and ``pong``.
        shm_offer: the shared-memory probe offered in ``welcome`` (None: no shared memory).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        version: str,
        shm_offer: Optional[ShmProbe] = None,
        root_spellings: Sequence[str] = (),
        now: float = 0.0,
    ) -> None:
        self.config = config
        #: How the driver spells the root folder (real and absolute path), hidden from error messages.
        self.root_spellings = tuple(root_spellings)
        self.version = version
        self.shm_offer = shm_offer
        self.stopping = False
        self._clients: dict[bytes, _Client] = {}
        self._round: deque[_Request] = deque()
        self._inbox: "OrderedDict[bytes, deque[Any]]" = OrderedDict()
        self._inbox_bytes: dict[bytes, int] = {}
        self.inbox_bytes_limit = CLIENT_QUEUE_REQUESTS * protocol.max_header_bytes(config.max_request_frames)
        #: Silenced connection -> messages thrown away since.
        self._silenced: "OrderedDict[bytes, int]" = OrderedDict()
        self._opening: dict[int, _Opening] = {}
        self._tickets = 0
        self._resized: dict[tuple[bytes, int], int] = {}
        self._last_chunk_at = now
        self._trimmed = True
        #: Messages of silenced connections thrown away since the heap was last handed back;
        #: the count the last tick saw, since when it has not changed, and the next hand-back allowed.
        self._discarded = 0
        self._discards_seen = 0
        self._discards_quiet_since = now
        self._next_trim = now
        #: Free slots of clients that left, for the next ones.
        self.spares = Spares()
        #: What to read around: video, grayscale, frame, frame count, frame bytes, and whether it
        #: was a step back.
        self._around: Optional[tuple[Video, bool, int, int, int, bool]] = None
        self._around_at = 0.0
        #: The last small request's video, grayscale and last frame.
        self._last_small: Optional[tuple[Video, bool, int]] = None
        self._alone_since = now  # when the last client left (or the server started)
        self._next_ping = now + config.ping_interval

    # -- reading ---------------------------------------------------------------------------------

    def receive(self, client: bytes, parts: "list[Any]") -> bool:
        """Queue what ``client`` sent, not decoded yet (reading stays cheap).

        A client over its queue's bound (``CLIENT_QUEUE`` messages, :attr:`inbox_bytes_limit`
        bytes) is dropped with an error on its turn, and silenced: what its connection sends
        from then on is thrown away unread, and after :data:`DISCARDS_BEFORE_DISCONNECT` such
        messages the connection is to be cut (:meth:`disconnect_due`).

        Args:
            client: the connection's identity.
            parts: the parts of its multipart message, as received.

        Returns:
            True if queued (or it just overflowed the queue); False if thrown away (silenced).
        """
        if client in self._silenced:
            self._silenced[client] += 1
            self._discarded += 1
            return False
        queue = self._inbox.get(client)
        if queue is None:
            queue = self._inbox[client] = deque()
        queued = self._inbox_bytes.get(client, 0) + sum(len(part) for part in parts)
        if len(queue) < CLIENT_QUEUE and queued <= self.inbox_bytes_limit:
            queue.append(parts)
            self._inbox_bytes[client] = queued
        else:
            queue.clear()
            queue.append(_FLOODED)
            self._inbox_bytes[client] = 0
            self._silenced[client] = 0
            while len(self._silenced) > MAX_SILENCED:
                self._silenced.popitem(last=False)
        return True

    def disconnect_due(self, client: bytes) -> bool:
        """Whether the driver should now cut ``client``'s connection: True exactly once, when a
        silenced connection has sent :data:`DISCARDS_BEFORE_DISCONNECT` messages since it was
        told it was dropped (its messages already queued after the cut are thrown away; ZeroMQ
        gives the peer a new identity if it reconnects)."""
        return self._silenced.get(client) == DISCARDS_BEFORE_DISCONNECT

    @property
    def has_messages(self) -> bool:
        """Whether messages wait to be handled."""
        return bool(self._inbox)

    def queued_messages(self, client: bytes) -> int:
        """Messages of ``client`` read but not handled yet."""
        return len(self._inbox.get(client, ()))

    def queued_bytes(self, client: bytes) -> int:
        """Bytes of ``client``'s queued messages not decoded yet."""
        return self._inbox_bytes.get(client, 0)

    def cancel_queued(self, client: bytes, request_id: int) -> bool:
        """Asked between frames of a decode: is a cancel of this request queued (or was its
        client dropped for flooding)? Other messages wait for their turn.

        Returns:
            True if the decode should stop (report :meth:`chunk_interrupted`).
        """
        queue = self._inbox.get(client)
        for pos in range(len(queue) if queue is not None else 0):
            entry = self._decoded(client, queue, pos)  # type: ignore[arg-type]
            if entry is _FLOODED or (isinstance(entry, Cancel) and entry.request_id == request_id):
                return True
        return False

    def _decoded(self, client: bytes, queue: "deque[Any]", pos: int) -> Any:
        """The entry at ``queue[pos]``, parsed in place: a message, a ProtocolError, or _FLOODED."""
        entry = queue[pos]
        if not isinstance(entry, list):
            return entry
        self._inbox_bytes[client] = self._inbox_bytes.get(client, 0) - sum(len(part) for part in entry)
        try:
            message, _payload = protocol.parse(entry, max_parts=1, max_bin_len=protocol.INDEX_BYTES * self.config.max_request_frames)
        except ProtocolError as exc:
            message = exc
        queue[pos] = message
        return message

    # -- handling --------------------------------------------------------------------------------

    def handle_round(self, now: float) -> list[Action]:
        """Handle one fair round: each client's share of its queue (``CLIENT_SHARE`` small
        messages, or one that opens or indexes a video). The next round starts with the next client.

        Args:
            now: the time.

        Returns:
            What to do: answers to send, videos to open (:class:`OpenVideo`), requests and
            clients to forget, :class:`Stop`.
        """
        actions: list[Action] = []
        for client in list(self._inbox):
            queue = self._inbox.get(client)
            budget = CLIENT_SHARE
            while queue and budget > 0 and not self.stopping:
                entry = self._decoded(client, queue, 0)
                queue.popleft()
                if entry is _FLOODED:
                    log.warning("client %s sent more than the server handles without waiting for answers; dropped", client.hex())
                    actions.append(self._error(client, None, ServerError(FLOODED_MESSAGE)))
                    actions += self.client_gone(client, "flooded the server", now)
                    budget = 0
                elif isinstance(entry, ProtocolError):
                    log.warning("client %s sent a malformed message: %s", client.hex(), entry)
                    actions.append(self._error(client, None, entry))
                    budget -= 1
                else:
                    budget -= CLIENT_SHARE if isinstance(entry, (Hello, Request, InfoRequest, FrameTimesRequest)) else 1
                    actions += self._handle(client, entry, now)
            if not queue:
                self._inbox.pop(client, None)
                self._inbox_bytes.pop(client, None)
            else:
                self._inbox.move_to_end(client)
        return actions

    def _handle(self, client: bytes, message: protocol.Message, now: float) -> list[Action]:
        state = self._clients.setdefault(client, _Client())
        if isinstance(message, Hello):
            if message.version != PROTOCOL_VERSION:
                return [
                    self._error(
                        client,
                        None,
                        ProtocolError(
                            f"protocol version {message.version} is not supported; "
                            f"this server ({self.version}) speaks version {PROTOCOL_VERSION}"
                        ),
                    )
                ]
            state.hello = True
            welcome = Welcome(
                version=PROTOCOL_VERSION, server=self.version, shm=self.shm_offer, max_request_frames=self.config.max_request_frames
            )
            return [Send(client, welcome)]
        if isinstance(message, Ping):
            return [Send(client, Pong(request_id=message.request_id, server=self.version))]
        if not state.hello:
            return [self._error(client, None, UnknownClientError("send hello before anything else"))]
        if isinstance(message, Request):  # after what the release and the cancel it carries say
            if message.release and state.slots is not None:
                state.slots.release(message.release)
            replaced = self._cancel(client, state, message.replaces, now) if message.replaces is not None else []
            return replaced + self._start(client, state, message, now)
        if isinstance(message, Credit):
            req = state.requests.get(message.request_id)
            if req is not None:
                req.credit = min(req.credit + message.chunks, self.config.max_window)
                req.ahead_at = now + READ_AHEAD_DELAY_S if req.request.ahead else 0.0
            return []
        if isinstance(message, Release):
            if state.slots is not None:
                state.slots.release(message.slots)
            return []
        if isinstance(message, Bye):
            if state.slots is not None:
                state.slots.release(message.slots)
            return self.client_gone(client, "said goodbye", now)
        if isinstance(message, Cancel):
            return self._cancel(client, state, message.request_id, now)
        if isinstance(message, InfoRequest):
            return [self._open(client, message, now, info=True)]
        if isinstance(message, FrameTimesRequest):
            return [self._open(client, message, now, frame_times=True)]
        if isinstance(message, protocol.Stop):
            if self.config.allow_stop:
                self.stopping = True
                return [Stop("a client asked it to stop")]
            return [self._error(client, None, ServerError("this server does not accept stop"))]
        return [self._error(client, None, ProtocolError(f"{type(message).__name__} is not a client message"))]

    def _cancel(self, client: bytes, state: _Client, request_id: int, now: float) -> list[Action]:
        ticket = state.opening.pop(request_id, None)
        if ticket is not None:
            self._opening.pop(ticket, None)
        req = state.requests.pop(request_id, None)
        if req is None:
            return []
        self._round.remove(req)
        self._log(req, now, "cancelled")
        return [ForgetRequest(client, request_id)]

    def _open(
        self,
        client: bytes,
        message: Union[Request, InfoRequest, FrameTimesRequest],
        now: float,
        info: bool = False,
        frame_times: bool = False,
    ) -> OpenVideo:
        self._tickets += 1
        self._opening[self._tickets] = _Opening(client, message, now)
        return OpenVideo(self._tickets, message.video, info=info, frame_times=frame_times)

    def _start(self, client: bytes, state: _Client, request: Request, now: float) -> list[Action]:
        """Check what can be checked before opening the video; then open it."""
        cfg = self.config
        rid = request.request_id
        try:
            if rid in state.requests or rid in state.opening:
                raise ProtocolError(f"request id {rid} is already in use")
            if len(state.requests) + len(state.opening) >= cfg.max_requests_per_client:
                raise ServerError(f"too many concurrent requests from this client (limit {cfg.max_requests_per_client})")
            for name in ("frames_per_chunk", "ahead_frames_per_chunk"):
                if getattr(request, name) > cfg.max_frames_per_chunk:
                    raise ServerError(
                        f"{name} {getattr(request, name)} exceeds this server's limit of {cfg.max_frames_per_chunk}"
                    )
            count = protocol.selection_count(request.frame_idxs)
            if count is not None:  # counted before anything is opened or built
                self._check_count(count)
            if request.ahead and (count is None or request.ahead >= count):
                raise ProtocolError(
                    f"ahead={request.ahead} must leave at least one frame asked for, of the {count or 'all'} frames named"
                )
        except AsyncFramesError as exc:
            return self._refuse(client, request, exc)
        action = self._open(client, request, now)
        state.opening[rid] = action.ticket
        return [action]

    def _refuse(self, client: bytes, message: Union[Request, InfoRequest, FrameTimesRequest], exc: BaseException) -> list[Action]:
        what = "info" if isinstance(message, InfoRequest) else "frame_times" if isinstance(message, FrameTimesRequest) else "request"
        log.info("client=%s %s video=%s refused: %s", client.hex(), what, message.video.filename, exc)
        return [self._error(client, message.request_id, exc)]

    def video_opened(self, ticket: int, outcome: "VideoFacts | BaseException", now: float) -> list[Action]:
        """The outcome of :class:`OpenVideo` ``ticket``.

        Args:
            ticket: the action's ticket.
            outcome: the video's facts, or the exception opening it raised.
            now: the time.

        Returns:
            The answer (an ``info_reply`` or ``frame_times_reply``; nothing for a request taken on, which starts
            sending on :meth:`next_chunk`) or the error that refuses it. Nothing if the
            request was cancelled or its client left meanwhile.
        """
        opening = self._opening.pop(ticket, None)
        if opening is None:  # cancelled, or its client is gone
            return []
        client, message = opening.client, opening.message
        state = self._clients.get(client)
        if state is None:
            return []
        if isinstance(message, Request):
            state.opening.pop(message.request_id, None)
        if isinstance(outcome, BaseException):
            return self._refuse(client, message, outcome)
        if isinstance(message, InfoRequest):
            if outcome.info is None:
                return self._refuse(client, message, ServerError("the video's description is missing"))
            info = attrs.evolve(outcome.info, filename=message.video.filename)
            return [Send(client, InfoReply(request_id=message.request_id, info=info))]
        if isinstance(message, FrameTimesRequest):
            times = outcome.frame_times
            if times is None:
                return self._refuse(client, message, ServerError("the video's frame times are missing"))
            reply = FrameTimesReply(
                request_id=message.request_id,
                pts_seconds=protocol.times_bytes(times.pts_seconds),
                duration_seconds=protocol.times_bytes(times.duration_seconds),
                num_frames_from_header=times.num_frames_from_header,
            )
            return [Send(client, reply)]
        try:
            req = self._new_request(client, message, outcome, now)
        except AsyncFramesError as exc:
            return self._refuse(client, message, exc)
        if message.shm and self.shm_offer is not None and state.slots is None:
            state.slots = SlotBook(max_slots=self.config.max_window + SLOTS_BEYOND_WINDOW)
        state.requests[message.request_id] = req
        self._round.append(req)
        self._rebalance(now)
        return []

    def _new_request(self, client: bytes, request: Request, facts: VideoFacts, now: float) -> _Request:
        """The record of ``request``; raises what refuses it (a limit, a bad index)."""
        cfg = self.config
        idxs = protocol.selection_indices(request.frame_idxs, facts.frame_count)
        self._check_count(len(idxs))
        asked = len(idxs) - request.ahead
        check_frame_idxs(idxs[:asked], facts.frame_count, request.video.filename)
        if request.ahead:
            idxs = _within(idxs, asked, facts.frame_count)
        frame_bytes = math.prod(facts.frame_shape)
        chunking = protocol.Chunking(request.frames_per_chunk, asked, request.ahead_frames_per_chunk if request.ahead else 0)
        most = min(chunking.most, max(len(idxs), 1))
        chunk_bytes = most * frame_bytes
        limit = min(cfg.max_chunk_bytes, cfg.client_inline_bytes, cfg.max_inline_bytes)
        if chunk_bytes > limit:
            raise ServerError(
                f"a chunk of {most} frames of this video is {chunk_bytes / 2**20:.3g} MiB, "
                f"over this server's limit of {limit / 2**20:.3g} MiB; ask for fewer frames per chunk"
            )
        cache = request_cache(idxs) if min(cfg.request_cache_bytes, cfg.total_cache_bytes) > 0 else None
        return _Request(
            client=client,
            request=request,
            grayscale=facts.grayscale,
            frame_idxs=idxs,
            frame_shape=facts.frame_shape,
            frame_count=facts.frame_count,
            identity=facts.identity,
            credit=min(request.window, cfg.max_window),
            started=now,
            last_sent=now,
            cache=cache,
            cache_bytes=min(cfg.request_cache_bytes, cfg.total_cache_bytes) if cache is not None else 0,
            asked=asked,
            chunking=chunking,
        )

    def _check_count(self, count: int) -> None:
        limit = self.config.max_request_frames
        if count > limit:
            raise ServerError(f"request for {count} frames exceeds this server's limit of {limit}")

    # -- sending chunks --------------------------------------------------------------------------

    def next_chunk(self, now: float, queued: Mapping[bytes, int]) -> Optional[Decode]:
        """The next chunk to decode: of the next request (round-robin) that has credit and room
        to send it, in a shared slot when one can be had, else inline (None: nothing can go now).

        Args:
            now: the time.
            queued: inline chunk bytes still queued in ZeroMQ, per client.

        Returns:
            The chunk to decode (its request is busy until its outcome is reported with
            :meth:`chunk_decoded`, :meth:`chunk_failed` or :meth:`chunk_interrupted`), or None.
        """
        total = sum(queued.values())
        for _ in range(len(self._round)):
            req = self._round[0]
            self._round.rotate(-1)
            if req.credit <= 0 or req.decoding or req.held_back(now) or not self._may_send(req, now, queued, total):
                continue
            chunk_bytes = req.next_chunk_bytes()
            slots = self._slots_for(req)
            if slots is not None and chunk_bytes and now >= req.shm_retry_at:
                if not slots.fits(chunk_bytes) and self.spares.fitting(chunk_bytes) is None and slots.can_add():
                    self._borrow_idle_slot(req.client, chunk_bytes)
                taken = slots.take(chunk_bytes, self.config.max_shared_bytes - self._shared_bytes(), self.spares)
                if taken is not None:
                    return self._begin(req, now, *taken)
                req.shm_retry_at = now + ROOM_RETRY_S
            if self._inline_room(req, queued, total):
                return self._begin(req, now, None, [])
        return None

    def _borrow_idle_slot(self, client: bytes, nbytes: int) -> None:
        """Make the smallest free slot of at least ``nbytes`` of a client with no request in
        flight a spare (a GUI that keeps one video open while a second is streamed): warm
        memory for ``client``, instead of a new slot. Its owner is told it is retired."""
        found = [
            (size, other, slot)
            for other, state in self._clients.items()
            if other != client and not state.requests and state.slots is not None
            for slot, size in state.slots.free.items()
            if size >= nbytes and slot in state.slots.fds
        ]
        if found:
            _, other, slot = min(found)
            key = self.spares.keep(*self._clients[other].slots.give_up(slot))  # type: ignore[union-attr]
            self.spares.moved.append((other, slot, key))

    def _slots_for(self, req: _Request) -> Optional[SlotBook]:
        state = self._clients.get(req.client)
        return state.slots if state is not None and req.request.shm else None

    def _may_send(self, req: _Request, now: float, queued: Mapping[bytes, int], total: int) -> bool:
        """Whether ``req``'s next chunk can go now: in a shared slot (worth a try), or inline
        within the server's and its client's caps on bytes queued in ZeroMQ."""
        if self._slots_for(req) is not None and now >= req.shm_retry_at:
            return True
        return self._inline_room(req, queued, total)

    def _inline_room(self, req: _Request, queued: Mapping[bytes, int], total: int) -> bool:
        cfg = self.config
        client_cap = min(cfg.client_inline_bytes, self.window_bytes(req.client))
        return inline_room(total, queued.get(req.client, 0), req.next_chunk_bytes(), cfg.max_inline_bytes, client_cap)

    def window_bytes(self, client: bytes) -> int:
        """What credit lets ``client`` have in flight: its requests' windows of full chunks.

        A client that returns credit without reading (a liar) still cannot make more than
        this wait in ZeroMQ for it; an honest client never has more queued than this.
        """
        state = self._clients.get(client)
        reqs = state.requests.values() if state is not None else ()
        return sum(min(r.request.window, self.config.max_window) * r.chunking.most * r.frame_bytes for r in reqs)

    def _shared_bytes(self) -> int:
        """Shared memory held for all clients' chunk slots, and as spares."""
        return self.spares.nbytes + sum(state.slots.nbytes for state in self._clients.values() if state.slots is not None)

    def _begin(self, req: _Request, now: float, slot: Optional[SlotUse], closed: list[int]) -> Decode:
        req.decoding = True
        req.last_sent = self._last_chunk_at = now
        self._trimmed = False
        self._rebalance(now)
        start, stop = req.chunking.bounds(req.next_chunk)
        frames = _frames_at(req.frame_idxs, start, stop)
        cache = None
        if req.cache is not None:
            later = _frames_at(req.frame_idxs, stop, stop + self.config.cache_lookahead_frames)
            cache = CacheUse(req.cache_bytes, req.cache, later)
        return Decode(
            client=req.client,
            request_id=req.rid,
            video=req.request.video,
            grayscale=req.grayscale,
            frames=frames,
            shape=(len(frames), *req.frame_shape),
            identity=req.identity,
            recent=req.asked <= self.config.recent_request_frames,
            slot=slot,
            cache=cache,
            close_slots=tuple(closed),
            close_spares=tuple(self.spares.take_closed()),
            to_spares=tuple(self.spares.take_moved()),
        )

    def _decoding(self, decode: Decode) -> Optional[_Request]:
        state = self._clients.get(decode.client)
        req = state.requests.get(decode.request_id) if state is not None else None
        if req is None or not req.decoding:
            return None
        return req

    def slot_made(self, decode: Decode, fd: int) -> None:
        """The driver made the buffer of ``decode``'s new slot; ``fd``: its memfd, named in chunks."""
        slots = self._clients[decode.client].slots if decode.client in self._clients else None
        if slots is not None and decode.slot is not None:
            slots.fds[decode.slot.slot] = fd

    def slot_failed(self, decode: Decode, exc: BaseException, now: float, queued: Mapping[bytes, int]) -> Optional[Decode]:
        """The new slot of ``decode`` could not be made (no shared memory now): the chunk goes
        inline if it has room (returned), else waits (None)."""
        log.warning("no shared-memory slot for client %s: %s", decode.client.hex(), exc)
        req = self._decoding(decode)
        state = self._clients.get(decode.client)
        if state is not None and state.slots is not None and decode.slot is not None:
            state.slots.unmake(decode.slot.slot)
        if req is None:
            return None
        req.shm_retry_at = now + ROOM_RETRY_S
        if self._inline_room(req, queued, sum(queued.values())):
            return attrs.evolve(decode, slot=None)
        req.decoding = False
        return None

    def chunk_decoded(self, decode: Decode, now: float) -> list[Action]:
        """``decode`` is done.

        Args:
            decode: the action from :meth:`next_chunk`, its frames decoded.
            now: the time.

        Returns:
            The chunk to send (``payload``: the decoded frames follow inline; else its slot is
            named), and :class:`ForgetRequest` after the request's last chunk.
        """
        req = self._decoding(decode)
        if req is None:
            self._give_back(decode)
            return []
        req.decoding = False
        where = None
        state = self._clients[decode.client]
        if decode.slot is not None and state.slots is not None:
            slot = decode.slot.slot
            where = ShmSlot(slot=slot, fd=state.slots.fds.get(slot, 0), size=decode.slot.size, retired=state.slots.take_retired())
        last = req.next_chunk + 1 >= req.n_chunks
        chunk = protocol.chunk_header(req.rid, req.next_chunk, last, decode.frames, decode.shape, shm=where)
        req.next_chunk += 1
        req.credit -= 1
        if req.request.ahead:
            req.ahead_at = now + READ_AHEAD_DELAY_S
        actions: list[Action] = [Send(decode.client, chunk, payload=where is None)]
        if last:
            actions += self._finish(req, now, "done")
        if decode.recent and decode.frames:
            video, i = req.request.video, decode.frames[-1]
            last = self._last_small
            # The client may be up to a window of chunks behind what was read ahead for it.
            behind = req.request.window * req.chunking.most if req.request.ahead else 0
            back = last is not None and last[:2] == (video, req.grayscale) and 0 < last[2] - i <= STEP_BACK_FRAMES + behind
            self._last_small = (video, req.grayscale, i)
            if back or not req.request.ahead:  # the frames after it are already read ahead
                self._around = (video, req.grayscale, i, req.frame_count, req.frame_bytes, back)
                self._around_at = now + READ_AROUND_DELAY_S
        return actions

    def chunk_failed(self, decode: Decode, exc: BaseException, now: float) -> list[Action]:
        """``decode`` failed with ``exc``: the request ends with that error (an internal one also
        makes the video's open readers suspect)."""
        self._give_back(decode)
        req = self._decoding(decode)
        if req is None:
            return []
        req.decoding = False
        actions: list[Action] = []
        if not isinstance(exc, AsyncFramesError):
            log.error("internal error serving request", exc_info=exc)
            actions.append(ForgetVideo(decode.video))
        actions.append(self._error(decode.client, decode.request_id, exc))
        return actions + self._finish(req, now, f"failed: {exc}")

    def chunk_interrupted(self, decode: Decode, now: float) -> list[Action]:
        """``decode`` stopped because a cancel of its request (or a flood) is queued: nothing is
        sent; the queued message is handled on its turn."""
        self._give_back(decode)
        req = self._decoding(decode)
        if req is not None:
            req.decoding = False
        return []

    def _give_back(self, decode: Decode) -> None:
        state = self._clients.get(decode.client)
        if decode.slot is not None and state is not None and state.slots is not None:
            state.slots.release([decode.slot.slot])

    def _finish(self, req: _Request, now: float, outcome: str) -> list[Action]:
        state = self._clients.get(req.client)
        if state is not None:
            state.requests.pop(req.rid, None)
        if req in self._round:
            self._round.remove(req)
        self._log(req, now, outcome)
        return [ForgetRequest(req.client, req.rid)]

    def _log(self, req: _Request, now: float, outcome: str) -> None:
        sent = min(len(req.frame_idxs), req.chunking.bounds(req.next_chunk)[0])
        log.info(
            "client=%s video=%s frames=%d/%d chunks=%d time=%.3fs %s",
            req.client.hex(),
            req.request.video.filename,
            sent,
            len(req.frame_idxs),
            req.next_chunk,
            now - req.started,
            outcome,
        )

    # -- caches, pings, idling -------------------------------------------------------------------

    def _rebalance(self, now: float) -> None:
        """Give each request with a cache its share (see :func:`cache_shares`); changed shares
        are handed out as :class:`ResizeCache` by :meth:`tick`."""
        cached = [req for req in self._round if req.cache is not None]
        if not cached:
            return
        idle = [req.idle(now) for req in cached]
        cfg = self.config
        active_share, idle_share = cache_shares(cfg.total_cache_bytes, cfg.request_cache_bytes, idle.count(False), idle.count(True))
        for req, is_idle in zip(cached, idle):
            share = idle_share if is_idle else active_share
            if req.cache_bytes != share:
                req.cache_bytes = share
                self._resized[(req.client, req.rid)] = share

    def tick(self, now: float) -> list[Action]:
        """Between chunks: pings when due, cache shares, and freeing kept buffers once idle."""
        actions: list[Action] = []
        if now >= self._next_ping:
            self._next_ping = now + self.config.ping_interval
            actions += [Send(client, Ping(request_id=0)) for client in self._clients]
        self._rebalance(now)
        for (client, rid), share in self._resized.items():
            state = self._clients.get(client)
            if state is not None and rid in state.requests:
                actions.append(ResizeCache(client, rid, share))
        self._resized.clear()
        if now - self._last_chunk_at >= BUFFERS_IDLE_S:
            actions.append(FreeBuffers(release_memory=not self._trimmed))
            self._trimmed = True
        actions += self._release_flood_memory(now)
        if self.spares.kept and now - self._last_chunk_at >= SPARES_IDLE_S:
            actions.append(CloseSpares(tuple(self.spares.close_all())))
        if self._clients or self._inbox:
            self._alone_since = now
        elif self.config.idle_exit and now - self._alone_since >= self.config.idle_exit and not self.stopping:
            self.stopping = True  # a per-user server nobody used for a while
            actions.append(Stop(f"no client for {self.config.idle_exit:g} s"))
        return actions

    def read_around(self, now: float) -> Optional[ReadAround]:
        """What to read around the last small request, once it has been quiet for
        ``READ_AROUND_DELAY_S`` (call when no chunk can go): a GUI stepping back or forth
        then finds its next frame ready.

        After a step or jump forward, only the frames after it, from the next one on (as
        many as the whole span): the decoder is already there, so each costs one frame's
        decoding, and a person stepping forward finds them ready even when the next step
        interrupts the reading. Frames before it would need a seek back, and a step that
        interrupts that reading finds the decoder moved away from where it steps to.
        After a step back (``STEP_BACK_FRAMES`` or fewer), the frames before it first (from
        the span's start, in decoding order), then those after it; a jump back is read
        around like a jump forward."""
        if self._around is None or now < self._around_at:
            return None
        video, gray, i, frame_count, frame_bytes, back = self._around
        self._around = None
        cfg = self.config
        span = min(cfg.read_around_frames, cfg.recent_cache_bytes // 4 // max(frame_bytes, 1))
        if not back:
            return ReadAround(video, gray, tuple(range(i + 1, min(frame_count, i + span + 1))))
        lo, hi = max(0, i - span // 2), min(frame_count, i + span // 2 + 1)
        return ReadAround(video, gray, tuple(range(lo, i)) + tuple(range(i + 1, hi)))

    def describe(self, now: float, queued: Mapping[bytes, int]) -> list[str]:
        """What the server is holding and why it waits, one line per item: for a server that
        seems stuck (``kill -USR1``), beside its stacks.

        Args:
            now: the time.
            queued: inline chunk bytes still queued in ZeroMQ, per client.

        Returns:
            Lines: the loop's wait and totals, then each client (greeted, messages and bytes
            waiting, silenced), each request (chunk, credit, decoding, held back, shared-memory
            retry, whether its next chunk may go now) and each connection silenced for flooding.
        """
        total = sum(queued.values())
        lines = [
            f"wait {self.wait_s(now, queued):.3f} s; {len(self._round)} requests in the round; "
            f"inline bytes queued {total}; shared bytes {self._shared_bytes()}; next ping in {self._next_ping - now:.1f} s"
        ]
        for client in sorted(set(self._clients) | set(self._inbox)):
            state = self._clients.get(client)
            lines.append(
                f"client {client.hex()}: hello={state is not None and state.hello} inbox={self.queued_messages(client)} "
                f"messages/{self.queued_bytes(client)} bytes queued_inline={queued.get(client, 0)}"
                + (f" silenced={self._silenced[client]}" if client in self._silenced else "")
            )
            for req in (state.requests.values() if state is not None else ()):
                lines.append(
                    f"  request {req.rid} {req.request.video.filename}: chunk {req.next_chunk} credit={req.credit} "
                    f"decoding={req.decoding} held_back={req.held_back(now)} shm_retry_in={req.shm_retry_at - now:.3f} s "
                    f"next_chunk_bytes={req.next_chunk_bytes()} may_send={self._may_send(req, now, queued, total)} "
                    f"in_round={req in self._round} age={now - req.started:.1f} s"
                )
        gone = [c.hex() for c in self._silenced if c not in self._clients and c not in self._inbox]
        if gone:
            lines.append(f"silenced connections no longer known: {len(gone)} (last {', '.join(gone[-3:])})")
        return lines

    def _release_flood_memory(self, now: float) -> list[Action]:
        """Hand back the heap a flood held once it was thrown away: every
        :data:`TRIM_AFTER_DISCARDS` discarded messages while it goes on, and once more when it
        has been quiet for :data:`TRIM_EVERY_S`; at most once per :data:`TRIM_EVERY_S`."""
        if not self._discarded:
            return []
        if self._discarded != self._discards_seen:
            self._discards_seen, self._discards_quiet_since = self._discarded, now
        due = self._discarded >= TRIM_AFTER_DISCARDS or now - self._discards_quiet_since >= TRIM_EVERY_S
        if not due or now < self._next_trim:
            return []
        self._discarded = self._discards_seen = 0
        self._next_trim = now + TRIM_EVERY_S
        return [ReleaseMemory()]

    def wait_s(self, now: float, queued: Mapping[bytes, int]) -> float:
        """How long the loop may sleep: 0 while messages wait or a chunk can go; else until
        reading around, a ping or a look for room is due, at most ``IDLE_WAIT_S``."""
        if self._inbox:
            return 0.0
        total = sum(queued.values())
        waiting = [r for r in self._round if r.credit > 0 and not r.decoding]
        if any(not r.held_back(now) and self._may_send(r, now, queued, total) for r in waiting):
            return 0.0
        longest = ROOM_RETRY_S if any(r.credit > 0 for r in self._round) else IDLE_WAIT_S
        due = [longest, self._next_ping - now] + [r.ahead_at - now for r in waiting if r.held_back(now)]
        if self._around is not None:
            due.append(self._around_at - now)
        return max(0.0, min(due))

    # -- clients ---------------------------------------------------------------------------------

    def send_failed(self, send: Send, busy: bool) -> list[Action]:
        """``send`` could not be queued: its client is gone, or (``busy``) its queue is full.

        Credit keeps queues short, so a full queue means a client that stopped reading: it
        is dropped; a ping that does not fit is simply skipped.
        """
        if busy and isinstance(send.message, Ping):
            return []
        return self.client_gone(send.client, "stopped reading (queue full)" if busy else "disconnected")

    def client_gone(self, client: bytes, why: str, now: Optional[float] = None) -> list[Action]:
        """Drop ``client``: its requests end unanswered, its slots close (``now``: for the log)."""
        state = self._clients.pop(client, None)
        if state is None:
            return []
        for ticket in state.opening.values():
            self._opening.pop(ticket, None)
        for ticket in [t for t, o in self._opening.items() if o.client == client]:  # info requests
            del self._opening[ticket]
        for req in state.requests.values():
            if req in self._round:
                self._round.remove(req)
        # A request being decoded is logged as abandoned here; its outcome, when it comes, is ignored.
        for req in state.requests.values():
            self._log(req, req.last_sent if now is None else now, f"abandoned: client {why}")
        return [ForgetClient(client, spares=self._keep_spares(state.slots))]

    def _keep_spares(self, slots: Optional[SlotBook]) -> tuple[tuple[int, int], ...]:
        """(slot, spare key) of a leaving client's free slots, now spares (lent ones close:
        the caller may still hold arrays over them)."""
        if slots is None or self.stopping:
            return ()
        return tuple((slot, self.spares.keep(size, slots.fds[slot])) for slot, size in slots.free.items() if slot in slots.fds)

    def shutdown(self, reason: str) -> list[Action]:
        """The server is going away: tell every client that said hello or has requests."""
        actions: list[Action] = []
        for client, state in self._clients.items():
            if state.requests or state.hello:
                actions.append(Send(client, Shutdown(reason=reason)))
        actions += [ForgetClient(client) for client in self._clients]
        self._clients.clear()
        self._round.clear()
        self._opening.clear()
        self.stopping = True
        return actions

    def _error(self, client: bytes, request_id: Optional[int], exc: BaseException) -> Send:
        return Send(client, wire_error(request_id, exc, self.root_spellings))

    # -- looking in (tests, logs) ------------------------------------------------------------------

    def requests_of(self, client: bytes) -> list[int]:
        """Ids of ``client``'s requests in flight."""
        state = self._clients.get(client)
        return sorted(state.requests) if state is not None else []

    def credit_of(self, client: bytes, request_id: int) -> int:
        """Chunks ``client``'s request may still send now."""
        return self._clients[client].requests[request_id].credit

    def credits(self) -> dict[tuple[bytes, int], int]:
        """Credit of every request in flight, by (client, request id)."""
        return {(client, rid): req.credit for client, state in list(self._clients.items()) for rid, req in list(state.requests.items())}

    def slots_of(self, client: bytes) -> Optional[SlotBook]:
        """``client``'s shared slots (None: it has none)."""
        state = self._clients.get(client)
        return state.slots if state is not None else None

    @property
    def clients(self) -> list[bytes]:
        """Clients the server knows."""
        return list(self._clients)
