"""Decoder workers and the recent-frames cache: every frame the server sends is decoded here.

A chunk's frames are grouped by the keyframe they decode from, and GOP *g* goes to worker
*g mod n*, but only when that splits the chunk's decoding evenly
(:func:`asyncframes._split.chunk_shares`): frames from all over a video (random and shuffled
requests) do; a chunk of an in-order stream is mostly one GOP, and one decoder reads it
faster than two competing for the same CPUs. Each worker reads through its own reader of
the file (:meth:`VideoOpener.worker_reader`, sharing the file's index, so nothing is
demuxed twice). PyAV releases the GIL while decoding and converting, so the threads run
in parallel. With one worker, a chunk that stays whole, or a small request, the opener's
own reader does the work in the caller's thread.
With worker processes (``serve --worker-processes N``), a chunk of several GOPs that goes
to a shared slot, in order or not, is split by GOP over N processes instead, each writing straight
into the slot (:mod:`asyncframes._procpool`); inline chunks stay with the threads.

Small requests (a GUI showing one frame at a time) go through the recent-frames cache,
which the server fills further while idle (:meth:`DecoderPool.read_around`). Its
entries are keyed by the file's identity too, so a file that changed can never be
served from it: the old version's frames just age out.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from . import _files as files
from ._arena import Warmer
from ._opener import VideoOpener
from ._reader import FrameCache, FrameSource, ReadInterrupted, VideoReader, changed_error
from ._shm import SharedBuffer
from ._split import BALANCED_SHARE, chunk_shares
from ._video import Video

if TYPE_CHECKING:
    from ._procpool import ProcessWorkers

log = logging.getLogger(__name__)

#: What a recent frame is kept under: (filename, stream, grayscale, transforms, the file's identity).
RecentKey = tuple[str, int, bool, tuple, files.SourceIdentity]


def default_workers() -> int:
    """Decoder workers for this machine: one per two CPUs (each decoder runs frame threads of
    its own), and two from two CPUs on. A second decoder is used only for chunks that split
    evenly by GOP (frames from all over a video: random and shuffled requests), where two
    decoders on 2 CPUs ran 1.04-1.36x one (random) and 1.07-1.27x (shuffled): one decoder's
    frame threads leave a quarter of the CPUs idle. An in-order chunk stays with one
    (:func:`asyncframes._split.chunk_shares`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 1 if cpus < 2 else max(2, cpus // 2)


#: Spare frames the recent-frames cache keeps written ahead of need, for the shape it last
#: kept, while it is not full: at most this many frames ...
WARM_AHEAD_FRAMES = 8
#: ... and this many bytes.
WARM_AHEAD_BYTES = 16 << 20


class RecentFrames:
    """The frames of recent small requests, for a GUI that asks for the same frame again.

    Least recently used frames go first once ``max_bytes`` is exceeded. Keys say which
    file (and which version of it), stream and grayscale setting a frame belongs to.

    A new frame is written over the memory of one it lets go of when one has its shape (memory
    written before costs ~0.03 ms per MB here; fresh memory ~0.7 ms per MB, as long as
    decoding a small frame). Until the cache is full, a ``warmer`` (if given) writes a few
    spare frames of the shape last kept ahead of need (:data:`WARM_AHEAD_FRAMES`), so a
    cold frame is not kept waiting for fresh memory. Spares count in ``max_bytes``, and go
    first when frames need the room.
    """

    def __init__(self, max_bytes: int, warmer: Optional[Warmer] = None) -> None:
        self.max_bytes = max_bytes
        #: Bytes of the frames kept.
        self.nbytes = 0
        self._warmer = warmer
        self._frames: "OrderedDict[tuple[Any, int], np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()  # the spares, which the warmer's thread adds to
        self._spares: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._spare_bytes = 0
        self._wanted: Optional[tuple[tuple[tuple[int, ...], str], int]] = None  # (shape, count) the warmer writes

    def get(self, key: Any, i: int) -> Optional[np.ndarray]:
        """The kept frame (valid until the next :meth:`put`), or None."""
        frame = self._frames.get((key, i))
        if frame is not None:
            self._frames.move_to_end((key, i))
        return frame

    def has(self, key: Any, i: int) -> bool:
        return (key, i) in self._frames

    @property
    def spare_bytes(self) -> int:
        """Bytes of spare frames written ahead."""
        return self._spare_bytes

    def put(self, key: Any, i: int, frame: np.ndarray) -> None:
        """Keep a copy of ``frame``; the least recently used frames go to make room, and the
        copy is written over one of them when one has the same shape, else into a spare."""
        if not 0 < frame.nbytes <= self.max_bytes or (key, i) in self._frames:
            return
        shape = (frame.shape, frame.dtype.str)
        with self._lock:
            spares = self._spares.get(shape)
            reuse = spares.pop() if spares else None
            if reuse is not None:
                self._spare_bytes -= reuse.nbytes
            while self._spare_bytes and self.nbytes + self._spare_bytes + frame.nbytes > self.max_bytes:
                self._drop_a_spare()
        while self._frames and self.nbytes + self._spare_bytes + frame.nbytes > self.max_bytes:
            _, old = self._frames.popitem(last=False)
            self.nbytes -= old.nbytes
            if reuse is None and old.shape == frame.shape and old.dtype == frame.dtype:
                reuse = old
        if reuse is None:
            reuse = np.empty_like(frame)
        np.copyto(reuse, frame)
        self._frames[(key, i)] = reuse
        self.nbytes += frame.nbytes
        if self._warmer is not None:
            room = (self.max_bytes - self.nbytes - self._spare_bytes) // frame.nbytes
            with self._lock:
                have = len(self._spares.get(shape, ()))
            ahead = min(WARM_AHEAD_FRAMES - have, WARM_AHEAD_BYTES // frame.nbytes - have, room)
            if ahead > 0:
                with self._lock:
                    self._wanted = (shape, have + ahead)
                self._warmer.ask(self._warm_one)

    def _warm_one(self) -> bool:
        """Write one spare frame of the shape wanted (the warmer's thread); False when enough are written."""
        with self._lock:
            if self._wanted is None:
                return False
            shape, count = self._wanted
            if len(self._spares.get(shape, ())) >= count or self.nbytes + self._spare_bytes >= self.max_bytes:
                self._wanted = None
                return False
        spare = np.empty(shape[0], np.dtype(shape[1]))
        spare.fill(0)  # written, not only mapped, so taking it later costs no page faults (NumPy lets go of the GIL meanwhile)
        with self._lock:
            if self._wanted is None or self.nbytes + self._spare_bytes + spare.nbytes > self.max_bytes:
                return False
            self._spares.setdefault(shape, []).append(spare)
            self._spare_bytes += spare.nbytes
        return True

    def _drop_a_spare(self) -> None:
        """Let go of one spare (of any shape; under the lock)."""
        for spares in self._spares.values():
            if spares:
                self._spare_bytes -= spares.pop().nbytes
                return

    def close(self) -> None:
        """Forget every frame and spare."""
        with self._lock:
            self._wanted = None
            self._spares.clear()
            self._spare_bytes = 0
        self._frames.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._frames)


class DecoderPool:
    """``workers`` decoder threads and the recent-frames cache; :meth:`read` fills one chunk."""

    def __init__(
        self, opener: VideoOpener, workers: int, recent_cache_bytes: int, processes: int = 0, index_cache: Optional[str] = None
    ) -> None:
        """
        Args:
            opener: opens the videos (the caller closes it, after this pool).
            workers: decoder threads (1: the caller's thread decodes).
            recent_cache_bytes: bytes of frames kept from small requests and reading around.
            processes: decoder worker processes for chunks that go to shared memory (0: none,
                threads decode every chunk; see :mod:`asyncframes._procpool`).
            index_cache: the index store folder the processes use (None: the default).
        """
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if processes < 0:
            raise ValueError("processes must be 0 or more")
        self.opener = opener
        self.workers = workers
        self._warmer = Warmer()
        self.recent = RecentFrames(recent_cache_bytes, self._warmer)
        #: Reading around decodes into this, reused (see :meth:`_around_buffer`).
        self._around: Optional[np.ndarray] = None
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="asyncframes-decoder") if workers > 1 else None
        self.processes: Optional[ProcessWorkers] = None
        if processes:
            from ._procpool import ProcessWorkers

            self.processes = ProcessWorkers(processes, index_cache)

    def read(
        self,
        video: Video,
        idxs: list[int],
        grayscale: bool,
        out: np.ndarray,
        *,
        identity: files.SourceIdentity,
        cache: Optional[FrameCache] = None,
        recent: bool = False,
        interrupt: Optional[Callable[[], bool]] = None,
        shared: Optional[SharedBuffer] = None,
    ) -> None:
        """Frames ``idxs`` of ``video`` into ``out``.

        Args:
            video: the video (opened through the opener if need be).
            idxs: frame indices (checked by the request already).
            grayscale: the grayscale setting as served (resolved, never None).
            out: ``(len(idxs), h, w, c)`` uint8, filled in place.
            identity: the file's identity when the request started.
            cache: the request's frame cache.
            recent: a small request: frames come from, and go to, the recent-frames cache,
                and the caller's thread decodes (straight into ``out``). Otherwise the frames are split by GOP
                over the workers.
            interrupt: asked between frames in the caller's thread (between the worker
                processes' frames too); True stops the read.
            shared: the shared buffer ``out`` is a view of: with worker processes, a chunk
                of several GOPs is decoded by them, straight into it.

        Raises:
            VideoChangedError: the file's identity is not ``identity`` before or after decoding.
            ReadInterrupted: ``interrupt`` said so.
            VideoError: the video could not be opened or decoded.
        """
        main = self.opener.open(video)
        if main.signature != identity:
            raise changed_error(video.filename)
        if recent:
            self._read_recent(main, video, idxs, grayscale, out, cache, interrupt)
            return
        if self.processes is not None and shared is not None and isinstance(main, VideoReader) and not video.files:
            # Processes split every chunk of several GOPs (opt-in, for machines with CPUs to spare:
            # measured on 2 CPUs, no better than threads, in order or not).
            shares = self._split(main, idxs, self.processes.count, evenly=False)
            if len(shares) > 1:
                self.processes.read(main, video, shares, idxs, grayscale, out, shared, identity, cache, interrupt)
                main.check_unchanged()
                return
        shares = self._split(main, idxs, self.workers)
        if self._executor is None or len(shares) < 2:
            main.read(idxs, grayscale=grayscale, out=out, cache=cache, interrupt=interrupt, video=video)
        else:
            futures = [
                self._executor.submit(self._read_share, worker, video, [idxs[p] for p in share], share, grayscale, out, cache)
                for worker, share in shares.items()
            ]
            errors = [f.exception() for f in futures]  # wait for every share: none may still write into out
            for error in errors:
                if error is not None:
                    raise error
        main.check_unchanged()

    def read_around(self, video: Video, grayscale: bool, frames: Sequence[int], interrupt: Callable[[], bool]) -> int:
        """Decode the frames of ``frames`` not yet in the recent-frames cache into it, in that
        order, a few at a time (:data:`READ_AROUND_PIECE`), so that an interruption keeps what
        was decoded before it.

        Uses only a reader that is already open (:meth:`VideoOpener.opened`). An idle nicety:
        it never raises for a failure (the next request reports it), and ``interrupt``
        ends it quietly.

        Returns:
            How many frames were decoded and kept.
        """
        reader = self.opener.opened(video)
        if reader is None:
            return 0
        key = _recent_key(video, grayscale, reader)
        # Frames of the span already kept count as just used: kept from an older request, they
        # would otherwise be the first to go while the span is read, just before they are asked for.
        wanted = [j for j in frames if 0 <= j < reader.frame_count and self.recent.get(key, j) is None]
        kept = 0
        for start in range(0, len(wanted), READ_AROUND_PIECE):
            piece = sorted(wanted[start : start + READ_AROUND_PIECE])
            if interrupt():
                break
            try:
                decoded = reader.read(piece, grayscale=grayscale, out=self._around_buffer(reader, piece, grayscale, video),
                                      interrupt=interrupt, video=video)
            except ReadInterrupted:
                break
            except Exception as exc:  # an idle nicety: a failure here is the next request's to report
                log.debug("reading frames %d..%d of %s failed: %s", piece[0], piece[-1], video.filename, exc)
                break
            if reader.is_stale():
                break  # the file changed while being read: these frames may be of either version
            for j, frame in zip(piece, decoded):
                self.recent.put(key, j, frame)
            kept += len(piece)
        return kept

    def _around_buffer(self, reader: VideoReader, piece: list[int], grayscale: bool, video: Video) -> np.ndarray:
        """Where reading around decodes ``piece`` before the cache copies it: one buffer, reused
        while the frame shape stays (not fresh memory for every frame)."""
        shape = (len(piece), *reader.frame_shape(grayscale, video))
        if self._around is None or self._around.shape != shape:
            self._around = np.empty(shape, np.uint8)
        return self._around

    def tidy(self) -> None:
        """Have worker processes let go of shared memory and caches the server dropped (when idle)."""
        if self.processes is not None:
            self.processes.tidy()

    def close(self) -> None:
        """Stop the workers (after the chunk they are on) and drop the recent frames."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self.processes is not None:
            self.processes.close()
            self.processes = None
        self._around = None
        self.recent.close()
        self._warmer.close()

    def _read_recent(
        self,
        main: VideoReader,
        video: Video,
        idxs: Sequence[int],
        grayscale: bool,
        out: np.ndarray,
        cache: Optional[FrameCache],
        interrupt: Optional[Callable[[], bool]],
    ) -> None:
        key = _recent_key(video, grayscale, main)
        missing = []
        for pos, i in enumerate(idxs):
            kept = self.recent.get(key, i)
            if kept is None:
                missing.append(pos)
            else:
                out[pos] = kept
        log.debug("frames %s: %d of %d from the recent-frames cache", idxs, len(idxs) - len(missing), len(idxs))
        if missing:
            # Straight into the chunk (no array of its own, nor a copy of it into the chunk); the
            # recent-frames cache copies them from there (copying after the chunk is sent was
            # tried: it made a GUI asking for the same frame at once wait for that copy).
            wanted = [idxs[pos] for pos in missing]
            main.read(wanted, grayscale=grayscale, out=out, cache=cache, positions=missing, interrupt=interrupt, video=video)
            main.check_unchanged()
            for i, pos in zip(wanted, missing):
                self.recent.put(key, i, out[pos])

    def _split(self, main: FrameSource, idxs: Sequence[int], workers: int, evenly: bool = True) -> dict[int, list[int]]:
        """Positions in ``idxs`` per worker (of ``workers``), by the GOP each frame decodes from
        (:func:`asyncframes._split.chunk_shares`; ``evenly``: a chunk that would split unevenly,
        or an in-order one, stays whole)."""
        if workers == 1 or len(idxs) < 2:
            return {0: list(range(len(idxs)))}
        return chunk_shares(idxs, main.gop_starts(), workers, BALANCED_SHARE if evenly else None)

    def _read_share(
        self,
        worker: int,
        video: Video,
        idxs: list[int],
        positions: list[int],
        grayscale: bool,
        out: np.ndarray,
        cache: Optional[FrameCache],
    ) -> None:
        reader = self.opener.worker_reader(worker, video)
        reader.read(idxs, grayscale=grayscale, out=out, cache=cache, positions=positions, video=video)


#: Frames read around at a time: an interruption loses at most this many.
READ_AROUND_PIECE = 1


def _recent_key(video: Video, grayscale: bool, reader: VideoReader) -> RecentKey:
    return (video.filename, video.stream, grayscale, (video.crop, video.resize, video.interpolation, video.layout), reader.signature)
