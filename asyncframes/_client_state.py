"""Everything that decides what the client sends and hands to the caller lives here.

No ZeroMQ, os, time, threads or sockets: the driver (:mod:`asyncframes._client`)
owns those, feeds this module what happened (a message, a connection event, the
chunk the caller took) and carries out what it answers (send these messages,
replace this server's socket, raise this error). Only numpy, attrs and the
message classes of :mod:`asyncframes._protocol` are imported. A rule of the
client's side of the protocol is changed here, and tested in
``tests/test_client_state.py`` without a socket.

Three things are kept here:

* a :class:`Link` per server: the health of its connection (``NEW`` →
  ``CONNECTED`` → ``GREETED``; lost or shut down: back to ``NEW`` with a new
  *generation*, i.e. a fresh socket) and what its welcome said;
* a :class:`Stream` per request in flight: how its chunks are dealt over the
  servers (by :mod:`asyncframes._deal`: chunk *k* from server *k mod n* while the
  servers keep the same pace, in proportion to their paces otherwise, dealt again
  when a slow one would hold the caller up), what each chunk must hold, and why it
  ended; a request for one frame also reads the frames after it ahead, and the
  caller's next request for the next frame takes that chunk (:meth:`ClientState.continues`);
* the :class:`ClientState` holding them, which matches replies to requests,
  files what arrives, hands chunks back in order and says what is due:
  a :class:`~protocol.Credit` per chunk taken, a :class:`~protocol.Release` for
  shared slots let go of, a :class:`~protocol.Cancel` when a request is dropped.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from typing import Optional, Sequence, Union

import attrs
import numpy as np

from . import _deal
from . import _protocol as protocol
from ._deal import Pace
from ._protocol import ConnectionEvent
from ._video import Video
from .errors import (
    AsyncFramesError,
    AuthenticationError,
    ProtocolError,
    RequestCancelledError,
    ServerDiedError,
    ServerError,
    ServerShutdownError,
    UnknownClientError,
    error_from_wire,
)

#: Frame indices as the client keeps them: a range or a one-dimensional integer array (None: every frame).
Indices = Optional[Union[range, np.ndarray]]

#: Frames read ahead come in chunks of at most this many bytes (the frame size known from the
#: video's info or an earlier chunk of it; unknown: one frame a chunk) and at most
#: :data:`AHEAD_FRAMES_PER_CHUNK` frames: a person stepping forward then takes most steps
#: from the chunk in hand, with no message to receive or send (a step that must take a
#: chunk costs ~0.7 ms of Python on a CPU gone cold between steps; one from the chunk in
#: hand, a fraction of that), while a chunk of small frames is decoded well within the
#: pause before the first step (32 frames of 384x384: ~15 ms).
AHEAD_CHUNK_BYTES = 16 << 20
AHEAD_FRAMES_PER_CHUNK = 32
#: Frame sizes remembered, by video (for the size of chunks read ahead).
_KNOWN_SIZES = 64


class Health(enum.Enum):
    """Where a connection to one server stands."""

    NEW = "new"  # a fresh socket: nothing heard yet
    CONNECTED = "connected"  # the ZMTP handshake succeeded; no welcome yet
    GREETED = "greeted"  # the server welcomed us: requests may be sent


@attrs.frozen
class Send:
    """A message to send to server ``server`` while its connection is generation ``generation``.

    ``must``: the protocol needs it (a request, a credit): not being able to queue it in
    time is an error. Otherwise it is sent on a best-effort basis (a cancel, a release),
    because losing it is harmless or repaired by a reconnect.
    """

    server: int
    generation: int
    message: protocol.Message
    must: bool = True


class Admit(enum.Enum):
    """What becomes of a message about to be sent, given its connection's state.

    After a connection is lost, the next message it carries is always a Hello: a
    message that opens a conversation (a request, an info request, a ping) waits for
    a greeting; one that belongs to the old connection (a credit, a cancel, a
    release) is dropped, so nothing queued for the old server reaches the next one.
    """

    SEND = "send"
    GREET_FIRST = "greet first"
    DROP = "drop"


#: Messages that open a conversation with a server, rather than continue one.
_CONVERSATION_STARTERS = (protocol.Request, protocol.InfoRequest, protocol.FrameTimesRequest, protocol.Ping)


@attrs.frozen
class Actions:
    """What the driver must do, in this order: replace the sockets of ``reset``, send ``send``, raise ``error``."""

    send: tuple[Send, ...] = ()
    reset: tuple[int, ...] = ()
    error: Optional[AsyncFramesError] = None

    def __add__(self, other: "Actions") -> "Actions":
        return Actions(self.send + other.send, self.reset + other.reset, self.error or other.error)


NOTHING = Actions()


@attrs.frozen
class Arrival:
    """A message of the current request as it came from server ``server`` (``payload``: inline pixels)."""

    server: int
    message: Union[protocol.Chunk, protocol.Error]
    payload: Optional[memoryview] = None


@attrs.frozen
class Held:
    """The next frame for the caller is ``frame``, at ``offset`` in the chunk it took last
    (read ahead, several frames a chunk): the driver hands it over; nothing is due."""

    frame: int
    offset: int


@attrs.define
class Link:
    """One server as the client knows it: its connection's health and what its welcome said.

    ``generation`` counts the sockets made for it: each lost connection (or a shutdown)
    means a fresh socket, so nothing queued for the old one can reach the new one.
    ``freed`` holds shared slots to hand back with the next :class:`~protocol.Release`:
    slots of chunks nobody will look at, and (appended by the driver's slot mapping as
    the caller's arrays are collected) slots the caller let go of.
    """

    endpoint: str
    health: Health = Health.NEW
    generation: int = 0
    ever_greeted: bool = False  # a frame server with our settings has answered at this endpoint
    server_version: str = ""
    shm_pid: Optional[int] = None  # the server's pid when we reach its shared memory
    max_request_frames: Optional[int] = None  # the server's limit, from its welcome
    chunks_received: int = 0
    inbox: deque = attrs.field(factory=deque)  # Arrivals of the current request, in arrival order
    freed: deque = attrs.field(factory=deque)
    pace: Pace = attrs.field(factory=Pace)  # how fast it delivers what we ask of it

    @property
    def greeted(self) -> bool:
        """True once the server welcomed us on the current connection."""
        return self.health is Health.GREETED

    def hello(self, client: str) -> protocol.Hello:
        """The first message of every connection."""
        return protocol.Hello(version=protocol.PROTOCOL_VERSION, client=client)

    def welcome(self, message: protocol.Welcome, shm_reachable: bool) -> None:
        """The server greeted us; ``shm_reachable``: the driver could read its shared-memory probe."""
        self.health = Health.GREETED
        self.ever_greeted = True
        self.server_version = message.server
        self.max_request_frames = message.max_request_frames
        self.shm_pid = message.shm.pid if shm_reachable and message.shm is not None else None
        self.freed = deque()  # slot numbers are per server process

    def reset(self) -> None:
        """The connection is gone: a fresh socket (a new generation) that must say hello first."""
        self.inbox.clear()
        self.health = Health.NEW
        self.shm_pid = None
        self.freed = deque()  # the old server's slots mean nothing to the next one
        self.pace.forget()
        self.generation += 1

    def drop(self, message: protocol.Message) -> None:
        """A chunk nobody will look at: its shared slot goes back with the next release."""
        if isinstance(message, protocol.Chunk) and message.shm is not None:
            self.freed.append(message.shm.slot)

    def release(self) -> Optional[protocol.Release]:
        """The release of every slot freed since the last one, or None."""
        slots = self._take_freed()
        return protocol.Release(slots=slots) if slots else None

    def bye(self) -> protocol.Bye:
        """The last message of a connection closed on purpose, with the slots freed since the last release."""
        return protocol.Bye(slots=self._take_freed())

    def _take_freed(self) -> list[int]:
        slots = []
        while self.freed and len(slots) < protocol.MAX_RELEASE_SLOTS:
            slots.append(self.freed.popleft())
        return slots


@attrs.define
class Stream:
    """A request in flight, dealt over ``servers``: chunk *k* comes from ``owners[k]``
    (one server: from ``servers[0]``), which calls it its chunk ``local[k]``.

    ``idxs``/``frames_per_chunk``/``spec`` are what we asked for, so each chunk
    can be checked against it; ``frame_shape`` is the ``(h, w, c)`` of its first
    non-empty chunk, which every later chunk must share. When the rest of a request
    is dealt again, the same stream goes on under a new ``request_id``: ``idxs`` then
    holds the frames not yet taken and ``delivered_before`` counts the chunks taken before.
    """

    request_id: int
    servers: list[int]
    total_chunks: Optional[int]  # None: a single server decides (every frame of the video)
    idxs: Indices = None
    frames_per_chunk: int = 64
    spec: Optional[Video] = None
    next_chunk: int = 0
    done: bool = False
    frame_shape: Optional[tuple[int, ...]] = None
    ended: str = ""  # why it ended before its last chunk: "was cancelled by cancel()", ...
    end_seen: bool = False  # the caller has been given its end
    owners: Optional[np.ndarray] = None  # the server of each chunk (None: servers[0] sends them all)
    local: Optional[np.ndarray] = None  # each chunk's number among its own server's chunks
    left: dict = attrs.field(factory=dict)  # chunks each server has still to deliver
    delivered_before: int = 0  # chunks taken under earlier deals of this request
    redeals: int = 0  # how often the rest of it was dealt again
    shown: Optional[int] = None  # frames the caller asked for; the rest are read ahead (None: none are)
    finished: bool = False  # its last chunk was taken
    generation: int = 0  # its server's connection (read ahead, it goes on only on the same one)
    #: Which frames each chunk holds (by default: chunks of ``frames_per_chunk``; see ``Request.ahead_frames_per_chunk``).
    chunking: protocol.Chunking = attrs.field(
        default=attrs.Factory(lambda stream: protocol.Chunking(stream.frames_per_chunk), takes_self=True)
    )
    given: int = 0  # read ahead: frames handed to the caller, one a step
    taken: int = 0  # read ahead: frames in the chunks taken
    held_from: int = 0  # read ahead: the position of the first frame of the chunk taken last

    @property
    def delivered(self) -> int:
        """Chunks of this request taken so far, over all its deals (read ahead: frames handed over, one a chunk)."""
        return self.given if self.shown is not None else self.delivered_before + self.next_chunk

    def chunks_left(self, frame_count: Optional[int] = None) -> Optional[int]:
        """Chunks the caller has still to take; None if that needs the video's ``frame_count``
        (a request of every frame from one server) and it was not given."""
        if self.shown is not None:
            return 0 if self.done else max(0, self.shown - self.given)
        total = self.total_chunks
        if total is None:
            count = len(self.idxs) if self.idxs is not None else frame_count
            if count is None:
                return None
            total = -(-count // self.frames_per_chunk)
        return 0 if self.done else max(0, total - self.next_chunk)

    @property
    def next_server(self) -> int:
        """The server the next chunk comes from."""
        return self.servers[0] if self.owners is None else int(self.owners[self.next_chunk])

    def expected_idxs(self, k: int, n: int) -> list[int]:
        """The frame indices chunk ``k`` must hold (``n``: how many it holds, for every-frame requests)."""
        fpc = self.frames_per_chunk
        if self.idxs is None:
            return list(range(k * fpc, k * fpc + n))
        start, stop = self.chunking.bounds(k)
        selected = self.idxs[start:stop]
        return selected.tolist() if isinstance(selected, np.ndarray) else list(selected)

    def check(self, link: Link, message: protocol.Chunk, payload: Optional[memoryview]) -> None:
        """Raise ProtocolError unless ``message`` is the chunk we asked for next: number, indices, dtype, shape, pixels."""
        k = self.next_chunk
        where = _Where(link.endpoint, self.request_id, k)  # formatted only for an error
        local = k if self.local is None else int(self.local[k])
        if message.chunk != local:
            raise ProtocolError(f"expected chunk {local} from {link.endpoint}, it sent chunk {message.chunk}")
        got = list(message.frame_idxs)
        expected = self.expected_idxs(k, len(got))
        # Frames read ahead past the video's end are dropped: the request may end after those
        # asked for, its last chunk holding the first of those it would have held.
        early = message.last_chunk and self.shown is not None and self.chunking.bounds(k)[1] >= self.shown
        if got != expected and not (early and got and got == expected[: len(got)]):
            raise ProtocolError(f"{where} sent frames {_short(got)}, we asked for {_short(expected)}")
        fpc = self.frames_per_chunk
        if self.idxs is None:
            if len(got) > fpc or (not message.last_chunk and len(got) != fpc) or (not got and k > 0):
                raise ProtocolError(f"{where} sent {len(got)} frames in a chunk of {fpc} (last_chunk={message.last_chunk})")
        elif self.total_chunks is None:
            chunks = self.chunking.chunks(len(self.idxs))
            if message.last_chunk != (k >= chunks - 1) and not early:
                raise ProtocolError(f"{where} says last_chunk={message.last_chunk}, but it is chunk {k} of {chunks}")
        if message.dtype != np.dtype(np.uint8).str:
            raise ProtocolError(f"{where} sent frames of dtype {message.dtype!r}, expected uint8 ('|u1')")
        shape = tuple(message.shape)
        if len(shape) != 4 or shape[0] != len(got):
            raise ProtocolError(f"{where} sent shape {list(shape)}, expected ({len(got)}, height, width, channels)")
        _dtype, nbytes = protocol.chunk_layout(message)
        if message.shm is not None:
            if link.shm_pid is None or payload is not None or nbytes > message.shm.size:
                raise ProtocolError(f"{link.endpoint} sent a shared-memory chunk that does not fit what was agreed")
        elif (0 if payload is None else payload.nbytes) != nbytes:
            size = 0 if payload is None else payload.nbytes
            raise ProtocolError(f"{where} sent a payload of {size} bytes, its header says {list(shape)} uint8 ({nbytes} bytes)")
        if not got:
            return
        channels = _CHANNELS[self.spec.grayscale if self.spec is not None else None]
        chw = self.spec is not None and self.spec.layout == "CHW"
        c, hw = (shape[1], shape[2:4]) if chw else (shape[3], shape[1:3])
        if c not in channels or min(hw) < 1 or (self.spec is not None and self.spec.resize is not None and tuple(hw) != self.spec.resize):
            some = " or ".join(map(str, channels))
            expected = f"({some}, height, width)" if chw else f"(height, width, {some})"
            raise ProtocolError(f"{where} sent frames of shape {list(shape[1:])}, expected {expected}")
        if self.frame_shape is not None and shape[1:] != self.frame_shape:
            raise ProtocolError(f"{where} sent frames of shape {list(shape[1:])}, earlier chunks had {list(self.frame_shape)}")


#: The channels a frame may have, by the request's grayscale option.
_CHANNELS = {None: (1, 3), True: (1,), False: (3,)}


@attrs.frozen
class _Where:
    """Which chunk an error is about, formatted only when one is raised."""

    endpoint: str
    request_id: int
    chunk: int

    def __str__(self) -> str:
        return f"{self.endpoint} (request {self.request_id}, chunk {self.chunk})"


def deal(idxs: "range | np.ndarray", frames_per_chunk: int, servers: int) -> list[np.ndarray]:
    """Each server's share of ``idxs`` among servers of equal pace: chunk *k* goes to server
    *k mod n*; as many shares as servers with a chunk.

    Server *j* gets chunks *j*, *j + n*, *j + 2n*, ... concatenated; it cuts its share into
    chunks of ``frames_per_chunk`` again, so its *i*-th chunk is global chunk *j + i·n*.
    At least one share (empty, for an empty request).
    """
    chunks = -(-len(idxs) // frames_per_chunk)
    n = max(1, min(servers, chunks))
    return _deal.shares(idxs, frames_per_chunk, _deal.owners(chunks, [1.0] * n), n)


class ClientState:
    """The client's side of the protocol with ``len(endpoints)`` servers: links, the current request, replies.

    Not thread-safe, like the :class:`~asyncframes.AsyncVideo` driving it.
    """

    def __init__(
        self, endpoints: Sequence[str], window: int = 2, shared_memory: bool = True, read_ahead: int = 0, version: str = ""
    ) -> None:
        self.links = [Link(endpoint) for endpoint in endpoints]
        self.window = window
        self.shared_memory = shared_memory
        #: Frames to read ahead after a request for one frame (0: none; see :meth:`start_request`),
        #: from a server of our ``version`` (older ones refuse the field).
        self.read_ahead = read_ahead
        self.version = version
        self.stream: Optional[Stream] = None  # the request being delivered
        self.last: Optional[Stream] = None  # the latest request, even once it is over
        self.closed = False
        self._ids = itertools.count(1)
        self._awaiting: dict[int, Optional[Video]] = {}  # info/ping requests waiting for their reply, and their video
        self._replies: dict[int, protocol.Message] = {}
        self._frame_bytes: dict[Video, int] = {}  # each video's frame size, from its latest info or first chunk

    # -- request ids and replies ----------------------------------------------------------

    def new_request_id(self) -> int:
        """A request id never used before by this client."""
        return next(self._ids)

    def expect(self, request_id: int, video: Optional[Video] = None) -> None:
        """A reply to ``request_id`` (about ``video``) is awaited: file it when it comes."""
        self._awaiting[request_id] = video

    def reply(self, request_id: int) -> Optional[protocol.Message]:
        """The reply to ``request_id`` if it came (taken: asked again, None)."""
        return self._replies.pop(request_id, None)

    def abandon(self, request_id: int) -> None:
        """No longer waiting for ``request_id``: a reply arriving later is dropped."""
        self._awaiting.pop(request_id, None)
        self._replies.pop(request_id, None)

    def busy(self, server: int) -> bool:
        """Something is outstanding on ``server``'s connection (a reply awaited, or chunks of the request)."""
        stream = self.stream
        return bool(self._awaiting) or (stream is not None and not stream.done and server in stream.servers)

    # -- requests -------------------------------------------------------------------------

    def servers_for(self, idxs: Indices, frames_per_chunk: int, among: Optional[Sequence[int]] = None) -> list[int]:
        """The servers a request for ``idxs`` goes to (each must be greeted before :meth:`start_request`).

        Args:
            among: deal only over these servers (default: all; see :meth:`up`).

        Raises:
            ValueError: ``idxs`` is None (every frame) with several servers: the driver must
                first learn the frame count and pass ``range(frame_count)``.
        """
        if len(self.links) == 1:
            return [0]
        if idxs is None:
            raise ValueError("dealing every frame over several servers needs the frame count: pass range(frame_count)")
        servers, _owner = self._plan(idxs, frames_per_chunk, self._pool(among))
        return servers or self._pool(among)[:1]

    def _pool(self, among: Optional[Sequence[int]]) -> list[int]:
        return list(range(len(self.links))) if among is None else list(among)

    def _plan(
        self, idxs: "range | np.ndarray", frames_per_chunk: int, pool: Sequence[int], weights: Optional[Sequence[float]] = None
    ) -> tuple[list[int], np.ndarray]:
        """The servers of ``pool`` with a share of ``idxs`` and the owner of each chunk, dealt by
        ``weights`` (one per server of ``pool``; default: the paces measured so far, equal until
        every one is measured)."""
        if weights is None:
            weights = _deal.weights_for(pool, self._paces(pool))
        owner = np.asarray(pool, np.int64)[_deal.owners(-(-len(idxs) // frames_per_chunk), weights)]
        dealt = set(owner.tolist())
        return [j for j in pool if j in dealt], owner

    def _paces(self, servers: Sequence[int]) -> dict[int, Pace]:
        return {j: self.links[j].pace for j in servers}

    def up(self) -> list[int]:
        """The servers to deal a new request over: every server, except those whose connection
        was lost after they had answered and that have not answered again (a server that died
        or stalled stays out of new requests until it is back)."""
        down = {i for i, link in enumerate(self.links) if link.ever_greeted and not link.greeted}
        return [i for i in range(len(self.links)) if i not in down] or list(range(len(self.links)))

    def fail_over(self, stream: Stream) -> Optional[tuple[Indices, list[int]]]:
        """After a server of ``stream`` was lost: ``(the frames the caller has not taken yet, the
        servers still up)`` to ask for them again, or None if that cannot be done (one server
        only, or none left answering: the caller must be told)."""
        survivors = [i for i, link in enumerate(self.links) if link.greeted]
        if len(self.links) < 2 or not survivors or stream.idxs is None:
            return None
        return stream.idxs[stream.next_chunk * stream.frames_per_chunk :], survivors

    def start_request(
        self,
        request_id: int,
        video: Video,
        idxs: Indices,
        frames_per_chunk: int,
        among: Optional[Sequence[int]] = None,
        now: Optional[float] = None,
    ) -> Actions:
        """Make ``request_id`` the current request (ending any other, as replaced) and say what to send.

        A request for one frame ``i`` to one server of our version also reads ahead (with
        :attr:`read_ahead` set): it asks for ``i`` and the ``read_ahead`` frames after it
        (``Request.ahead``): ``i`` alone in the first chunk, the others in chunks of
        :meth:`ahead_frames_per_chunk`; the caller is handed ``i``; see :meth:`continues`
        for the rest.

        Args:
            request_id: from :meth:`new_request_id`.
            video: what to read.
            idxs: the frames, as :func:`~asyncframes._client.normalize_frame_idxs` gives them
                (None: every frame, only with one server).
            frames_per_chunk: frames per chunk.
            among: deal only over these servers (see :meth:`up` and :meth:`fail_over`).
            now: the time, in seconds (any clock): given, the servers' paces are measured
                and a request over several servers is dealt again when one would hold
                the caller up (see :mod:`asyncframes._deal`).

        Returns:
            The actions: a cancel of the replaced request, then for each server of
            :meth:`servers_for` its pending release and its :class:`~protocol.Request`.

        Raises:
            ServerError: a share names more frames than its server's ``max_request_frames``
                (the server's ZeroMQ would drop such a message unread); the request is
                then ended as not sent.
        """
        actions = self.replace(request_id)
        if self._reads_ahead(idxs):
            assert idxs is not None
            i = int(idxs[0])  # this one alone in the first chunk, then those after it, read ahead
            ahead = range(i, i + 1 + self.read_ahead)
            per_chunk = self.ahead_frames_per_chunk(video)
            chunking = protocol.Chunking(1, 1, per_chunk if per_chunk > 1 else 0)
            stream = Stream(
                request_id, [0], None, ahead, 1, video, shown=1, generation=self.links[0].generation, chunking=chunking
            )
            shares: list[tuple[int, Indices]] = [(0, ahead)]
        elif len(self.links) == 1:
            stream = Stream(request_id, [0], None, idxs, frames_per_chunk, video)
            shares = [(0, idxs)]
        else:
            assert idxs is not None
            servers, owner = self._plan(idxs, frames_per_chunk, self._pool(among))
            stream = Stream(request_id, servers, len(owner), idxs, frames_per_chunk, video, done=len(owner) == 0)
            shares = self._shares(idxs, frames_per_chunk, owner, servers)
            self._assign(stream, owner)
        self.stream = self.last = stream
        too_many = self._over_limit(shares)
        if too_many is not None:
            return actions + self.cancel(f"could not be sent ({type(too_many).__name__}: {too_many})") + Actions(error=too_many)
        return self.folded(actions + self._ask(stream, shares, now))

    def folded(self, actions: Actions) -> Actions:
        """``actions`` with each :class:`~protocol.Cancel` and :class:`~protocol.Release` to a
        server of our version carried by the :class:`~protocol.Request` that follows it
        there (``Request.replaces`` and ``Request.release``): one message instead of three
        (a driver that withdrew a request with :meth:`replace` passes those sends in with
        :meth:`start_request`'s). A server of another version may not know those fields:
        it gets them apart."""
        sends = actions.send
        out: list[Optional[Send]] = list(sends)
        pending: dict[tuple[int, int], list[int]] = {}  # (server, generation) -> positions in out
        for pos, send in enumerate(sends):
            key, message = (send.server, send.generation), send.message
            if isinstance(message, (protocol.Cancel, protocol.Release)) and self._same_version(send.server):
                pending.setdefault(key, []).append(pos)
                continue
            before = pending.pop(key, [])
            if not isinstance(message, protocol.Request) or not before:
                continue
            release, replaces = list(message.release), message.replaces
            for k in before:
                earlier = out[k]
                assert earlier is not None
                if isinstance(earlier.message, protocol.Release):
                    release += earlier.message.slots
                elif replaces is None:
                    replaces = earlier.message.request_id
                else:
                    continue  # a second cancel (never made today): sent as it is
                out[k] = None
            out[pos] = attrs.evolve(send, message=attrs.evolve(message, release=release, replaces=replaces))
        return attrs.evolve(actions, send=tuple(send for send in out if send is not None))

    def _same_version(self, server: int) -> bool:
        """Whether ``server`` runs our version (so it knows the fields newer than the protocol version)."""
        return bool(self.version) and self.links[server].server_version == self.version

    def ahead_frames_per_chunk(self, video: Video) -> int:
        """How many frames a chunk read ahead of ``video`` holds: as many as fit
        :data:`AHEAD_CHUNK_BYTES`, at most :data:`AHEAD_FRAMES_PER_CHUNK`; one while its
        frame size is not known (neither its info nor a chunk of it came yet)."""
        frame_bytes = self._frame_bytes.get(video)
        if not frame_bytes:
            return 1
        return max(1, min(AHEAD_FRAMES_PER_CHUNK, AHEAD_CHUNK_BYTES // frame_bytes))

    def _learn(self, video: Video, frame_bytes: int) -> None:
        """``video``'s frames are ``frame_bytes`` each (the latest :data:`_KNOWN_SIZES` videos are kept)."""
        self._frame_bytes.pop(video, None)
        self._frame_bytes[video] = frame_bytes
        if len(self._frame_bytes) > _KNOWN_SIZES:
            del self._frame_bytes[next(iter(self._frame_bytes))]

    def _reads_ahead(self, idxs: Indices) -> bool:
        """Whether a request for ``idxs`` also reads ahead: one frame, from one server of our version."""
        return self.read_ahead > 0 and len(self.links) == 1 and idxs is not None and len(idxs) == 1 and self._same_version(0)

    def continues(self, video: Video, idxs: Indices, frames_per_chunk: int) -> bool:
        """Is a request for ``idxs`` of ``video`` the next frame the current request reads
        ahead (a person stepping forward)? If so, that frame becomes the caller's, as if it
        had been asked for now: nothing needs to be sent. It is in the chunk the caller
        took last (:meth:`next_ready` says so with :class:`Held`) or in the next one.

        The current request must have delivered what the caller asked for, not have ended
        otherwise, and still be on the same connection.
        """
        stream = self.stream
        if stream is None or stream.shown is None or not stream.done or stream.spec != video:
            return False
        if idxs is None or len(idxs) != 1 or self.links[0].generation != stream.generation:
            return False
        assert stream.idxs is not None  # a range, for a request reading ahead
        if (stream.finished and stream.given >= stream.taken) or stream.given >= len(stream.idxs):
            return False
        if int(idxs[0]) != stream.idxs[stream.given]:
            return False
        stream.shown += 1
        stream.done = stream.end_seen = False
        return True

    def _shares(
        self, idxs: "range | np.ndarray", frames_per_chunk: int, owner: np.ndarray, servers: Sequence[int]
    ) -> list[tuple[int, Indices]]:
        """Each of ``servers``' share of ``idxs`` when chunk *k* comes from ``owner[k]``."""
        share_of = _deal.shares(idxs, frames_per_chunk, owner, len(self.links))
        return [(j, share_of[j]) for j in servers]

    def _assign(self, stream: Stream, owner: np.ndarray) -> None:
        """``stream``'s chunk *k* comes from ``owner[k]``: what each server calls it, and how many each has to deliver."""
        stream.owners, stream.local = owner, _deal.local_numbers(owner)
        counts = np.bincount(owner, minlength=len(self.links))
        stream.left = {j: int(counts[j]) for j in stream.servers}

    def _over_limit(self, shares: Sequence[tuple[int, Indices]]) -> Optional[ServerError]:
        """A share naming more frames than its server's ``max_request_frames`` (its ZeroMQ would
        drop such a message unread), as the error to raise; None if every share fits."""
        for server, share in shares:
            link = self.links[server]
            count = protocol.selection_count(protocol.frame_selection(share))
            limit = link.max_request_frames
            if count is not None and limit is not None and count > limit:
                return ServerError(f"request for {count} frames exceeds the limit of {limit} of the server at {link.endpoint}")
        return None

    def _ask(self, stream: Stream, shares: Sequence[tuple[int, Indices]], now: Optional[float]) -> Actions:
        """The requests that ask each server for its share of ``stream`` (each after its pending release)."""
        sends = []
        for server, share in shares:
            link = self.links[server]
            release = link.release()
            if release is not None:
                sends.append(Send(server, link.generation, release))
            shm = self.shared_memory and link.shm_pid is not None
            selection = protocol.frame_selection(share)
            ahead = len(share) - stream.shown if stream.shown is not None and share is not None else 0
            request = protocol.Request(
                stream.request_id, stream.spec, selection, stream.frames_per_chunk, self.window, shm, ahead,
                stream.chunking.ahead_frames_per_chunk,
            )
            sends.append(Send(server, link.generation, request))
            if now is not None:
                link.pace.dealt(now, self.window)
        return Actions(send=tuple(sends))

    def _redeal_due(self) -> Optional[list[float]]:
        """The weights to deal the rest of the current request again by, if it is due (see :mod:`asyncframes._deal`)."""
        stream = self.stream
        if stream is None or stream.done or stream.owners is None:
            return None
        frames_left = {j: n * stream.frames_per_chunk for j, n in stream.left.items()}
        return _deal.redeal_weights(frames_left, self._paces(stream.servers), len(stream.owners) - stream.next_chunk)

    def _redeal(self, weights: Sequence[float], now: float) -> Optional[Actions]:
        """Deal the frames of the current request not yet taken again, by ``weights`` (one per
        server of the request): the same stream goes on under a new request id, the old one is
        cancelled on every server. None if a new share would be over a server's limit."""
        stream = self.stream
        assert stream is not None and stream.idxs is not None
        fpc = stream.frames_per_chunk
        rest = stream.idxs[stream.next_chunk * fpc :]
        servers, owner = self._plan(rest, fpc, stream.servers, weights)
        shares = self._shares(rest, fpc, owner, servers)
        if self._over_limit(shares) is not None:
            return None
        withdraw = self._withdraw(stream, cancel=True)  # to the servers of the old deal
        stream.request_id = self.new_request_id()
        stream.idxs, stream.delivered_before, stream.next_chunk = rest, stream.delivered, 0
        stream.total_chunks, stream.redeals, stream.servers = len(owner), stream.redeals + 1, servers
        self._assign(stream, owner)
        return withdraw + self._ask(stream, shares, now)

    def replace(self, request_id: int) -> Actions:
        """End the current request because ``request_id`` replaces it (see :meth:`cancel`)."""
        return self.cancel(f"was replaced by request {request_id} (load_by_chunk)")

    def not_sent(self, request_id: int, reason: str) -> Actions:
        """Request ``request_id`` could not be sent (``reason``, e.g. its frame count could not be
        learnt): end it, whether or not :meth:`start_request` made it current, so that iterating
        it says so."""
        if self.stream is not None and self.stream.request_id == request_id:
            return self.cancel(reason)
        if self.last is None or self.last.request_id != request_id:
            self.last = Stream(request_id, [], None, ended=reason)
        return NOTHING

    def releases(self) -> Actions:
        """Best-effort releases of the slots freed since the last one, to each greeted server.

        For the end of an iteration: the caller has let go of all but its last chunk, and
        nothing else would tell the servers until the next request, so their slots (warm
        memory another client could take) would stay lent meanwhile.
        """
        sends = []
        for server, link in enumerate(self.links):
            release = link.release() if link.greeted and not self.closed else None
            if release is not None:
                sends.append(Send(server, link.generation, release, must=False))
        return Actions(send=tuple(sends))

    def cancel(self, reason: str = "was cancelled by cancel()") -> Actions:
        """End the current request (``reason`` completes "request N ..."); chunks still in flight are dropped.

        Returns:
            Best-effort sends to each greeted server of the request: a cancel (unless it was
            complete) and a release of the slots freed.
        """
        in_flight = self.in_flight
        stream, self.stream = self.stream, None
        if stream is None:
            return NOTHING
        if not stream.done:
            stream.ended = reason
        return self._withdraw(stream, cancel=in_flight)

    @property
    def in_flight(self) -> bool:
        """Whether chunks may still come: the current request is not complete, or it reads ahead."""
        stream = self.stream
        return stream is not None and (not stream.done or (stream.shown is not None and not stream.finished))

    def _withdraw(self, stream: Stream, cancel: bool) -> Actions:
        """Drop what ``stream``'s servers sent that was not taken; best-effort, to each greeted
        one, a cancel of the request (if ``cancel``) and a release of the slots freed."""
        sends = []
        for server in stream.servers:
            link = self.links[server]
            for arrival in link.inbox:
                link.drop(arrival.message)
            link.inbox.clear()
            if self.closed or not link.greeted:
                continue  # a connection being replaced carries nothing stale to the next one
            if cancel:
                sends.append(Send(server, link.generation, protocol.Cancel(request_id=stream.request_id), must=False))
            release = link.release()
            if release is not None:
                sends.append(Send(server, link.generation, release, must=False))
        return Actions(send=tuple(sends))

    # -- what arrives ---------------------------------------------------------------------

    def received(
        self,
        server: int,
        message: protocol.Message,
        payload: Optional[memoryview] = None,
        shm_reachable: bool = False,
        now: Optional[float] = None,
    ) -> Actions:
        """File a message from ``server``: a chunk in its inbox, a reply where it is awaited, a welcome on its link.

        Args:
            server: which server sent it.
            message: the message.
            payload: its inline pixels, if any.
            shm_reachable: for a :class:`~protocol.Welcome`: the driver could read the server's probe.
            now: when it arrived (given: a chunk of the current request measures its server's pace).

        Returns:
            Nothing to do, except for a :class:`~protocol.Shutdown` while something was
            outstanding there (reset that socket, cancel the request, raise
            :class:`ServerShutdownError`) or an error about the connection itself (raise it).
        """
        link, stream = self.links[server], self.stream
        if isinstance(message, (protocol.Chunk, protocol.Error)) and stream is not None and message.request_id == stream.request_id:
            if server in stream.servers:
                link.inbox.append(Arrival(server, message, payload))
                if now is not None and isinstance(message, protocol.Chunk):
                    link.pace.arrived(len(message.frame_idxs), now)
            else:
                link.drop(message)
        elif isinstance(message, protocol.Chunk):
            link.drop(message)  # of a request we cancelled
        elif isinstance(message, protocol.Welcome):
            link.welcome(message, shm_reachable)
        elif isinstance(message, (protocol.InfoReply, protocol.FrameTimesReply, protocol.Pong)) or (
            isinstance(message, protocol.Error) and message.request_id is not None
        ):
            if message.request_id in self._awaiting:
                video = self._awaiting[message.request_id]
                if isinstance(message, protocol.InfoReply) and video is not None:
                    self._learn(video, message.info.height * message.info.width * message.info.channels)
                self._replies[message.request_id] = message
        elif isinstance(message, protocol.Error) and message.error == UnknownClientError.__name__ and link.greeted:
            # Another server process answers at this endpoint (ZeroMQ reconnected to it by itself):
            # the connection we had is lost, whatever this one says.
            return self.connection_event(server, ConnectionEvent.LOST, busy=self.busy(server))
        elif isinstance(message, protocol.Error):
            return Actions(error=error_from_wire(message.error, message.message))
        elif isinstance(message, protocol.Shutdown):
            busy = self.busy(server)
            link.reset()  # that server is going away: nothing of this connection may reach the next one
            if busy:
                error = ServerShutdownError(f"the frame server at {link.endpoint} shut down: {message.reason}")
                return Actions(reset=(server,)) + self.cancel("ended when its server shut down") + Actions(error=error)
            return Actions(reset=(server,))
        # Anything else (pings, chunks of cancelled requests) needs no action.
        return NOTHING

    def connection_event(
        self, server: int, event: ConnectionEvent, busy: bool, leftovers: Sequence[protocol.Message] = ()
    ) -> Actions:
        """What to do about ``event`` on ``server``'s connection.

        Args:
            server: whose connection.
            event: what its monitor saw.
            busy: something is outstanding on it (see :meth:`busy`; the driver also counts a greeting).
            leftovers: for ``LOST``: the messages still queued on the old socket (its last words).

        Returns:
            ``AUTH_FAILED``: raise :class:`AuthenticationError`. ``HANDSHAKE_FAILED``: raise
            :class:`AuthenticationError` if no frame server with our settings ever answered
            here, else replace the socket (a reconnect that met something else, e.g. the
            kernel connecting a free port to ourselves). ``LOST``: replace the socket, and
            if something was outstanding on an established connection, end the request
            and raise :class:`ServerShutdownError` (its last words said so) or
            :class:`ServerDiedError`.
        """
        link = self.links[server]
        if event is ConnectionEvent.AUTH_FAILED:
            return Actions(error=AuthenticationError(f"the frame server at {link.endpoint} refused our CURVE credentials"))
        if event is ConnectionEvent.HANDSHAKE_FAILED:
            if link.ever_greeted:
                link.reset()
                return Actions(reset=(server,))
            return Actions(
                error=AuthenticationError(
                    f"the handshake with {link.endpoint} failed: its security settings differ from ours "
                    "(CURVE required on one side only, or not a frame server?)"
                )
            )
        if event is ConnectionEvent.CONNECTED:
            if link.health is Health.NEW:
                link.health = Health.CONNECTED
            return NOTHING
        was_connected = link.health is not Health.NEW
        said = [m for m in leftovers if isinstance(m, protocol.Shutdown)]
        link.reset()
        if not (busy and was_connected):
            return Actions(reset=(server,))
        if said:
            error: ServerDiedError = ServerShutdownError(f"the frame server at {link.endpoint} shut down: {said[-1].reason}")
        else:
            error = ServerDiedError(f"lost the connection to the frame server at {link.endpoint}")
        return Actions(reset=(server,)) + self.server_died(error)

    def server_died(self, error: ServerDiedError) -> Actions:
        """A server is gone (``error`` says how): the current request ends with it; raise ``error``."""
        return self.cancel(f"was lost with its server ({error})") + Actions(error=error)

    # -- handing chunks to the caller -------------------------------------------------------

    def next_ready(self) -> "Optional[Arrival | Held]":
        """The next message of the current request in chunk order, taken from its server's inbox; None if not here yet.

        Read ahead, when the next frame is in the chunk the caller took last: :class:`Held`,
        counted as handed over (the driver gives it; nothing is checked or sent).
        """
        stream = self.stream
        if stream is None or stream.done:
            return None
        if stream.given < stream.taken:
            assert stream.idxs is not None
            held = Held(int(stream.idxs[stream.given]), stream.given - stream.held_from)
            stream.given += 1
            stream.done = stream.given >= stream.shown
            return held
        inbox = self.links[stream.next_server].inbox
        return inbox.popleft() if inbox else None

    def check(self, arrival: Arrival) -> Actions:
        """Is ``arrival`` what the current request expects next? If not, end the request and raise why.

        Returns:
            Nothing for a chunk that matches. For a server's :class:`~protocol.Error`: cancel,
            then raise the error it names. For a chunk that differs from what was asked:
            cancel, then raise :class:`ProtocolError`.
        """
        stream, message = self.stream, arrival.message
        assert stream is not None
        if isinstance(message, protocol.Error):
            error = error_from_wire(message.error, message.message)
            return self.cancel(f"failed ({message.error}: {message.message})") + Actions(error=error)
        try:
            stream.check(self.links[arrival.server], message, arrival.payload)
        except AsyncFramesError as exc:
            return self.fail(exc)
        return NOTHING

    def fail(self, error: AsyncFramesError) -> Actions:
        """The current request failed with ``error`` (e.g. its chunk could not be read): end it and raise ``error``."""
        return self.cancel(f"failed ({type(error).__name__}: {error})") + Actions(error=error)

    def took(self, arrival: Arrival, now: Optional[float] = None) -> Actions:
        """The caller got the checked chunk ``arrival``: count it, and say what is due.

        Args:
            arrival: the chunk, as :meth:`next_ready` gave it.
            now: the time (given: paces are measured, and the rest of a request over
                several servers may be dealt again, see :mod:`asyncframes._deal`).

        Returns:
            Unless it was the last chunk its server sends for the request: its server's
            pending release, then one :class:`~protocol.Credit`. When the rest of the
            request is dealt again instead: cancels of the old request id and releases,
            then each server's new share (the stream goes on under a new request id).
        """
        stream, message = self.stream, arrival.message
        assert stream is not None and isinstance(message, protocol.Chunk)
        link = self.links[arrival.server]
        stream.next_chunk += 1
        link.chunks_received += 1
        if arrival.server in stream.left:
            stream.left[arrival.server] -= 1
        stream.finished = message.last_chunk
        if stream.shown is not None:  # the caller is handed the chunk's first frame; the rest wait in hand
            stream.held_from, stream.taken = stream.taken, stream.taken + len(message.frame_idxs)
            stream.given += 1
            stream.done = stream.given >= stream.shown
        elif stream.total_chunks is None:
            stream.done = message.last_chunk
        else:
            stream.done = stream.next_chunk >= stream.total_chunks
        if message.frame_idxs and stream.frame_shape is None:
            stream.frame_shape = tuple(message.shape[1:])
            if stream.spec is not None:
                self._learn(stream.spec, math.prod(stream.frame_shape))
        if now is not None:
            weights = self._redeal_due()
            redeal = self._redeal(weights, now) if weights is not None else None
            if redeal is not None:
                return redeal
        if message.last_chunk:
            return NOTHING
        sends = []
        release = link.release()
        if release is not None:
            sends.append(Send(arrival.server, link.generation, release, must=False))
        sends.append(Send(arrival.server, link.generation, protocol.Credit(request_id=stream.request_id, chunks=1)))
        if now is not None:
            link.pace.asked(now)
        return Actions(send=tuple(sends))

    def admit(self, send: Send) -> "Admit":
        """May ``send`` go out now? See :class:`Admit`."""
        link = self.links[send.server]
        if isinstance(send.message, protocol.Hello):
            return Admit.SEND
        opens = isinstance(send.message, _CONVERSATION_STARTERS)
        if link.greeted and (opens or send.generation == link.generation):
            return Admit.SEND
        return Admit.GREET_FIRST if opens else Admit.DROP

    # -- the end ---------------------------------------------------------------------------

    def iteration_start(self) -> Stream:
        """The request a new iteration of chunks follows.

        Raises:
            AsyncFramesError: there is no request, or its end was already handed to an
                iteration (see :meth:`ended_error`): iterating never ends silently.
            RequestCancelledError: the latest request was cancelled, replaced or lost.
        """
        stream = self.stream
        if stream is None:
            raise self.ended_error(self.last)
        if stream.done and stream.end_seen:
            raise self.ended_error(stream)
        return stream

    def iteration_over(self, stream: Stream) -> bool:
        """Is an iteration of ``stream`` over? True once its last chunk was taken (its end is then seen).

        Raises:
            RequestCancelledError: it ended otherwise (cancelled, replaced, lost, failed).
        """
        if stream.done:  # every chunk delivered: the end, even if another request followed
            stream.end_seen = True
            return True
        if stream is not self.stream:
            raise self.ended_error(stream)
        return False

    def ended_error(self, stream: Optional[Stream]) -> AsyncFramesError:
        """Why there is nothing (more) to iterate in ``stream`` (None: no request was made)."""
        if self.closed:
            return AsyncFramesError("this AsyncVideo is closed")
        if stream is None:
            return AsyncFramesError("there is no request to iterate: call load_by_chunk(video, frame_idxs) first")
        if stream.done:
            return AsyncFramesError(
                f"request {stream.request_id} was fully consumed: all {stream.delivered} of its chunks were delivered; "
                "call load_by_chunk(...) to request frames again"
            )
        return RequestCancelledError(
            f"request {stream.request_id} {stream.ended or 'was cancelled'} after {stream.delivered} of its chunks "
            "were delivered; call load_by_chunk(...) to request frames again"
        )


def _short(idxs: Sequence[int], most: int = 8) -> str:
    return str(list(idxs)) if len(idxs) <= most else f"[{', '.join(map(str, idxs[:most]))}, ... ({len(idxs)} indices)]"
