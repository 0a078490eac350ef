"""asyncio: ``async with`` / ``async for`` over frames, never blocking the event loop.

:class:`AsyncVideo` here is a thin driver, as ``zmq.asyncio`` is for pyzmq: the client's
core, sockets and private server are those of :class:`asyncframes.AsyncVideo` (made with
``wait=False``, so nothing waits for the server to start); this driver only watches the
client's descriptors with ``loop.add_reader`` and, when one is readable, lets the client
take in what arrived. ZeroMQ's descriptors are edge-triggered: after every activation and
every call that sends, the client is drained once more before the loop waits again.

    async with asyncframes.asyncio.AsyncVideo() as av:
        print(await av.info("clip.mp4"))
        await av.load_by_chunk("clip.mp4", range(100), frames_per_chunk=16)
        async for frame_idxs, frames in av.chunks:
            ...
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

from . import _protocol
from ._client import AsyncVideo as _SyncVideo
from ._client import FrameChunk, FrameIdxs, VideoLike
from ._video import VideoInfo
from .errors import RequestTimeoutError

__all__ = ["AsyncVideo"]

# cattrs builds its (un)structuring code on first use: now, at import, not on the loop.
_protocol.warm_up()

T = TypeVar("T")
#: While a server starts, how often to look whether it failed to (it sends nothing until ready).
_START_CHECK_S = 0.25


class AsyncVideo:
    """Frames from background frame servers, for asyncio.

    Takes the keyword arguments of :class:`asyncframes.AsyncVideo` (``endpoint``,
    ``timeout``, ``window``, ...). Construction returns at once, even while a private
    server starts; the first call that needs the server waits for it without blocking the loop.
    Not thread-safe: use it from the loop it was first used on.
    """

    def __init__(self, endpoint: Any = None, **options: Any) -> None:
        self.timeout: Optional[float] = options.get("timeout", 30.0)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._fds: list[int] = []
        self._generation: tuple[int, ...] = ()
        # A few milliseconds (the server process is spawned, nothing waits for it); validates
        # the options at once.
        self._sync = _SyncVideo(endpoint, wait=False, **options)

    async def _client_made(self) -> _SyncVideo:
        return self._client

    @property
    def _client(self) -> _SyncVideo:
        return self._sync

    @classmethod
    async def from_video(cls, video: VideoLike, frame_idxs: FrameIdxs = None, frames_per_chunk: int = 64,
                         **options: Any) -> "AsyncVideo":
        """Start a client and request frames of ``video`` (see :meth:`load_by_chunk`)."""
        av = cls(**options)
        try:
            await av.load_by_chunk(video, frame_idxs, frames_per_chunk)
        except BaseException:
            await av.aclose()
            raise
        return av

    # -- the loop's side -------------------------------------------------------------------

    async def _attach(self) -> asyncio.Event:
        """Watch the client's descriptors on the running loop (once)."""
        await self._client_made()
        if self._wakeup is None:
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
            self._fds, self._generation = self._client.fds(), self._client.sockets_generation()
            for fd in self._fds:
                self._loop.add_reader(fd, self._wakeup.set)
        return self._wakeup

    def _rewatch(self) -> bool:
        """Watch the client's descriptors again if its sockets changed (a connection was replaced
        after its server went away: the new socket has new descriptors, though the system may
        have given them the old numbers); whether they did.

        The new socket may have signalled (connected, greeted) before the loop watched it, and
        its descriptor is edge-triggered: the caller must drain the client again before waiting.
        """
        if self._wakeup is None or self._loop is None:
            return False
        generation = self._client.sockets_generation()
        if generation == self._generation:
            return False
        for fd in self._fds:
            self._loop.remove_reader(fd)
        self._generation, self._fds = generation, self._client.fds()
        for fd in self._fds:
            self._loop.add_reader(fd, self._wakeup.set)
        return True

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for fd in self._fds:
                self._loop.remove_reader(fd)
        self._fds, self._wakeup, self._loop = [], None, None

    async def _until(self, outcome: Callable[[], "Optional[T]"], timeout: Optional[float], what: str) -> T:
        """Drive the client until ``outcome()`` is not None; at most ``timeout`` seconds."""
        wakeup = await self._attach()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wakeup.clear()
            self._client.process_events()  # drains: the edge-triggered descriptors may fire again
            if self._rewatch():
                continue  # what the new socket signalled before it was watched: drain it now
            found = outcome()
            if found is not None:
                return found
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RequestTimeoutError(f"{what} did not happen within {timeout:g} s")
            if not self._client.ready:  # a starting server sends nothing: look whether it failed
                remaining = _START_CHECK_S if remaining is None else min(remaining, _START_CHECK_S)
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_ready(self) -> None:
        """Until every server has answered (a private one has started).

        Raises:
            ServerStartError: it did not start, or did not answer within ``start_timeout``.
        """
        await self._until(lambda: True if self._client.ready else None, None, "the server's answer")

    # -- the API -----------------------------------------------------------------------------

    async def info(self, video: VideoLike, timeout: Any = ...) -> VideoInfo:
        """What ``video`` holds (see :meth:`asyncframes.AsyncVideo.info`)."""
        timeout = self.timeout if timeout is ... else timeout
        await self.wait_ready()
        rid = self._client.request_info(video)
        return await self._until(lambda: self._client.info_reply(rid), timeout, "the answer to info")

    async def load_by_chunk(self, video: VideoLike, frame_idxs: FrameIdxs = None, frames_per_chunk: int = 64) -> None:
        """Request frames (see :meth:`asyncframes.AsyncVideo.load_by_chunk`); a new request
        replaces the one in flight."""
        await self.wait_ready()
        self._client.load_by_chunk(video, frame_idxs, frames_per_chunk)
        self._client.process_events()

    @property
    def chunks(self) -> AsyncIterator[FrameChunk]:
        """The current request's chunks, in order: ``async for frame_idxs, frames in av.chunks``.

        Raises (when iterated): as :attr:`asyncframes.AsyncVideo.chunks`, and
        :class:`RequestTimeoutError` if no chunk arrives within ``timeout``.
        """
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[FrameChunk]:
        client = await self._client_made()
        stream = client.iteration_start()
        while not client.iteration_over(stream):
            chunk = await self._until(lambda: client.next_chunk(timeout=0) if not client.done else _END,
                                      self.timeout, "the next chunk")
            if chunk is _END:
                continue
            client.process_events()  # taking it sent credit: drain before the loop waits again
            yield chunk

    def cancel(self) -> None:
        """Abandon the current request (see :meth:`asyncframes.AsyncVideo.cancel`)."""
        self._client.cancel()

    @property
    def done(self) -> bool:
        return self._client.done

    async def aclose(self) -> None:
        """Close the client (and its own private server, if it has one: ``server="own"``; the
        wait for that server to exit, about 0.1 s, happens in a worker thread, not on the loop)."""
        self._detach()
        await asyncio.get_running_loop().run_in_executor(None, self._sync.close)

    def close(self) -> None:
        """Close the client (with ``server="own"``, blocking until its server exits: prefer :meth:`aclose`)."""
        self._detach()
        self._sync.close()

    async def __aenter__(self) -> "AsyncVideo":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


#: The outcome "the request has ended" while waiting for a chunk.
_END: Any = object()
