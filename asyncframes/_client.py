"""``AsyncVideo``: ask frame servers for frames and receive them chunk by chunk.

This module is the client's *driver*: it owns the sockets, the private server
process, the shared-memory mappings and the clock, and nothing else. Every
protocol decision (what to send, what a chunk must hold, which error a lost
connection is, what is handed to the caller and in which order) is made by the
pure core in :mod:`asyncframes._client_state`; the driver feeds it what happened
and carries out the :class:`~asyncframes._client_state.Actions` it answers.

The client never blocks without a bound: every wait polls in short slices and
checks that each server is still there (its process for a private server, the
connection for any server), so a dead server is reported as
:class:`ServerDiedError` within a second or so, and a silent one as
:class:`RequestTimeoutError` after ``timeout`` seconds.

Flow control is by credit: a server keeps at most ``window`` chunks ahead of
what the caller has taken, so memory stays bounded however long the request.
Given several servers, a request is dealt out chunk by chunk by the servers'
measured paces (see :mod:`asyncframes._deal`), each server streams its share,
and chunks are handed back in order.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

from ._deferred import load_in_background, on_first_use
from ._process import (
    ServerProcess,
    listening,
    prestart,
    shared_server,
    stop_shared_servers,
    take_prestarted,
    user_server,
    user_server_path,
)
from ._version import __version__
from .errors import (
    AsyncFramesError,
    FrameIndexError,
    ProtocolError,
    RequestTimeoutError,
    ServerDiedError,
    ServerShutdownError,
    ServerStartError,
    error_from_wire,
)

if TYPE_CHECKING:
    import attrs
    import numpy as np

    from . import _client_state, _transport, _video
    from . import _protocol as protocol
    from . import _shm as shm
    from ._client_state import Actions, Arrival, ClientState, Link, Send
    from ._times import FrameTimes
    from ._transport import ClientCurve
    from ._video import Video, VideoInfo
else:  # imported on first use: a private server starts first (see AsyncVideo.__init__), and they load while it does
    #: Each deferred module's name here, and the module, in the order they load in the background.
    _DEFERRED = {
        "np": "numpy",
        "attrs": "attrs",
        "_video": "asyncframes._video",
        "protocol": "asyncframes._protocol",
        "_client_state": "asyncframes._client_state",
        "shm": "asyncframes._shm",
        "_transport": "asyncframes._transport",
    }
    globals().update({alias: on_first_use(name, globals(), alias) for alias, name in _DEFERRED.items()})
    load_in_background(list(_DEFERRED.values()))

log = logging.getLogger(__name__)

#: What names a video: a Video, a path (file, image folder, glob, numbered pattern), a list of
#: image paths, or a sleap_io.Video (see :func:`asyncframes._video.as_video`).
VideoLike = Union["Video", str, "os.PathLike[str]", Sequence[str], Any]
FrameIdxs = Optional[Union[Sequence[int], range, "np.ndarray", Iterable[int]]]
PathLike = Union[str, "os.PathLike[str]"]

_DEFAULT: Any = object()
#: Longest single wait between liveness checks.
_SLICE_S = 0.05
#: Messages taken past a wait's deadline before the wait gives up although more keep coming (a
#: server that only chatters cannot hold a caller past its timeout; a chunk already here is
#: still handed over, since the waits look for it between messages).
_LATE_MESSAGES = 1000
#: This process's AsyncVideos (see AsyncVideo._release_for_neighbours).
_CLIENTS: "weakref.WeakSet[AsyncVideo]" = weakref.WeakSet()
#: How long libzmq may go on sending a closed connection's last messages (its goodbye), in the
#: background: a server that is gone or slow costs at most this at exit.
_BYE_LINGER_MS = 100
#: How far a request for one frame reads ahead (``read_ahead``): steps forward this many
#: frames are taken from it; the server sends a window of them at a time, on credit, so a
#: long horizon costs no decoding. At 32, every 33rd step of a person stepping on asked
#: again and waited for the decoder (3.5 ms, against 0.5-1.3 ms for the others).
READ_AHEAD_FRAMES = 1024
#: How long a client that finds its server's process gone waits to see the connection end
#: (with the server's last messages, e.g. that it shut down) before calling it died.
_LAST_WORDS_S = 0.5


class FrameChunk(NamedTuple):
    """One chunk of a request: the frame indices and their frames.

    ``frame_idxs``: the video frame numbers, in request order (duplicates repeated).
    ``frames``: ``(len(frame_idxs), height, width, channels)`` uint8 (channels 1 for
    grayscale, 3 for RGB), a zero-copy view of the received message or shared slot;
    the caller owns it and may write to it.
    """

    frame_idxs: list[int]
    frames: np.ndarray


def normalize_frame_idxs(frame_idxs: FrameIdxs) -> "Optional[Union[range, np.ndarray]]":
    """Frame indices as a range or a one-dimensional integer array (None stays None: every frame).

    Never a list of Python ints: millions of indices stay one compact array, sent as raw bytes.

    Args:
        frame_idxs: a list, range, 1-D integer array or iterable of ints, or None.

    Returns:
        A range (kept as it is) or a 1-D integer array; None for None.

    Raises:
        TypeError: a string or bytes, a single number, a 2-D array, or non-integer indices.
        FrameIndexError: an index is negative or over the largest a video can have (2**32 - 1).
    """
    if frame_idxs is None:
        return None
    if type(frame_idxs) is list and len(frame_idxs) == 1 and type(frame_idxs[0]) is int and 0 <= frame_idxs[0] <= protocol.MAX_FRAME_INDEX:
        return range(frame_idxs[0], frame_idxs[0] + 1)  # one frame (a GUI's step): no array to build
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


def _answer(reply: protocol.Message, expected: type) -> Any:
    """``reply`` if it is an ``expected``; the error a server sent instead, raised; else ProtocolError."""
    if isinstance(reply, protocol.Error):
        raise error_from_wire(reply.error, reply.message)
    if not isinstance(reply, expected):
        raise ProtocolError(f"expected {expected.__name__}, got {type(reply).__name__}")
    return reply


class _Connection:
    """The driver's half of one server: its socket, its shared-memory mappings and (if private) its process.

    The protocol's half (health, generation, what the welcome said) is ``link``, in the core.
    """

    def __init__(
        self, link: Link, curve: Optional[ClientCurve], process: Optional[ServerProcess] = None, owns_process: bool = True
    ) -> None:
        self.link = link
        self.endpoint = link.endpoint
        self.process = process
        self.owns_process = owns_process  # False: the process's shared server, left running by close
        self._curve = curve
        self.socket = _transport.ClientSocket(link.endpoint, curve)
        self.slots = shm.ClientSlots()
        self.use_slots()

    @property
    def shm_pid(self) -> Optional[int]:
        """The server's pid when we reach its shared memory (from the core's link)."""
        return self.link.shm_pid

    def use_slots(self) -> None:
        """Fresh mappings for a new server process; slots the caller lets go of are queued on the link."""
        self.slots.clear()  # arrays the caller holds keep their own mapping
        self.slots = shm.ClientSlots()
        self.slots.freed = self.link.freed

    def replace_socket(self) -> None:
        """A fresh socket (fresh queues) for the link's new generation."""
        self.socket.close()
        self.use_slots()
        self.socket = _transport.ClientSocket(self.endpoint, self._curve)

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket (``linger_ms``: time libzmq may take to send what is queued) and
        stop the server process if it is ours."""
        self.socket.close(linger_ms)
        self.slots.clear()  # arrays the caller still holds keep their own mapping
        if self.process is not None and self.owns_process:
            self.process.stop()
        self.process = None

    def abandon(self) -> None:
        """In a forked child: forget the parent's socket and server without touching them."""
        self.process = None


class _Replaced(Exception):
    """The connection was replaced while a message waited to be sent."""


class Chunks(Iterator[FrameChunk]):
    """The current request's chunks (:attr:`AsyncVideo.chunks`): an iterator whose ``len()`` is
    the number of chunks still to come, so ``tqdm(av.chunks)`` shows a total."""

    def __init__(self, chunks: Iterator[FrameChunk], left: Callable[[], int]) -> None:
        self._chunks = chunks
        self._left = left

    def __next__(self) -> FrameChunk:
        return next(self._chunks)

    def __iter__(self) -> "Chunks":
        return self

    def __len__(self) -> int:
        return self._left()


class AsyncVideo:
    """Frames from background frame servers, chunk by chunk.

    Not thread-safe: use one AsyncVideo per thread, and not across ``fork``: make
    one in the child process (e.g. in a DataLoader worker).

    Args:
        endpoint: None uses a server on this machine chosen by ``server``. A string (or
            a list of them) connects to running servers (``asyncframes serve``), each
            ``tcp://host:port`` or ``ipc://path``. Given several, each request is dealt
            over them by their pace.
        timeout: seconds any one call may wait (None: as long as the server lives).
        start_timeout: seconds to start a private server and greet every server.
        window: how many chunks a server may have ahead of what the caller took (at
            least 1; a server caps it at its ``max_window``). Memory on both sides is
            bounded by ``window`` chunks.
        curve_secret: this client's ``.key_secret`` file, for servers that require
            CURVE authentication (with ``curve_server_key``).
        curve_server_key: the server's ``.key`` file.
        server_log_level: log level of a private server (DEBUG, INFO, WARNING, ERROR).
        workers: decoder threads of a private server (None: one per 2 CPUs, at least 2 from 2 CPUs on).
        shared_memory: take frames through shared memory when the server is on this
            machine (no copy at all); False always receives them inline.
        server: with ``endpoint=None``, which server: ``"process"`` (the default, or
            ``$ASYNCFRAMES_SERVER``): this process's private server, started by the first
            ``AsyncVideo`` in the background and shared by all of them (the next one costs
            a connection, not a process start), exiting with the process; ``"own"``: a
            private server for this object alone, stopped by :meth:`close`; ``"user"``:
            this user's server, which outlives processes (scripts and notebook cells
            start warm) and exits after 10 minutes without a client (an ipc socket in a
            0700 folder: ``$ASYNCFRAMES_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/asyncframes``).
        wait: True waits (up to ``start_timeout``) until every server has answered our
            hello. False returns at once (a few milliseconds, even while a private
            server starts): for event loops, which watch :meth:`fds`, call
            :meth:`process_events` when one is readable and wait for :attr:`ready`
            (:mod:`asyncframes.asyncio` and :mod:`asyncframes.qt` do this). The blocking
            calls also wait for the server first. None (the default): False for the
            private server (the constructor never waits for a process to start; a
            server that fails to start is reported by the first call that needs it),
            True for given endpoints (one round trip: a wrong address or CURVE setting
            is reported here).
        read_ahead: after a request for one frame, have the server also send the frames
            after it, a window's worth at a time, while the caller looks at that one: a
            person stepping forward then gets each next frame without a round trip (the
            next request for the next frame takes it). Costs the server a window of
            frames' decoding per single-frame request; False for callers that ask for
            single frames at random (a training loop).

    Raises:
        ValueError: ``window`` or ``workers`` is not a positive integer, or only one
            of the two CURVE files is given.
        TypeError: ``endpoint`` is neither a string nor a list of strings.
        ServerStartError: an endpoint is malformed, a private server did not start
            (with ``wait=True``), or a server could not be reached or did not answer
            within ``start_timeout``.
        AuthenticationError: a server refused our CURVE credentials, or its security
            settings differ from ours (CURVE on one side only).
    """

    def __init__(
        self,
        endpoint: Optional[Union[str, Sequence[str]]] = None,
        *,
        timeout: Optional[float] = 30.0,
        start_timeout: float = 30.0,
        window: int = 2,
        curve_secret: Optional[PathLike] = None,
        curve_server_key: Optional[PathLike] = None,
        server_log_level: str = "WARNING",
        workers: Optional[int] = None,
        shared_memory: bool = True,
        server: Optional[str] = None,
        wait: Optional[bool] = None,
        read_ahead: bool = True,
    ) -> None:
        self._closed = True  # until fully open, so __del__ of a half-made object is harmless
        self._conns: list[_Connection] = []
        #: The thread that last used our sockets (see _release_for_neighbours).
        self._thread = threading.get_ident()
        #: The deadline the last wait overran, and how many messages it took since (see _pump).
        self._late: tuple[Optional[float], int] = (None, 0)
        #: Per server, the connection generation our Hello was queued on, and when.
        self._hello_sent: dict[int, int] = {}
        self._hello_at: dict[int, float] = {}
        #: The last path given and the working directory then, with its spec.
        self._last_spec: tuple[Any, str, Optional[Video]] = (None, "", None)
        #: Read ahead several frames a chunk: the request, and the frames of the chunk it took last.
        self._held: Optional[tuple[Any, np.ndarray]] = None
        self._pid = os.getpid()
        _check_window(window)
        if (curve_secret is None) != (curve_server_key is None):
            raise ValueError("CURVE needs both curve_secret (ours) and curve_server_key (the server's)")
        _check_workers(workers)
        server = _check_server(server if server is not None else os.environ.get("ASYNCFRAMES_SERVER") or "process")
        endpoints = None if endpoint is None else _check_endpoints(endpoint)
        self.timeout = timeout
        self.start_timeout = start_timeout
        curve = _transport.ClientCurve.load(curve_secret, curve_server_key) if curve_secret and curve_server_key else None
        self._closed = False
        try:
            process, owned = None, True
            if wait is None:  # a private server starts in the background; given servers are greeted now
                wait = endpoints is not None
            if endpoints is None and server == "user":
                endpoints = [user_server(server_log_level, _server_options(workers), start_timeout)]
            if endpoints is None:
                options = _server_options(workers)
                if server == "own":
                    process = take_prestarted(server_log_level, options, start_timeout, wait) or ServerProcess(
                        start_timeout=start_timeout, log_level=server_log_level, options=options, wait=wait
                    )
                else:
                    process = shared_server(server_log_level, options, start_timeout)
                    owned = False
                if not process.endpoint and "*" in process.bind:
                    process.wait_ready()  # a port the system picks: known only once it listens
                endpoints = [process.endpoint or process.bind]
            self._state = _client_state.ClientState(endpoints, int(window), shared_memory, READ_AHEAD_FRAMES if read_ahead else 0, __version__)
            if process is not None:
                self._conns.append(_Connection(self._state.links[0], None, process, owns_process=owned))
            else:
                self._conns.extend(_Connection(link, curve) for link in self._state.links)
            self._started = time.monotonic()
            deadline = self._started + start_timeout
            for i in range(len(self._conns)):
                if wait:
                    self._greet(i, deadline, start_timeout)
                else:  # queued now, answered when the server is up: see process_events
                    self._say_hello(i, time.monotonic())
            _CLIENTS.add(self)
        except BaseException:
            if process is not None and owned and not self._conns:
                process.stop()
            self.close()
            raise

    @staticmethod
    def prestart(*, workers: Optional[int] = None, server_log_level: str = "WARNING") -> int:
        """Start a private server now, in the background, for the next ``AsyncVideo()``.

        Starting Python, NumPy and PyAV takes a few hundred milliseconds. Call this
        when your app starts, and the first video it opens finds its server ready.

        Args:
            workers: as for ``AsyncVideo``; must match the ``AsyncVideo`` that is to take it.
            server_log_level: as for ``AsyncVideo``; must match too.

        Returns:
            The server's process id.

        Raises:
            ValueError: ``workers`` is not a positive integer.
            ServerStartError: the process could not be started.
        """
        _check_workers(workers)
        return prestart(server_log_level, _server_options(workers))

    @staticmethod
    def stop_user_server(*, workers: Optional[int] = None, server_log_level: str = "WARNING", timeout: float = 10.0) -> bool:
        """Stop this user's server (``server="user"``) started with these options, if one runs.

        Returns:
            True if one was running and has stopped; False if none was running.

        Raises:
            ServerStartError: the per-user folder is unsafe.
            RequestTimeoutError: it was still listening after ``timeout`` seconds.
        """
        path = user_server_path(server_log_level, _server_options(workers))
        if not listening(path):
            return False
        deadline = time.monotonic() + timeout
        with AsyncVideo(f"ipc://{path}", timeout=timeout, start_timeout=timeout) as client:
            client._send_first(protocol.Stop(), deadline)
            while listening(path):
                if time.monotonic() > deadline:
                    raise RequestTimeoutError(f"the per-user frame server at {path} did not stop within {timeout:g} s")
                time.sleep(0.01)
        return True

    @staticmethod
    def stop_shared_servers() -> None:
        """Stop this process's shared private server(s) now (they otherwise exit with the
        process); clients still using one get :class:`ServerDiedError`, the next
        ``AsyncVideo()`` starts a new one."""
        stop_shared_servers()

    @classmethod
    def from_video(
        cls,
        video: VideoLike,
        frame_idxs: FrameIdxs = None,
        frames_per_chunk: int = 64,
        **kwargs: Any,
    ) -> "AsyncVideo":
        """Start a client and request frames of ``video``: ``AsyncVideo(**kwargs)``, then :meth:`load_by_chunk`.

        Args:
            video: as for :meth:`load_by_chunk`.
            frame_idxs: as for :meth:`load_by_chunk`.
            frames_per_chunk: as for :meth:`load_by_chunk`.
            **kwargs: the constructor's keyword arguments.

        Returns:
            The client, its request under way (close it, or use it in a ``with`` block).

        Raises:
            AsyncFramesError: whatever the constructor or :meth:`load_by_chunk` raises.
        """
        client = cls(**kwargs)
        try:
            client.load_by_chunk(video, frame_idxs, frames_per_chunk)
        except BaseException:
            client.close()
            raise
        return client

    # -- settings ----------------------------------------------------------------

    @property
    def window(self) -> int:
        """How many chunks a server may have ahead of what the caller took; used by the next request.

        Raises:
            ValueError: (when set) not a positive integer.
        """
        return self._state.window

    @window.setter
    def window(self, window: int) -> None:
        _check_window(window)
        self._state.window = int(window)

    @property
    def read_ahead(self) -> bool:
        """Whether a request for one frame also has the frames after it sent (see the constructor)."""
        return self._state.read_ahead > 0

    @read_ahead.setter
    def read_ahead(self, read_ahead: bool) -> None:
        self._state.read_ahead = READ_AHEAD_FRAMES if read_ahead else 0

    @property
    def shared_memory(self) -> bool:
        """Whether the next request may take frames through shared memory (when the server is in reach)."""
        return self._state.shared_memory

    @shared_memory.setter
    def shared_memory(self, shared_memory: bool) -> None:
        self._state.shared_memory = bool(shared_memory)

    # -- requests ----------------------------------------------------------------

    def load_by_chunk(self, video: VideoLike, frame_idxs: FrameIdxs = None, frames_per_chunk: int = 64) -> None:
        """Request frames of ``video``, replacing any current request; read them from :attr:`chunks`.

        Args:
            video: a path (to a private server: relative to our working directory; to
                a standalone server: relative to its ``--root``), or a :class:`Video`
                (a path with the grayscale and stream options).
            frame_idxs: the frame numbers, in the order wanted, duplicates allowed: a
                list, range, 1-D integer array or iterable of ints; None: every frame.
            frames_per_chunk: frames per chunk, a positive integer.

        Raises:
            TypeError: ``frame_idxs`` is not a sequence of integers (e.g. a string or a 2-D array).
            FrameIndexError: a frame index is negative or over the largest a video can have.
            ValueError: ``frames_per_chunk`` is not a positive integer.
            ServerError: the request names more frames than a server's ``max_request_frames``.
            ServerDiedError: a server went away while the request was being sent.
            RequestTimeoutError: it could not be sent within ``timeout``.
            AsyncFramesError: this AsyncVideo is closed, or used across ``fork``.
        """
        self._check_open()
        spec = self._spec(video)
        idxs = normalize_frame_idxs(frame_idxs)
        if isinstance(frames_per_chunk, bool) or not isinstance(frames_per_chunk, (int, np.integer)) or frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be a positive integer, got {frames_per_chunk!r}")
        fpc = int(frames_per_chunk)
        state = self._state
        if state.continues(spec, idxs, fpc):
            return  # the next frame of a request reading ahead: it is here, or on its way
        self._held = None  # its slot goes back with the next release
        self._release_for_neighbours()
        rid = state.new_request_id()
        withdraw = state.replace(rid)
        if not all(link.greeted for link in state.links):  # a connection may take a while: the cancel goes first
            self._carry_out(withdraw)
            withdraw = _client_state.Actions()
        deadline = self._deadline(self.timeout)
        try:
            if len(self._conns) > 1 and idxs is None:  # dealing every frame needs their number
                idxs = range(self.info(spec).frame_count)
            among = self._servers_up()
            for i in state.servers_for(idxs, fpc, among):
                self._open(i, deadline)
            asked = state.start_request(rid, spec, idxs, fpc, among, now=time.monotonic())
        except BaseException as exc:
            self._carry_out(withdraw)
            self._carry_out(state.not_sent(rid, f"could not be sent ({type(exc).__name__}: {exc})"))
            raise
        try:  # the cancel and the release go with the request (one message to a server of our version)
            self._carry_out(state.folded(withdraw + asked), deadline)
        except BaseException as exc:
            self._carry_out(state.not_sent(rid, f"could not be sent ({type(exc).__name__}: {exc})"))
            raise

    # -- for event loops (asyncio, Qt): never blocking ------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether every server has answered our hello (requests then go out at once)."""
        return all(link.greeted for link in self._state.links)

    def fds(self) -> list[int]:
        """The file descriptors an event loop watches for this client (readable: call
        :meth:`process_events`). ZeroMQ's are edge-triggered: after every call into this
        client, call :meth:`process_events` once more before waiting again."""
        self._check_open()
        return [fd for conn in self._conns for fd in conn.socket.fds()]

    def sockets_generation(self) -> tuple[int, ...]:
        """Changes whenever a connection's socket is replaced (after its server went away):
        the :meth:`fds` are then new descriptors, even where the system reused their numbers,
        and an event loop must watch them anew (a loop still watching the closed ones' numbers
        would never wake)."""
        return tuple(link.generation for link in self._state.links)

    def process_events(self) -> None:
        """Take in everything that arrived and every connection event, without waiting.

        Raises:
            ServerStartError: a private server exited before it was ready, or a server did
                not answer within ``start_timeout`` (checked here while not :attr:`ready`).
            ServerDiedError: a server went away while a request was under way.
            AuthenticationError: as for the constructor.
        """
        self._check_open()
        now = time.monotonic()
        while self._pump(now):  # what is here now (bounded, should more keep coming)
            pass
        if not self.ready:
            for i in range(len(self._conns)):  # a replaced connection needs our Hello again
                if not self._state.links[i].greeted:
                    self._say_hello(i, time.monotonic())
            self._check_started()

    def _check_started(self) -> None:
        for i, conn in enumerate(self._conns):
            if self._state.links[i].greeted:
                continue
            if conn.process is not None and conn.process.exit_code() is not None:
                raise ServerStartError(f"the frame server exited with code {conn.process.exit_code()} before it was ready")
            if time.monotonic() > self._hello_at.get(i, self._started) + self.start_timeout:
                raise ServerStartError(f"the frame server at {conn.endpoint} did not answer within {_seconds(self.start_timeout)} s")

    def iteration_start(self) -> Any:
        """Begin iterating the current request's chunks (what :attr:`chunks` does first), for
        drivers that take chunks with ``next_chunk(timeout=0)``; give the result to
        :meth:`iteration_over`.

        Raises:
            AsyncFramesError: no request was made, or it was fully consumed already.
            RequestCancelledError: it was cancelled, replaced or lost with its server.
        """
        self._check_open()
        return self._state.iteration_start()

    def iteration_over(self, stream: Any) -> bool:
        """Whether the iteration begun by :meth:`iteration_start` has ended (raising why, if it
        ended other than with its last chunk)."""
        self._check_open()
        return self._state.iteration_over(stream)

    def request_info(self, video: VideoLike) -> int:
        """Ask for ``video``'s :class:`VideoInfo` without waiting (the servers must be :attr:`ready`);
        the request id to give :meth:`info_reply`."""
        self._check_open()
        spec = self._spec(video)
        state = self._state
        rid = state.new_request_id()
        state.expect(rid, spec)
        self._send_first(protocol.InfoRequest(rid, spec), time.monotonic() + 1.0)
        return rid

    def info_reply(self, request_id: int) -> Optional[VideoInfo]:
        """The answer to :meth:`request_info` if it arrived (None: not yet).

        Raises:
            VideoError, ServerError: what the server said instead.
        """
        reply = self._state.reply(request_id)
        if reply is None:
            return None
        self._state.abandon(request_id)
        return _answer(reply, protocol.InfoReply).info

    @property
    def done(self) -> bool:
        """True when there is no request or its last chunk has been taken."""
        stream = self._state.stream
        return stream is None or stream.done

    @property
    def chunks(self) -> "Chunks":
        """An iterator of the current request's chunks, in order, as :class:`FrameChunk`.

        Never ends silently: iteration raises instead of stopping when there is
        nothing to iterate. ``len()`` of it is the number of chunks still to come, so a
        progress bar knows its total (``tqdm(av.chunks)``).

        Returns:
            An iterator over :class:`FrameChunk` ``(frame_idxs, frames)``.

        Raises:
            AsyncFramesError: (when iterated) this AsyncVideo is closed; no request was
                made; or the request was fully consumed already.
            RequestCancelledError: the request was cancelled by :meth:`cancel`, replaced
                by another :meth:`load_by_chunk`, or lost with its server.
            RequestTimeoutError: no chunk arrived within ``timeout``.
            ServerDiedError: a server went away (:class:`ServerShutdownError`: it shut down).
            ProtocolError: a chunk differs from what was asked for.
            FrameIndexError, VideoError, ServerError: what a server reported about the request.
        """
        return Chunks(self._iterate(), self._chunks_left)

    def _chunks_left(self) -> int:
        stream = self._state.stream
        if stream is None:
            return 0
        left = stream.chunks_left()
        if left is None:  # every frame, from one server: its frame count says how many
            assert stream.spec is not None
            left = stream.chunks_left(self.info(stream.spec).frame_count)
        return left or 0

    def _paces(self) -> str:
        rates = [(link.endpoint, link.pace.rate) for link in self._state.links]
        return ", ".join(f"{endpoint} {rate:.0f} frames/s" if rate else f"{endpoint} unmeasured" for endpoint, rate in rates)

    def _servers_up(self) -> Optional[list[int]]:
        """With several servers, those to deal a new request over (see ``ClientState.up``); a
        server left out is greeted again in the background, so it rejoins once it is back."""
        if len(self._conns) < 2:
            return None
        up = self._state.up()
        for i in set(range(len(self._conns))) - set(up):
            self._say_hello(i, time.monotonic())
        return up

    def _fail_over(self, stream: Any, died: ServerDiedError) -> Any:
        """A server of the request being iterated is gone: ask the servers still up for the
        frames not taken yet, and go on with that request; raise ``died`` if none is left."""
        state = self._state
        plan = state.fail_over(stream)
        if plan is None:
            raise died
        remaining, survivors = plan
        log.warning("%s; asking %d other server(s) for the %d frames not received yet", died, len(survivors), len(remaining))
        rid = state.new_request_id()
        deadline = self._deadline(self.timeout)
        try:
            self._carry_out(
                state.start_request(rid, stream.spec, remaining, stream.frames_per_chunk, survivors, now=time.monotonic()), deadline
            )
        except ServerDiedError:
            raise died from None
        return state.iteration_start()

    def _iterate(self) -> Iterator[FrameChunk]:
        self._check_open()
        state = self._state
        stream = state.iteration_start()
        while True:
            self._check_open()
            if state.iteration_over(stream):
                self._carry_out(state.releases())  # what the caller let go of, while it waits
                return
            try:
                chunk = self.next_chunk(timeout=self.timeout)
            except ServerDiedError as died:  # with several servers, the others take over
                stream = self._fail_over(stream, died)
                continue
            if chunk is not None:
                yield chunk
            elif stream is state.stream and not stream.done:
                raise RequestTimeoutError(
                    f"no chunk arrived within {self.timeout:g} s (request {stream.request_id}, chunk {stream.delivered})"
                )

    def next_chunk(self, timeout: Optional[float] = _DEFAULT) -> Optional[FrameChunk]:
        """The next chunk of the current request if one arrives in time, for callers that poll (a GUI).

        Args:
            timeout: seconds to wait; 0: only a chunk that is here already; None: as
                long as the server lives; by default the ``timeout`` given to the constructor.

        Returns:
            The next :class:`FrameChunk`, or None if none arrived in time, or there is
            no request, or its last chunk was taken (see :attr:`done`).

        Raises:
            ServerDiedError: a server went away (:class:`ServerShutdownError`: it shut down).
            ProtocolError: a chunk differs from what was asked for.
            FrameIndexError, VideoError, ServerError: what a server reported about the request.
            AsyncFramesError: this AsyncVideo is closed, or used across ``fork``.
        """
        self._check_open()
        deadline = self._deadline(timeout)
        while True:
            arrival = self._state.next_ready()
            if isinstance(arrival, _client_state.Held):  # in the chunk read ahead that the caller took last
                assert self._held is not None and self._held[0] is self._state.stream
                return FrameChunk([arrival.frame], self._held[1][arrival.offset : arrival.offset + 1])
            if arrival is not None:
                chunk = self._take(arrival, deadline)
                if chunk is not None:
                    return chunk
                continue
            if self.done or not self._pump(deadline):
                return None

    def cancel(self, reason: str = "was cancelled by cancel()") -> None:
        """Abandon the current request; chunks still in flight are discarded. Does nothing without one.

        Args:
            reason: completes "request N ..." in the :class:`RequestCancelledError` that
                iterating the request raises from now on.
        """
        state = getattr(self, "_state", None)
        self._held = None
        if state is not None:
            self._carry_out(state.cancel(reason))

    def info(self, video: VideoLike, timeout: Optional[float] = _DEFAULT) -> VideoInfo:
        """What ``video`` holds, as the (first) server sees it.

        Args:
            video: as for :meth:`load_by_chunk`.
            timeout: seconds to wait for the answer (None: as long as the server lives;
                by default the constructor's ``timeout``).

        Returns:
            The :class:`VideoInfo`: frame count, height, width, channels, grayscale, fps, codec, ...

        Raises:
            VideoNotFoundError, VideoOpenError, VideoAccessError: the server cannot open it.
            RequestTimeoutError: no answer within ``timeout``.
            ServerDiedError: the server went away.
            AsyncFramesError: this AsyncVideo is closed, or used across ``fork``.
        """
        reply = self._ask_about(video, protocol.InfoRequest, protocol.InfoReply, timeout)
        return reply.info

    def frame_times(self, video: VideoLike, timeout: Optional[float] = _DEFAULT) -> FrameTimes:
        """Every frame's presentation time and duration in seconds, as the (first) server sees it.

        Args:
            video: as for :meth:`load_by_chunk`.
            timeout: seconds to wait for the answer (None: as long as the server lives;
                by default the constructor's ``timeout``).

        Returns:
            The :class:`FrameTimes`: float64 arrays ``pts_seconds`` and ``duration_seconds``
            (frame i's ``frame.time`` in a sequential decode, and how long it is shown), and
            ``num_frames_from_header``, the container's own count (None if it states none).

        Raises:
            VideoNotFoundError, VideoOpenError, VideoAccessError: the server cannot open it.
            RequestTimeoutError: no answer within ``timeout``.
            ServerDiedError: the server went away.
            AsyncFramesError: this AsyncVideo is closed, or used across ``fork``.
        """
        from ._times import FrameTimes  # here: its Fraction arithmetic (fractions, decimal) is not needed before

        reply = self._ask_about(video, protocol.FrameTimesRequest, protocol.FrameTimesReply, timeout)
        return FrameTimes(
            protocol.times_array(reply.pts_seconds),
            protocol.times_array(reply.duration_seconds),
            reply.num_frames_from_header,
        )

    def ping(self, timeout: Optional[float] = _DEFAULT) -> float:
        """Round-trip time to the (first) server.

        Args:
            timeout: seconds to wait for the answer (None: as long as the server lives;
                by default the constructor's ``timeout``).

        Returns:
            The round-trip time in seconds.

        Raises:
            RequestTimeoutError: no answer within ``timeout``.
            ServerDiedError: the server went away.
            AsyncFramesError: this AsyncVideo is closed, or used across ``fork``.
        """
        self._check_open()
        start = time.perf_counter()
        self._ask(lambda rid: protocol.Ping(request_id=rid), timeout)
        return time.perf_counter() - start

    # -- what and where ----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The (first) server's endpoint."""
        return self._conns[0].endpoint

    @property
    def endpoints(self) -> list[str]:
        """Every server's endpoint, in the order given."""
        return [conn.endpoint for conn in self._conns]

    @property
    def server_version(self) -> str:
        """The (first) server's package version, from its welcome ("" once closed)."""
        return self._state.links[0].server_version if self._conns else ""

    @property
    def server_pid(self) -> Optional[int]:
        """Process id of the private server, if this client owns one (else None)."""
        process = self._conns[0].process if self._conns else None
        return process.pid if process is not None else None

    @property
    def chunks_by_endpoint(self) -> dict[str, int]:
        """How many chunks each server has delivered to this client, by endpoint."""
        return {link.endpoint: link.chunks_received for link in self._state.links} if self._conns else {}

    # -- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Cancel any request, release the sockets, and stop this object's own private server
        (``server="own"``; the process's shared one keeps running for the next). Safe to call twice.

        Arrays the caller holds stay valid (each keeps its own mapping). In a forked
        child this touches nothing the parent owns (its server, its sockets): the
        child only forgets them.
        """
        conns = getattr(self, "_conns", [])
        state: Optional[ClientState] = getattr(self, "_state", None)
        if not conns or state is None:
            self._closed = True
            return
        if getattr(self, "_pid", os.getpid()) != os.getpid():
            self._closed, state.closed, state.stream, self._conns = True, True, None, []
            for conn in conns:
                conn.abandon()
            _FORKED_LEFTOVERS.extend(conns)  # never collected here: their sockets belong to the parent
            return
        try:
            if not getattr(self, "_closed", True):
                self.cancel(reason="was cancelled by close()")
                for i, conn in enumerate(conns):
                    if conn.process is not None and conn.owns_process:
                        self._send(_client_state.Send(i, conn.link.generation, protocol.Stop(), must=False), None)
                    elif conn.link.greeted:  # a server that goes on: it frees what was ours now
                        self._send(_client_state.Send(i, conn.link.generation, conn.link.bye(), must=False), None)
        finally:
            self._closed = state.closed = True
            state.stream = None
            self._conns = []
            for conn in conns:
                conn.close(linger_ms=_BYE_LINGER_MS)

    def __enter__(self) -> "AsyncVideo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- the driver: carrying out what the core decides --------------------------

    def _release_for_neighbours(self) -> None:
        """Send the releases of this thread's other open AsyncVideos (best effort).

        A loop holds its last chunk in its loop variable until it ends, so that chunk's slot
        is let go of only after the iteration, and its server hears of it at that
        AsyncVideo's next call. A GUI that keeps one video open while another streams
        would meanwhile make the new stream's server write a fresh slot (~1 ms per MB)
        instead of lending it that warm one. Only AsyncVideos whose sockets were last used
        in this thread are touched (one AsyncVideo belongs to one thread at a time), and only
        those with nothing in flight: a send can use up the edge of a ZeroMQ socket's
        descriptor, and an event loop driving one (asyncio, Qt) would then miss its chunks.
        """
        me = threading.get_ident()
        try:
            others = [c for c in _CLIENTS if c is not self and c._thread == me]
        except RuntimeError:  # another thread made or dropped one meanwhile: next time
            return
        for other in others:
            if other._closed or other._pid != self._pid or other._state.in_flight:
                continue
            # releases() names greeted connections of the current generation only. One
            # non-blocking try each, nothing more: no waiting, and no look at the other's
            # connection events (that is its own calls' business: they may replace sockets).
            for send in other._state.releases().send:
                _quietly(other._conns[send.server].socket.send, send.message, time.monotonic(), _nothing)

    def _carry_out(self, actions: Actions, deadline: Optional[float] = None) -> None:
        """Do what the core said: replace sockets, send messages (by ``deadline``), raise its error."""
        self._thread = threading.get_ident()
        for i in actions.reset:
            self._conns[i].replace_socket()
        for send in actions.send:
            self._send(send, deadline)
        if actions.error is not None:
            raise actions.error

    def _send_first(self, message: protocol.Message, deadline: Optional[float]) -> None:
        """Send ``message`` to the first server, on its current connection."""
        self._carry_out(_client_state.Actions(send=(_client_state.Send(0, self._state.links[0].generation, message),)), deadline)

    def _send(self, send: Send, deadline: Optional[float]) -> None:
        """Send one message the core asked for, greeting first if its connection is new."""
        admit = self._state.admit(send)
        if admit is _client_state.Admit.DROP:
            if send.must:  # it belonged to a connection that is gone
                self._died(ServerDiedError(f"lost the connection to the frame server at {self._conns[send.server].endpoint}"))
            return
        if not send.must:
            _quietly(self._transmit, send.server, send.message, time.monotonic() + _SLICE_S)
            return
        if admit is _client_state.Admit.GREET_FIRST:
            self._greet(send.server, deadline, None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not self._transmit(send.server, send.message, deadline):
            raise RequestTimeoutError(f"could not send to the frame server at {self._conns[send.server].endpoint} in time")

    def _transmit(self, i: int, message: protocol.Message, deadline: Optional[float], busy: bool = True) -> bool:
        """Queue ``message`` on server ``i``'s socket by ``deadline`` (False if it could not be), checking on it meanwhile.

        ``busy``: the message belongs to this connection's conversation (a request, a
        credit), so losing the connection meanwhile is a :class:`ServerDiedError`;
        otherwise (a Hello) it returns False and the caller starts over.
        """
        conn, link = self._conns[i], self._state.links[i]
        generation = link.generation

        def between() -> None:
            self._check(i, busy=busy)
            if link.generation != generation:
                if busy:
                    self._died(ServerDiedError(f"lost the connection to the frame server at {conn.endpoint}"))
                raise _Replaced()

        try:
            return conn.socket.send(message, deadline, between, _SLICE_S)
        except _Replaced:
            return False

    def _died(self, error: ServerDiedError) -> None:
        """A server is gone: the core ends the request; raise ``error``."""
        self._carry_out(self._state.server_died(error))

    def _check(self, i: int, busy: bool) -> None:
        """Raise if server ``i`` is gone (``busy``: something is outstanding on its connection)."""
        conn, state = self._conns[i], self._state
        if conn.process is not None:
            error = conn.process.exit_error()
            if error is not None and not state.links[i].ever_greeted:
                raise ServerStartError(f"{error} before it answered us") from None
            if error is not None:
                self._died(error)
        for event in conn.socket.events():
            leftovers = conn.socket.leftovers() if event is protocol.ConnectionEvent.LOST else ()
            actions = state.connection_event(i, event, busy, leftovers)
            error = actions.error
            if conn.process is not None and type(error) is ServerDiedError:  # our own server: how it ended
                error = conn.process.wait_exit_error() or error
            self._carry_out(attrs.evolve(actions, error=error))
            if actions.reset:
                return  # the old socket's other events are history

    def _greet(self, i: int, deadline: Optional[float], timeout: Optional[float]) -> None:
        """Handshake (again, after a reconnect) so the server knows our protocol version; by ``deadline``.

        If the connection is replaced meanwhile (the server went away), say hello again on the new one.
        """
        conn, link = self._conns[i], self._state.links[i]
        while not link.greeted:
            generation = link.generation
            if self._say_hello(i, deadline):
                while not link.greeted and link.generation == generation:
                    if not self._pump(deadline, greeting=i):
                        break
            if link.greeted or link.generation != generation:
                continue
            self._check(i, busy=False)
            within = "" if timeout is None else f" within {_seconds(timeout)} s"
            if link.health is _client_state.Health.NEW:
                raise ServerStartError(
                    f"could not reach a frame server at {conn.endpoint}{within} (is it running, and is the endpoint right?)"
                )
            raise ServerStartError(f"the frame server at {conn.endpoint} did not answer{within}")

    def _say_hello(self, i: int, deadline: Optional[float]) -> bool:
        """Queue a Hello on server ``i``'s current connection, once per connection; whether one is queued."""
        link = self._state.links[i]
        if self._hello_sent.get(i) == link.generation:
            return True
        if self._transmit(i, link.hello(f"asyncframes pid={os.getpid()}"), deadline, busy=False):
            self._hello_sent[i] = link.generation
            self._hello_at[i] = time.monotonic()
            return True
        return False

    def _open(self, i: int, deadline: Optional[float]) -> None:
        """Make sure server ``i`` is there and greeted (again, after a reconnect), by ``deadline``."""
        self._check(i, busy=False)
        if not self._state.links[i].greeted:
            self._greet(i, deadline, None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _ask_about(self, video: VideoLike, asking: Any, answer: type, timeout: Optional[float]) -> Any:
        """Ask the first server ``asking(request_id, video)`` and return its ``answer``; raise
        the error it sends instead, or :class:`ProtocolError` for anything else."""
        self._check_open()
        spec = self._spec(video)
        return _answer(self._ask(lambda rid: asking(rid, spec), timeout, spec), answer)

    def _ask(self, message: Any, timeout: Optional[float], video: Optional[Video] = None) -> protocol.Message:
        """Send ``message(request_id)`` (about ``video``) to the first server and wait for its reply (or its error)."""
        timeout = self.timeout if timeout is _DEFAULT else timeout
        deadline = self._deadline(timeout)
        state = self._state
        rid = state.new_request_id()
        state.expect(rid, video)
        try:
            self._open(0, deadline)
            self._send_first(message(rid), deadline)
            while (reply := state.reply(rid)) is None:
                if not self._pump(deadline):
                    raise RequestTimeoutError(f"the frame server did not answer within {timeout:g} s")
        finally:
            state.abandon(rid)
        return reply

    def _pump(self, deadline: Optional[float], greeting: Optional[int] = None) -> bool:
        """Receive what is waiting (up to ``deadline``) and hand it to the core. False on timeout.

        ``greeting``: the server we are greeting, whose loss counts as a loss while busy.
        Past ``deadline``, only what is already waiting is taken, and at most
        :data:`_LATE_MESSAGES` of it per deadline: messages that keep coming cannot make a
        wait outlast its deadline by more than that.
        """
        if deadline is not None and time.monotonic() >= deadline:
            overran, taken = self._late
            taken = taken + 1 if overran == deadline else 1
            self._late = (deadline, taken)
            if taken > _LATE_MESSAGES:
                return False
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            wait = _SLICE_S if remaining is None else max(0.0, min(_SLICE_S, remaining))
            # What is already waiting needs no poller (a GUI's step finds its chunk here).
            ready = [conn.socket for conn in self._conns if conn.socket.has_message()]
            ready = ready or _transport.poll_any([conn.socket for conn in self._conns], int(wait * 1000))
            if ready:
                for i, conn in enumerate(self._conns):
                    if conn.socket in ready:
                        self._receive(i)
                return True
            for i in range(len(self._conns)):
                self._check(i, busy=i == greeting or self._state.busy(i))
            if remaining is not None and remaining <= wait:
                return False

    def _receive(self, i: int) -> None:
        """Take the waiting message of server ``i`` and hand it to the core."""
        conn = self._conns[i]
        message, payload = conn.socket.recv()
        reachable = False
        if isinstance(message, protocol.Welcome):
            probe = message.shm
            reachable = probe is not None and shm.can_reach(probe.pid, probe.fd, probe.token)
        elif isinstance(message, protocol.Chunk) and message.shm is not None:
            conn.slots.forget(message.shm.retired)  # retired slots are never lent, so none of them is in use
        actions = self._state.received(i, message, payload, shm_reachable=reachable, now=time.monotonic())
        if isinstance(message, protocol.Welcome):
            conn.use_slots()  # slot numbers are per server process
        self._carry_out(actions)

    def _take(self, arrival: Arrival, deadline: Optional[float]) -> Optional[FrameChunk]:
        """Check the next chunk, give it its frames, and say what is due (None: an empty chunk)."""
        state = self._state
        self._carry_out(state.check(arrival))
        try:
            frames = self._frames_of(arrival)
        except AsyncFramesError as exc:
            if state.stream is not None:
                self._carry_out(state.fail(exc))
            raise
        message = arrival.message
        assert isinstance(message, protocol.Chunk)
        stream = state.stream
        redeals = stream.redeals if stream is not None else 0
        self._carry_out(state.took(arrival, now=time.monotonic()), _at_least(deadline))
        if state.stream is not None and state.stream.redeals != redeals:
            log.debug("dealt the rest of the request again by the servers' paces: %s", self._paces())
        if not message.frame_idxs:
            return None
        if stream is not None and stream.shown is not None:  # read ahead: the caller gets its frame; the rest wait in hand
            self._held = (stream, frames) if len(frames) > 1 else None
            return FrameChunk([message.frame_idxs[0]], frames[:1])
        return FrameChunk(list(message.frame_idxs), frames)

    def _frames_of(self, arrival: Arrival) -> np.ndarray:
        """The chunk's frames: a view of its shared slot, or of the received payload."""
        message = arrival.message
        assert isinstance(message, protocol.Chunk)
        where = message.shm
        if where is None:
            return protocol.chunk_array(message, arrival.payload)
        conn, pid = self._conns[arrival.server], self._state.links[arrival.server].shm_pid
        assert pid is not None  # checked by the core
        try:
            return conn.slots.array(pid, where.fd, where.slot, where.size, tuple(message.shape), message.dtype)
        except (OSError, ValueError) as exc:
            self.cancel(reason="was lost with its server")
            raise self._why_shm_failed(arrival.server, pid, exc) from exc

    def _why_shm_failed(self, i: int, pid: int, exc: BaseException) -> ServerDiedError:
        """A slot could not be mapped: find out (within a second or two) whether the server shut down or died."""
        conn, state = self._conns[i], self._state
        deadline = time.monotonic() + _EXPLAIN_S
        gone_at: Optional[float] = None
        while True:
            try:
                if conn.process is not None and (error := conn.process.exit_error()) is not None:
                    return error  # our own server: how it ended
                for message in conn.socket.leftovers():
                    self._carry_out(state.received(i, message))
                    if isinstance(message, protocol.Shutdown):
                        return ServerShutdownError(f"the frame server at {conn.endpoint} shut down: {message.reason}")
                self._check(i, busy=True)
            except ServerDiedError as died:
                return died
            except AsyncFramesError:
                pass
            if not shm.process_alive(pid):
                if conn.process is not None and (error := conn.process.wait_exit_error()) is not None:
                    return error
                # Its last words may still be on their way through libzmq: the connection's end,
                # seen by _check with them, says which; only its absence for a while decides.
                gone_at = gone_at if gone_at is not None else time.monotonic()
                if time.monotonic() - gone_at < _LAST_WORDS_S:
                    time.sleep(0.01)
                    continue
                self._carry_out(state.connection_event(i, protocol.ConnectionEvent.LOST, busy=False))
                return ServerDiedError(
                    f"lost the connection to the frame server at {conn.endpoint}: its process (pid {pid}) is gone"
                )
            if time.monotonic() >= deadline:
                return ServerDiedError(f"cannot map the shared memory of the frame server at {conn.endpoint}: {exc}")
            time.sleep(0.02)

    # -- internals ---------------------------------------------------------------

    def _spec(self, video: VideoLike) -> Video:
        same = isinstance(video, (str, _video.Video))  # the same one again (a GUI stepping through it): the same spec
        if same:
            cwd = os.getcwd()
            if self._last_spec[:2] == (video, cwd):
                return self._last_spec[2]
        spec = _video.as_video(video)
        if self._conns and self._conns[0].process is not None and "://" not in spec.filename:
            # Our own server shares our filesystem; make the path independent of its cwd.
            spec = attrs.evolve(spec, filename=os.path.abspath(spec.filename))
        if same:
            self._last_spec = (video, cwd, spec)
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


#: How long a failed shared-memory mapping waits to learn whether the server shut down or died.
_EXPLAIN_S = 2.0

#: Connections of AsyncVideos closed in a forked child: kept, untouched, because they belong to the parent.
_FORKED_LEFTOVERS: list[_Connection] = []

_ENDPOINT = re.compile(r"^(?:tcp://(?:\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})|ipc://\S.*)$")


def _check_endpoints(endpoint: Union[str, Sequence[str]]) -> list[str]:
    """The endpoints as a list, each checked to be ``tcp://host:port`` or ``ipc://path``."""
    endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint) if isinstance(endpoint, Sequence) else None
    if endpoints is None:
        raise TypeError(f"endpoint must be a string or a list of strings ({_transport.ENDPOINT_FORMS}), got {type(endpoint).__name__}")
    if not endpoints:
        raise ValueError(f"no endpoint given: pass one or more of {_transport.ENDPOINT_FORMS}, or None for a private server")
    for e in endpoints:
        if not isinstance(e, str):
            raise TypeError(f"an endpoint must be a string ({_transport.ENDPOINT_FORMS}), got {type(e).__name__} {e!r}")
        match = _ENDPOINT.match(e)
        if match is None or (match["port"] is not None and not 1 <= int(match["port"]) <= 65535):
            hint = f"; did you mean 'tcp://{e}'?" if "://" not in e and ":" in e else ""
            raise ServerStartError(f"{e!r} is not a frame server endpoint: use {_transport.ENDPOINT_FORMS}{hint}")
    return endpoints


#: What ``AsyncVideo(server=...)`` takes.
SERVER_KINDS = ("process", "own", "user")


def _check_server(server: str) -> str:
    if server not in SERVER_KINDS:
        raise ValueError(f"server must be one of {', '.join(map(repr, SERVER_KINDS))} (or ASYNCFRAMES_SERVER), got {server!r}")
    return server


def _check_workers(workers: Any) -> None:
    if workers is None:
        return
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive number of decoder threads, or None for the default (one per 2 CPUs, at least 2); got {workers!r}")


def _check_window(window: Any) -> None:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be a positive number of chunks (1, 2, ...; the default is 2), got {window!r}")


def _at_least(deadline: Optional[float], slack: float = 1.0) -> Optional[float]:
    """A deadline for a message the protocol needs (a credit): the caller's, but never less than ``slack`` from now."""
    return None if deadline is None else max(deadline, time.monotonic() + slack)


def _seconds(t: float) -> str:
    """``t`` for a message: 3, 30, 0.5 (never 2.99846)."""
    return f"{t:.1f}".rstrip("0").rstrip(".")


def _server_options(workers: Optional[int]) -> list[str]:
    return ["--workers", str(int(workers))] if workers else []


def _nothing() -> None:
    pass


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        pass


__all__ = ["AsyncVideo", "FrameChunk", "normalize_frame_idxs"]
