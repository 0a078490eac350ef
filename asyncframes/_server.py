"""The frame server's driver: one thread, one ROUTER socket, carrying out what the core decides.

Every protocol decision (what to answer, which chunk goes next, credit, limits, floods,
cancels, slots, pings, shutdown) is :class:`asyncframes._server_state.ServerState`'s. This
module only does what the core cannot: it polls the socket and the lifeline, reads raw
messages into the core, opens and decodes videos, makes and closes shared-memory buffers,
keeps the buffers of sent chunks for reuse (with ZeroMQ's trackers, reporting the bytes
still queued per client), sends what the core says to send (reporting clients that are gone
or stopped reading), and takes the time. The loop: read what waits, handle one fair round,
decode one chunk (or read around the last small request while idle), tidy, repeat.

Run privately by :class:`asyncframes.AsyncVideo` (``asyncframes serve --lifeline``:
it exits when its client process is gone), or standalone with ``asyncframes serve``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import _files as files
from . import _index_store as index_store
from . import _protocol as protocol
from . import _shm as shm
from ._config import ServerConfig
from ._opener import VideoOpener
from ._pool import DecoderPool, default_workers
from ._protocol import ShmProbe
from ._reader import FrameCache, ReadInterrupted
from ._server_actions import (
    Action,
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
    Stop,
    VideoFacts,
)
from ._server_state import ServerState
from ._transport import PeerBusy, PeerGone, ServerCurve, ServerSocket
from ._version import __version__

log = logging.getLogger(__name__)

#: How often a chunk being decoded looks for a cancel of its request, in seconds (between
#: frames). A GUI that jumps elsewhere waits for this at most; at 5 ms the first chunk of a
#: new request on a busy server came 3 ms later (27.5 against 31 ms at 384x384), and a check
#: that finds nothing costs a few microseconds.
INTERRUPT_CHECK_S = 0.001
#: Raw messages read off the socket per loop iteration at most (about a millisecond's work;
#: libzmq reads connections in turn, so a batch holds every client's messages) ...
READ_BATCH = 1024
#: ... and per check for a cancel while a chunk decodes (every INTERRUPT_CHECK_S).
INTERRUPT_READ_BATCH = 128
#: Seconds one read of the socket in the loop may spend throwing away what silenced (dropped
#: for flooding) connections send: reading keeps up with a flood without letting it take the
#: loop from the clients being served.
SILENCED_DRAIN_S = 0.02
#: ... and in a cancel check: 40% of INTERRUPT_CHECK_S, so a chunk being decoded gives at most
#: 40% of its time to throwing a flood away (as 2 ms of every 5 did when checks were 5 ms apart).
INTERRUPT_SILENCED_DRAIN_S = 0.4 * INTERRUPT_CHECK_S
#: Idle this long (no message, nothing to decode), a server writes what opening videos learnt
#: to their index records: a client that opens a video and then asks for frames is not kept
#: waiting while it writes.
RECORDS_IDLE_S = 0.05


class _BufferPool:
    """Chunk buffers reused once ZeroMQ has sent them, and the count of bytes it has not sent yet.

    Fresh memory costs a page fault per 4 KiB on first touch, which for large
    frames costs more than decoding; reusing buffers avoids it. Free buffers are
    bounded by ``max_bytes`` and dropped by :meth:`trim`. Buffers lent to ZeroMQ
    are counted per client (:meth:`queued_by_client`), so the core can bound them.
    """

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._free: list[np.ndarray] = []
        self._lent: list[tuple[np.ndarray, Any, bytes]] = []

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """A uint8 buffer of ``shape``: a kept one if one fits, else fresh."""
        self._collect()
        for k, buf in enumerate(self._free):
            if buf.shape == shape:
                return self._free.pop(k)
        return np.empty(shape, dtype=np.uint8)

    def lend(self, buf: np.ndarray, tracker: Any, client: bytes = b"") -> None:
        """``buf`` is being sent to ``client``; it returns to the pool when ``tracker`` is done."""
        if tracker is not None and not tracker.done:
            self._lent.append((buf, tracker, client))
        else:
            self._free.append(buf)

    def queued_by_client(self) -> dict[bytes, int]:
        """Bytes lent to ZeroMQ and not yet sent, per client."""
        self._collect()
        out: dict[bytes, int] = {}
        for buf, _tracker, to in self._lent:
            out[to] = out.get(to, 0) + buf.nbytes
        return out

    def trim(self, keep: int = 0) -> int:
        """Free all but ``keep`` bytes of the buffers kept for reuse; returns the bytes freed."""
        self._collect()
        before = self.free_bytes
        self._shrink(keep)
        return before - self.free_bytes

    @property
    def free_bytes(self) -> int:
        return sum(b.nbytes for b in self._free)

    def _collect(self) -> None:
        if any(tracker.done for _buf, tracker, _to in self._lent):
            self._free += [buf for buf, tracker, _to in self._lent if tracker.done]
            self._lent = [lent for lent in self._lent if not lent[1].done]
        self._shrink(self.max_bytes)

    def _shrink(self, keep: int) -> None:
        while self._free and self.free_bytes > keep:
            self._free.pop(0)


class FrameServer:
    """Serves frames on ``binds`` until stopped, its lifeline breaks, or a signal arrives."""

    def __init__(
        self,
        binds: Sequence[str],
        config: Optional[ServerConfig] = None,
        lifeline_fd: Optional[int] = None,
        curve: Optional[ServerCurve] = None,
    ) -> None:
        self.config = config = config if config is not None else ServerConfig()
        self.socket = ServerSocket(binds, curve=curve, max_message_bytes=protocol.max_header_bytes(config.max_request_frames))
        self.endpoints = self.socket.endpoints
        self.lifeline_fd = lifeline_fd
        self._parent_pid = os.getppid()
        self._probe = shm.Probe() if config.shared_memory and shm.AVAILABLE else None
        offer = ShmProbe(pid=os.getpid(), fd=self._probe.buffer.fd, token=self._probe.token) if self._probe is not None else None
        self.state = ServerState(
            config, version=__version__, shm_offer=offer, root_spellings=files.root_spellings(config.root), now=time.monotonic()
        )
        if config.index_cache is not None:
            index_store.configure(config.index_cache)
        self._opener = VideoOpener(config.root, config.max_open_files, write_records_later=True)
        self._pool = DecoderPool(
            self._opener,
            config.workers or default_workers(),
            config.recent_cache_bytes,
            processes=config.worker_processes if shm.AVAILABLE and config.shared_memory else 0,
            index_cache=config.index_cache,
        )
        self._buffers = _BufferPool(config.buffer_pool_bytes)
        #: Per client, its shared-memory slot buffers by slot number (the core keeps the books).
        self._slots: dict[bytes, dict[int, shm.SharedBuffer]] = {}
        #: Spare slot buffers of clients that left, by key (the core's :class:`Spares`).
        self._spares: dict[int, shm.SharedBuffer] = {}
        #: Frame caches of requests, by (client, request id).
        self._caches: dict[tuple[bytes, int], FrameCache] = {}
        self._running = False
        self._stop_reason = ""

    # -- the loop --------------------------------------------------------------------------------

    def serve_forever(self) -> str:
        """Run until asked to stop; returns why it stopped."""
        lifeline = () if self.lifeline_fd is None else (self.lifeline_fd,)
        wait = self.socket.poller(*lifeline)
        self._running = True
        try:
            while self._running:
                idle_s = self.state.wait_s(time.monotonic(), self._buffers.queued_by_client())
                records = idle_s > 0 and self._opener.records_behind()
                ready = wait(min(idle_s, RECORDS_IDLE_S) if records else idle_s)
                if lifeline and (ready or os.getppid() != self._parent_pid):
                    self.stop("client process is gone")
                    break
                if not self._receive(READ_BATCH) and records:
                    self._opener.write_records()  # idle: what opening learnt goes to the index store
                self._carry_out(self.state.handle_round(time.monotonic()))
                if not self._running:
                    break
                now = time.monotonic()
                decode = self.state.next_chunk(now, self._buffers.queued_by_client())
                if decode is not None:
                    self._decode(decode)
                else:
                    around = self.state.read_around(now)
                    if around is not None:
                        self._read_around(around)
                self._carry_out(self.state.tick(time.monotonic()))
        finally:
            self._shutdown()
        return self._stop_reason

    def log_state(self) -> None:
        """Log what the core holds and why the loop waits (``kill -USR1``, with the stacks).

        Run by the signal handler, between two bytecodes of whatever the main thread is
        doing: a failure to describe is logged, never raised into that code."""
        try:
            lines = self.state.describe(time.monotonic(), self._buffers.queued_by_client())
        except Exception:  # a diagnostic must not break the loop it interrupts
            log.exception("could not describe the server's state")
            return
        log.warning("state (kill -USR1):\n  %s", "\n  ".join(lines))

    def stop(self, reason: str) -> None:
        """Ask the loop to end after the current chunk (safe from a signal handler)."""
        self._stop_reason = self._stop_reason or reason
        self._running = False

    def _receive(self, limit: int, drain_s: float = SILENCED_DRAIN_S) -> int:
        """Read up to ``limit`` waiting messages into the core; how many it kept.

        Reading is cheap and never decodes, so what libzmq holds stays small. What silenced
        connections send is thrown away for at most ``drain_s`` per call.
        """
        count = 0
        drain_until: Optional[float] = None
        while count < limit:
            got = self.socket.recv()
            if got is None:
                return count
            client, parts = got
            if self.state.receive(client, parts):
                count += 1
                continue
            if self.state.disconnect_due(client):
                outcome = self.socket.disconnect_last_sender()
                log.warning("client %s went on flooding after it was dropped; its connection: %s", client.hex(), outcome)
            now = time.monotonic()
            if drain_until is None:
                drain_until = now + drain_s
            elif now > drain_until:
                return count
        return count

    def _shutdown(self) -> None:
        self._carry_out(self.state.shutdown(self._stop_reason or "server stopped"))
        if self._probe is not None:
            self._probe.close()
        self._close_spares(list(self._spares))
        self._pool.close()
        self._opener.close()
        self.socket.close()
        log.info("server stopped: %s", self._stop_reason or "stopped")

    # -- carrying out actions --------------------------------------------------------------------

    def _carry_out(self, actions: Sequence[Action], payload: Optional[np.ndarray] = None) -> None:
        """Do what the core decided; ``payload``: the frames of a chunk just decoded."""
        for action in actions:
            if isinstance(action, Send):
                self._send(action, payload if action.payload else None)
            elif isinstance(action, OpenVideo):
                self._carry_out(self.state.video_opened(action.ticket, self._open(action), time.monotonic()))
            elif isinstance(action, ResizeCache):
                cache = self._caches.get((action.client, action.request_id))
                if cache is not None and cache.max_bytes != action.max_bytes:
                    cache.resize(action.max_bytes)
            elif isinstance(action, ForgetRequest):
                self._caches.pop((action.client, action.request_id), None)
            elif isinstance(action, ForgetClient):
                bufs = self._slots.pop(action.client, {})
                for slot, key in action.spares:
                    self._spares[key] = bufs.pop(slot)
                for buf in bufs.values():
                    buf.close()
                for key in [key for key in self._caches if key[0] == action.client]:
                    del self._caches[key]
            elif isinstance(action, CloseSpares):
                self._close_spares(action.keys)
            elif isinstance(action, ForgetVideo):
                self._opener.forget(action.video)
            elif isinstance(action, FreeBuffers):
                self._pool.tidy()
                if self._buffers.trim() or action.release_memory:
                    _release_free_memory()
            elif isinstance(action, ReleaseMemory):
                _release_free_memory()
            elif isinstance(action, Stop):
                self.stop(action.reason)
            else:
                raise TypeError(f"no way to carry out {action!r}")

    def _send(self, send: Send, payload: Optional[np.ndarray]) -> None:
        try:
            tracker = self.socket.send(send.client, send.message, payload)
        except PeerGone:
            self._carry_out(self.state.send_failed(send, busy=False))
            return
        except PeerBusy:
            self._carry_out(self.state.send_failed(send, busy=True))
            return
        if payload is not None:
            self._buffers.lend(payload, tracker, send.client)

    def _open(self, action: OpenVideo) -> "VideoFacts | BaseException":
        try:
            reader = self._opener.open(action.video)
            gray = reader.resolve_grayscale(action.video.grayscale)
            return VideoFacts(
                frame_count=reader.frame_count,
                grayscale=gray,
                frame_shape=reader.frame_shape(gray, action.video),
                identity=reader.signature,
                info=reader.info(action.video.grayscale, action.video) if action.info else None,
                frame_times=reader.frame_times() if action.frame_times else None,
            )
        except Exception as exc:
            return exc

    def _decode(self, decode: Decode) -> None:
        """Decode one chunk into its slot or a kept buffer, and send it."""
        slots = self._slots.setdefault(decode.client, {}) if decode.slot is not None or decode.close_slots else {}
        for slot in decode.close_slots:
            buf = slots.pop(slot, None)
            if buf is not None:
                buf.close()
        for client, slot, key in decode.to_spares:
            self._spares[key] = self._slots[client].pop(slot)
        self._close_spares(decode.close_spares)
        if decode.slot is not None and decode.slot.spare is not None:
            slots[decode.slot.slot] = self._spares.pop(decode.slot.spare)
        if decode.slot is not None and decode.slot.new:
            try:
                buf = shm.SharedBuffer(decode.slot.size, f"asyncframes-slot-{decode.slot.slot}")
            except OSError as exc:  # no shared memory to be had now: inline, if there is room
                chosen = self.state.slot_failed(decode, exc, time.monotonic(), self._buffers.queued_by_client())
                if chosen is None:
                    return
                decode = chosen
            else:
                slots[decode.slot.slot] = buf
                self.state.slot_made(decode, buf.fd)
        frames = slots[decode.slot.slot].view(decode.shape) if decode.slot is not None else self._buffers.take(decode.shape)
        cache = self._cache(decode)
        try:
            self._pool.read(
                decode.video,
                decode.frames,
                decode.grayscale,
                frames,
                identity=decode.identity,
                cache=cache,
                recent=decode.recent,
                interrupt=self._interrupter(decode),
                shared=slots[decode.slot.slot] if decode.slot is not None else None,
            )
        except ReadInterrupted:  # its client cancelled it (or flooded): handled on its turn
            self._carry_out(self.state.chunk_interrupted(decode, time.monotonic()))
            return
        except Exception as exc:
            self._carry_out(self.state.chunk_failed(decode, exc, time.monotonic()))
            return
        self._carry_out(self.state.chunk_decoded(decode, time.monotonic()), payload=frames)

    def _close_spares(self, keys: Sequence[int]) -> None:
        for key in keys:
            buf = self._spares.pop(key, None)
            if buf is not None:
                buf.close()

    def _cache(self, decode: Decode) -> Optional[FrameCache]:
        use = decode.cache
        if use is None:
            return None
        key = (decode.client, decode.request_id)
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = FrameCache(use.max_bytes, finish_gops=use.finish_gops)
        elif cache.max_bytes != use.max_bytes:
            cache.resize(use.max_bytes)
        cache.want(later=use.later, now=decode.frames)
        return cache

    def _interrupter(self, decode: Decode) -> Callable[[], bool]:
        """Asked between frames: has ``decode``'s client cancelled its request? Other messages
        wait their turn. A client that moves on (a GUI jumping elsewhere) then waits for at
        most a few milliseconds, not for the rest of a chunk nobody wants."""
        next_check = [time.monotonic() + INTERRUPT_CHECK_S]

        def cancelled() -> bool:
            now = time.monotonic()
            if now < next_check[0]:
                return False
            next_check[0] = now + INTERRUPT_CHECK_S
            self._receive(INTERRUPT_READ_BATCH, INTERRUPT_SILENCED_DRAIN_S)
            return self.state.cancel_queued(decode.client, decode.request_id)

        return cancelled

    def _read_around(self, around: ReadAround) -> None:
        """While idle, decode the frames around the last small request into the recent-frames
        cache; any message that arrives stops this between two frames."""
        kept = self._pool.read_around(around.video, around.grayscale, around.frames, interrupt=self.socket.has_message)
        if kept:
            log.debug("read around %s: kept %d of frames %s", around.video.filename, kept, around.frames)


def _release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise); a no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError, TypeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
