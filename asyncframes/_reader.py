"""Frame-accurate random access to a video with PyAV.

:class:`VideoReader` serves any batch of frame indices (any order, duplicates
allowed) by sorting them, seeking only when the next target lies beyond what
the open decoder reaches cheaply, decoding forward once per needed GOP, and
writing each frame into its place(s) in the output.

Frames are identified by presentation timestamp through the :mod:`index`.
The decoder is checked against the index as it goes: the first frame after a
seek must be the keyframe we aimed for and frames must follow one another
without gaps. Where a seek landed is first checked on the demuxed packets:
packets before the keyframe are dropped undecoded, and a seek that went past
it (MPEG-TS seeks by decode time) makes the reader seek by the keyframe's
decode timestamp from then on. A seek that lands too late is retried from an earlier keyframe;
any other disagreement means the packets lied about what the decoder presents,
and the reader falls back to counting frames of a sequential decode, which is
the definition of frame *i*. It never returns a frame it could not identify.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import attrs
import av
import numpy as np

from . import _index_store as index_store
from ._arena import FrameArena
from ._convert import Converter, is_gray, shaped
from ._disposable import Disposable, disposable_test
from ._files import SourceIdentity, resource_error, source_identity
from ._index import FrameIndex, StreamFacts, check_frame_idxs, index_from_packets, landing
from ._split import gop_starts
from ._times import FrameTimes, frame_times
from ._video import Video, VideoInfo
from .errors import (
    AsyncFramesError,
    VideoChangedError,
    VideoDecodeError,
    VideoNotFoundError,
    VideoOpenError,
)

log = logging.getLogger(__name__)

#: Decoding this many extra frames costs about as much as one seek and decoder refill.
SEEK_COST_FRAMES = 4
#: How many earlier keyframes to try when a seek lands after the one we asked for.
SEEK_RETRIES = 3


class FrameCache:
    """Frames decoded on the way to others, kept for later chunks of the same request.

    A shuffled request needs the same GOPs chunk after chunk; keeping the frames
    later chunks will ask for (within ``max_bytes``) means each GOP is decoded
    about once per request instead of once per chunk. The caller says which
    frames are still ``wanted``; frames nobody wants any more are dropped.

    Frames live in :class:`asyncframes._arena.FrameArena` slots: a frame dropped leaves
    its memory to the next one kept (fresh memory costs ~0.7 ms per MB here).
    """

    def __init__(self, max_bytes: int, finish_gops: bool = True) -> None:
        self.max_bytes = max_bytes
        #: Also decode the rest of each GOP we open when later chunks want it. Worth it for
        #: requests that jump around; an ascending request gets there by decoding on anyway.
        self.finish_gops = finish_gops
        self.nbytes = 0
        self._frames: dict[int, tuple[FrameArena, int, np.ndarray]] = {}
        self._placed: dict[int, tuple[FrameArena, int, np.ndarray]] = {}  # given a place, not yet kept
        self._arena: Optional[FrameArena] = None
        self.wanted: frozenset[int] = frozenset()
        #: What the last :meth:`want` said: the frames later chunks ask for, in their order, and
        #: the frames of the chunk being read (decoder worker processes keep caches of their own).
        self.later: list[int] = []
        self.now: list[int] = []
        #: When each kept frame is needed: its place in ``later`` (-1: by the chunk being read now).
        self._rank: dict[int, int] = {}
        self._lock = threading.Lock()  # decoder workers share a request's cache

    def want(self, later: Iterable[int], now: Iterable[int] = ()) -> None:
        """Frames ``later`` chunks will ask for are kept from now on; frames the chunk
        being read ``now`` needs stay if already kept; everything else is released."""
        with self._lock:
            order = list(later)
            self.later, self.now = order, list(now)
            self.wanted = frozenset(order)
            self._rank = {i: -1 for i in self.now}
            for pos, i in enumerate(order):
                self._rank.setdefault(i, pos)
            for i in [i for i in self._frames if i not in self._rank]:
                self._drop(i)

    def resize(self, max_bytes: int) -> None:
        """Keep at most ``max_bytes`` from now on, releasing the frames needed last to get there.

        The server shrinks a request's cache when more requests share the budget, or when
        the request has been idle, and grows it again when there is room.
        """
        with self._lock:
            self.max_bytes = max(0, max_bytes)
            if self.nbytes > self.max_bytes:
                by_need = sorted(self._frames, key=lambda i: self._rank.get(i, -1))
                while self.nbytes > self.max_bytes and by_need:
                    self._drop(by_need.pop())
            arena = self._arena
            while arena is not None and arena.resident_bytes > self.max_bytes and arena.release():
                pass

    def get(self, i: int) -> Optional[np.ndarray]:
        with self._lock:
            entry = self._frames.get(i)
            return entry[2] if entry is not None else None

    def accepts(self, i: int, nbytes: int) -> bool:
        """Whether :meth:`offer` would keep frame ``i`` of ``nbytes`` bytes."""
        return i in self.wanted and i not in self._frames and i not in self._placed and self.nbytes + nbytes <= self.max_bytes

    def offer(self, i: int, frame: np.ndarray) -> None:
        """Keep a copy of ``frame`` as frame ``i`` if it is wanted and there is room."""
        place = self.place(i, frame.shape)
        if place is not None:
            np.copyto(place, frame)
            self.keep(i, place)

    def place(self, i: int, shape: tuple[int, ...]) -> Optional[np.ndarray]:
        """Where to write frame ``i`` of ``shape`` (uint8) to keep it, then :meth:`keep` it; None
        if it is not wanted or there is no room."""
        nbytes = math.prod(shape)
        if not self.accepts(i, nbytes):
            return None
        with self._lock:
            if not self.accepts(i, nbytes):
                return None
            arena = self._arena
            if arena is None or arena.shape != tuple(shape):
                if self._frames:
                    return None  # one shape per cache (one grayscale setting, one video)
                arena = self._arena = FrameArena(tuple(shape), np.dtype(np.uint8), max(1, self.max_bytes // max(nbytes, 1)))
            taken = arena.take()
            # A budget grown past the arena made for it: memory of its own for this frame.
            slot, view = taken if taken is not None else (-1, np.empty(shape, np.uint8))
            self._placed[i] = (arena, slot, view)  # counted from now on, kept once written
            self.nbytes += nbytes
            return view

    def keep(self, i: int, place: np.ndarray) -> None:
        """Frame ``i`` is written into ``place`` (from :meth:`place`): keep it, unless it is no
        longer wanted (its place is let go of then)."""
        with self._lock:
            entry = self._placed.pop(i)
            assert entry[2] is place, "keep() takes the place place() gave"
            self._frames[i] = entry
            if i not in self._rank and i not in self.wanted:
                self._drop(i)

    def abandon(self, i: int) -> None:
        """Frame ``i`` was not written into the place :meth:`place` gave: let go of it."""
        with self._lock:
            self._frames[i] = self._placed.pop(i)
            self._drop(i)

    def _drop(self, i: int) -> None:
        arena, slot, view = self._frames.pop(i)
        self.nbytes -= view.nbytes
        if slot >= 0:
            arena.give_back(slot)

    def __len__(self) -> int:
        return len(self._frames)


@attrs.define
class ReaderStats:
    """What a reader has done so far, for tests and benchmarks (cumulative, never reset by it)."""

    #: frames the decoder presented (wanted or not, leftovers before a keyframe included).
    frames_decoded: int = 0
    #: times the file was opened (indexing, counting and decoding from the start included).
    opens: int = 0
    #: seeks handed to the demuxer.
    seeks: int = 0
    #: packets dropped undecoded because a seek landed before the keyframe aimed for.
    packets_skipped: int = 0
    #: packets of non-reference frames nobody wanted, left undecoded on the way to wanted ones.
    packets_undecoded: int = 0
    #: seeks that went past the keyframe aimed for.
    late_landings: int = 0
    #: times the packet index was given up for counting decoded frames.
    counting_fallbacks: int = 0


class _Mismatch(Exception):
    """The decoder presented something the index did not predict."""


class _Damaged(Exception):
    """Damaged data (a decode error, or a frame flagged corrupt) while decoding with frame threads."""


class ReadInterrupted(Exception):
    """A read stopped between frames because its ``interrupt`` callback said so."""


class _Overshoot(Exception):
    """A seek landed after the keyframe we asked for."""


class _LandedLate(_Overshoot):
    """The first packet after a seek lies after the keyframe we asked for (nothing was decoded)."""


def changed_error(filename: str, doing: str = "being read") -> VideoChangedError:
    """The error for a file that changed under a request: its frames are never mixed with the new ones."""
    return VideoChangedError(
        f"{filename}: the file changed while {doing} (replaced or rewritten); "
        "frames of two versions are never mixed: ask again to read the new version"
    )


class FrameSource:
    """What every reader says about its frames, from its size and what its first frame showed:
    the grayscale option as served, frame shapes after transforms, the checks of indices and
    its :class:`VideoInfo`. A reader sets ``filename``, ``width``, ``height``, ``fps``,
    ``codec``, ``pix_fmt``, ``container_format``, ``duration`` and ``frame_count``, gives
    :meth:`gop_starts`, and either ``_gray`` or :meth:`_detect_grayscale`."""

    filename: str
    width: int
    height: int
    fps: float
    codec: str
    pix_fmt: str
    container_format: str
    duration: Optional[float]
    #: Whether the first frame is gray, once known (None: not found out yet).
    _gray: Optional[bool] = None

    @property
    def frame_count(self) -> int:
        raise NotImplementedError

    def gop_starts(self) -> Sequence[int]:
        """Where a decoder can start reading, sorted: the frames the decoder pool splits a chunk
        at (:func:`asyncframes._split.chunk_shares`). Every reader the server opens has them."""
        raise NotImplementedError

    @property
    def detected_grayscale(self) -> bool:
        """Whether the first frame is gray (all channels equal): what ``grayscale=None`` serves.

        Found out the first time it is asked (a video decodes its first frame then), and kept.
        """
        if self._gray is None:
            self._gray = self._detect_grayscale()
        return self._gray

    def _detect_grayscale(self) -> bool:
        """Find out whether the first frame is gray (called once, when first needed)."""
        raise NotImplementedError

    @property
    def record_behind(self) -> bool:
        """Whether this reader learnt something its file's index record lacks (see :meth:`write_record`)."""
        return False

    def write_record(self) -> None:
        """Write what this reader learnt to its file's index record (nothing, for readers without one)."""

    def resolve_grayscale(self, grayscale: Optional[bool]) -> bool:
        """The grayscale option as served: None means what the first frame showed (found out
        now if nobody asked before); True or False is served as given, nothing decoded."""
        return self.detected_grayscale if grayscale is None else grayscale

    def info(self, grayscale: Optional[bool] = None, video: Optional[Video] = None) -> VideoInfo:
        """Metadata, with channels resolved for the given grayscale option (and the size after
        ``video``'s transforms, the decoded size then in ``source_height``/``source_width``)."""
        gray = self.resolve_grayscale(grayscale)
        h, w, c = frame_hwc(self.frame_shape(gray, video), video)
        resized = (h, w) != (self.height, self.width)
        return VideoInfo(
            source_height=self.height if resized else None,
            source_width=self.width if resized else None,
            filename=self.filename,
            frame_count=self.frame_count,
            height=h,
            width=w,
            channels=c,
            grayscale=gray,
            fps=self.fps,
            codec=self.codec,
            pix_fmt=self.pix_fmt,
            container=self.container_format,
            duration=self.duration,
        )

    def check_indices(self, idxs: "Sequence[int] | range | np.ndarray") -> None:
        """Raise :class:`FrameIndexError` naming the first index that is not a frame (see :func:`index.check_frame_idxs`)."""
        check_frame_idxs(idxs, self.frame_count, self.filename)

    def frame_shape(self, grayscale: Optional[bool] = None, video: Optional[Video] = None) -> tuple[int, int, int]:
        """``(h, w, c)`` of the frames :meth:`read` returns for this grayscale option (and
        ``video``'s transforms: ``(c, h, w)`` for CHW).

        Raises:
            VideoOpenError: ``video``'s crop does not lie inside the frame.
        """
        channels = 1 if self.resolve_grayscale(grayscale) else 3
        if video is None or not video.transformed:
            return (self.height, self.width, channels)
        try:
            return video.shaped(self.height, self.width, channels)
        except ValueError as exc:
            raise VideoOpenError(f"{self.filename}: {exc}") from None


class VideoReader(FrameSource):
    """An open video with a frame index and a decoder kept open between reads.

    Not thread-safe: one reader serves one request at a time.
    """

    #: Seek by keyframes' decode timestamps (learnt from a seek that landed late, e.g. MPEG-TS).
    _seek_by_dts = False

    def __init__(
        self,
        filename: str,
        stream: int = 0,
        thread_type: Optional[str] = "AUTO",
        container_options: Optional[dict[str, str]] = None,
        index: Optional[FrameIndex] = None,
        write_record_later: bool = False,
    ) -> None:
        """``thread_type``: the decoder's threading ("AUTO" adds frame threads; None keeps
        PyAV's default). Valid streams decode bit-identically either way. On damaged data
        the decoder conceals errors, and how depends on its threading and history; the
        first frame flagged corrupt switches this reader to PyAV's default threading (what
        a plain sequential decode uses), which brings it closer, but a concealed frame's
        pixels are not promised, only its identity. ``index``: one already built for
        this file (another reader's), to skip demuxing it again. ``write_record_later``:
        what this reader learns that the file's index record lacks (its index, its stream's
        facts, whether the first frame is gray) is written by :meth:`write_record`, not at
        once (a server answers first, and writes after)."""
        self.filename = filename
        self.stream_index = stream
        self.thread_type = thread_type
        self.container_options = dict(container_options or {})
        self.stats = ReaderStats()
        self._container: Optional[av.container.InputContainer] = None
        self._stream: Optional[av.video.stream.VideoStream] = None
        self._frames: Optional[Iterator[av.VideoFrame]] = None
        self._last = -1  # index of the last frame the decoder presented
        self._anchor: Optional[int] = None  # frames before this pts are seek leftovers
        self._after_seek = False
        #: Leaving packets of unwanted non-reference frames undecoded (see :mod:`._disposable`): the
        #: test for this stream (None: none known), whether it is still trusted here, the
        #: frames of the current read that must be decoded and the first frame past its last
        #: target (None between reads: frames decoded ahead may be wanted by the next read),
        #: and the frames left undecoded that the decoder has not gone past yet.
        self._disposable: Optional[Disposable] = None
        self._leave_undecoded = True
        self._keep: frozenset[int] | set[int] = frozenset()
        self._leave_before: Optional[int] = None
        self._undecoded: set[int] = set()
        self._convert = Converter(filename)
        #: The index :meth:`gop_starts` last worked on, and where its GOPs start.
        self._gop_starts: Optional[tuple[FrameIndex, list[int]]] = None
        #: The identity of the file(s) as opened (see :mod:`asyncframes._files`).
        self.signature: SourceIdentity = source_identity(filename)
        #: Where the index came from: "given" (another reader's), "stored" (on disk, see
        #: :mod:`asyncframes._index_store`), "demuxed" or "counted".
        self.index_source = "given"
        #: Where this file's record is kept (None: nowhere), and the index it is made of.
        self._record: Optional[tuple[index_store.IndexStore, str]] = None
        self._record_index: Optional[FrameIndex] = None
        self._write_later = write_record_later
        #: What the record lacks that this reader knows: written by :meth:`write_record`.
        self._record_behind = False
        #: Whether the record says if the first frame is gray.
        self._record_knows_gray = False
        # The file is opened at most once here: not at all when its record describes it (the
        # first read opens it), else for its metadata and then (unless the index is given or
        # stored) its packets; the first read reuses the container if nothing was demuxed.
        found = self._load_record() if index is None else None
        facts = found.facts if found is not None else None
        if facts is None:
            facts = self._open_facts()
        self._facts = facts
        self.width, self.height = facts.width, facts.height
        self.codec, self.pix_fmt, self.container_format = facts.codec, facts.pix_fmt, facts.container_format
        self.fps, self.duration = facts.fps, facts.duration
        self.time_base, self.average_rate = facts.time_base, facts.average_rate
        #: The frame count the container's header states (None: none stated).
        self.frames_from_header: Optional[int] = facts.frames_from_header
        if index is None:
            index = found.index if found is not None else self._built_index()
        self.index = index
        if self.index.frame_count == 0:
            self.close()
            raise VideoOpenError(f"{filename}: the video stream has no frames")
        self.check_unchanged("being opened")
        if self._record is not None:
            self._record_index = self.index
            if found is None or found.facts is None:  # built here, or a record from before facts were kept
                self._record_learnt()

    # -- public -------------------------------------------------------------

    @property
    def frame_count(self) -> int:
        return self.index.frame_count

    def frame_times(self) -> FrameTimes:
        """Every frame's presentation time and duration in seconds, in frame order.

        Frame i's time is what ``frame.time`` says in a sequential decode (the index holds the
        pts the decoder presents, checked at every read).
        """
        return frame_times(self.index.pts, self.time_base, self.average_rate, self.frames_from_header)

    def gop_starts(self) -> list[int]:
        """Where the GOPs of this reader's index start (:func:`asyncframes._split.gop_starts`),
        worked out once per index (a 100,000-frame video with 60-frame GOPs has 1,667 starts,
        ~2 ms to find; a decoder pool asks for every chunk it splits)."""
        known = self._gop_starts
        if known is None or known[0] is not self.index:  # (counting frames replaces the index)
            known = self._gop_starts = (self.index, gop_starts(self.index))
        return known[1]

    def sibling(self) -> "VideoReader":
        """A new reader of the same file and stream, opened with the same options, sharing this
        reader's index (nothing is demuxed again); a decoder worker's own reader.

        Only reads this reader (its options, index and identity), so it may be called from
        another thread while this reader is idle; this reader is never closed from here.

        Returns:
            The new reader; the caller closes it.

        Raises:
            VideoChangedError: the file changed since this reader indexed it (its frames must
                not be read under this index).
            VideoError: the file could not be opened.
        """
        if self.is_stale():
            raise changed_error(self.filename)
        try:
            reader = VideoReader(
                self.filename,
                stream=self.stream_index,
                thread_type=self.thread_type,
                container_options=self.container_options,
                index=self.index,
            )
        except AsyncFramesError as exc:
            if self.is_stale():  # it failed because the file changed under it
                raise changed_error(self.filename) from exc
            raise
        if reader.signature != self.signature:
            # The file changed since this reader indexed it: the new reader sees the new file.
            reader.close()
            raise changed_error(self.filename)
        reader._seek_by_dts = self._seek_by_dts  # what this reader learnt about the demuxer's seeks
        reader._gray = self._gray  # what this reader found out about the first frame, if it did
        return reader

    def is_stale(self) -> bool:
        """True when the file changed on disk (replaced, rewritten, removed) since it was opened."""
        try:
            return source_identity(self.filename) != self.signature
        except VideoNotFoundError:
            return True

    def check_unchanged(self, doing: str = "being read") -> None:
        """Raise :class:`VideoChangedError` if the file changed since this reader opened it."""
        if self.is_stale():
            self.close()
            raise changed_error(self.filename, doing)

    def read(
        self,
        idxs: Sequence[int],
        grayscale: Optional[bool] = None,
        out: Optional[np.ndarray] = None,
        cache: Optional[FrameCache] = None,
        positions: Optional[Sequence[int]] = None,
        interrupt: Optional[Callable[[], bool]] = None,
        video: Optional[Video] = None,
    ) -> np.ndarray:
        """Frames ``idxs`` (any order, duplicates allowed) as ``(len(idxs), h, w, c)`` uint8.

        ``out``, if given, is filled and returned (the server reuses its chunk buffers).
        ``cache`` serves frames kept by earlier reads and keeps the ones it wants that
        this read decodes (it must be used with one grayscale setting only).
        ``positions``: frame ``idxs[k]`` goes to ``out[positions[k]]`` instead of ``out[k]``
        (decoder workers each fill their share of one chunk). ``interrupt`` is asked
        before each frame is decoded; when it says True the read stops with
        :class:`ReadInterrupted` (so the decoder never moves past a frame that then goes
        unused: reading around, a step forward interrupts and finds the frame after the
        last one kept still next in line).
        """
        gray = self.resolve_grayscale(grayscale)
        self.check_indices(idxs)
        shape = (len(idxs), *self.frame_shape(gray, video))
        shape_it = video is not None and video.transformed
        out, places = output_for(idxs, shape, out, positions)
        if cache is not None:
            for i in list(places):
                kept = cache.get(i)
                if kept is not None:
                    out[places.pop(i)] = kept
        extra: frozenset[int] = cache.wanted if cache is not None else frozenset()
        frame_bytes = int(np.prod(shape[1:]))
        targets = sorted(places)
        if cache is not None and cache.finish_gops and targets:
            targets = sorted(set(targets) | self._gop_companions(targets, cache, frame_bytes))

        def sink(i: int, frame: av.VideoFrame) -> None:
            if i not in places and (cache is None or not cache.accepts(i, frame_bytes)):
                return  # passing by, and nobody will keep it
            if frame.width != self.width or frame.height != self.height:
                raise VideoDecodeError(
                    f"{self.filename}: frame {i} is {frame.width}x{frame.height}, "
                    f"but the video starts at {self.width}x{self.height}; size changes are not supported"
                )
            where = places.get(i)
            if not shape_it and not gray and where is None and cache is not None:
                place = cache.place(i, shape[1:])  # only the cache keeps it: converted straight into its place
                if place is not None:
                    try:
                        self._convert.rgb_into(frame, place)
                    except BaseException:
                        cache.abandon(i)
                        raise
                    cache.keep(i, place)
                return
            if not shape_it and not gray and where is not None and len(where) == 1:
                # Converted straight into its place (no copy); the cache copies what it keeps,
                # so it never holds a view of ``out``, whose slot serves other chunks later.
                image = out[where[0]]
                self._convert.rgb_into(frame, image)
                if cache is not None:
                    cache.offer(i, image)
                return
            if shape_it:
                image = shaped(frame, gray, video, self._convert)  # type: ignore[arg-type]
            else:
                image = self._convert.gray(frame) if gray else self._convert.rgb(frame)
            if where is not None:
                if len(where) == 1:
                    out[where[0]] = image  # plain indexing copies faster than a list index
                else:
                    out[where] = image
            if cache is not None:
                cache.offer(i, image)

        for _attempt in range(3):
            undecoded = self.stats.packets_undecoded
            try:
                self._decode(targets, sink, extra, interrupt)
                return out
            except _Damaged:
                log.warning(
                    "%s: damaged data (a decode error or a frame flagged corrupt); decoding this file with "
                    "PyAV's default threading from now on, as a sequential decode does",
                    self.filename,
                )
                self.thread_type = None
                self.close()
            except _Mismatch as exc:
                if self.index.sequential:
                    raise VideoDecodeError(f"{self.filename}: the decoder is not repeatable here ({exc})") from None
                if self.stats.packets_undecoded != undecoded:
                    # Frames were left undecoded on the way: decode every frame of this file from now
                    # on before doubting the index.
                    log.warning("%s: %s with non-reference frames left undecoded; decoding them from now on", self.filename, exc)
                    self._leave_undecoded = False
                    self._frames = None
                    continue
                log.warning("%s: decoder disagrees with the packet index (%s); counting frames instead", self.filename, exc)
                self.stats.counting_fallbacks += 1
                self.index = self._count_frames(str(exc))
                self.check_indices(idxs)
                targets = sorted(places)
        raise VideoDecodeError(f"{self.filename}: could not decode frames {sorted(places)[:8]} consistently")

    def _gop_companions(self, targets: list[int], cache: FrameCache, frame_bytes: int) -> set[int]:
        """Frames the cache wants that lie later in a GOP we are opening anyway (within its budget).

        Decoding them now costs a few frames; decoding them in a later chunk would cost
        another pass from the keyframe.
        """
        if self.index.sequential:
            return set()
        room = (cache.max_bytes - cache.nbytes) // max(frame_bytes, 1)
        last_in_gop: dict[int, int] = {}
        for t in targets:
            key = self.index.keyframe_for(t)
            last_in_gop[key] = max(t, last_in_gop.get(key, t))
        companions = sorted(
            i
            for i in cache.wanted
            if 0 <= i < self.frame_count
            and i > last_in_gop.get(self.index.keyframe_for(i), self.frame_count)
            and cache.accepts(i, frame_bytes)
        )
        return set(companions[: max(room, 0)])

    def close(self) -> None:
        """Release the decoder and the file."""
        self._frames = None
        if self._container is not None:
            try:
                self._container.close()
            finally:
                self._container = None
                self._stream = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening and indexing ----------------------------------------------

    def _open(self) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
        self.stats.opens += 1
        try:
            container = _av_open(self.filename, self.container_options)
        except FileNotFoundError as exc:
            raise VideoNotFoundError(f"video not found: {self.filename}") from exc
        except (av.FFmpegError, OSError, ValueError) as exc:
            server_fault = resource_error(exc, f"opening {self.filename}")
            if server_fault is not None:
                raise server_fault from exc
            raise VideoOpenError(f"not a readable video: {self.filename} ({exc})") from exc
        streams = container.streams.video
        if self.stream_index >= len(streams):
            container.close()
            found = "no video stream" if not streams else f"only {len(streams)} video stream(s)"
            raise VideoOpenError(f"{self.filename}: {found}, asked for video stream {self.stream_index}")
        stream = streams[self.stream_index]
        if self.thread_type is not None:
            stream.thread_type = self.thread_type
        ctx = stream.codec_context
        self._disposable = disposable_test(ctx.name, bytes(ctx.extradata or b""))
        return container, stream

    def _open_facts(self) -> StreamFacts:
        """Open the file (kept open for the first read) and read its stream's metadata."""
        container, vstream = self._ensure_open()
        ctx = vstream.codec_context
        rate = vstream.average_rate or vstream.guessed_rate or vstream.base_rate
        return StreamFacts(
            width=int(ctx.width),
            height=int(ctx.height),
            codec=ctx.name,
            pix_fmt=ctx.pix_fmt or "",
            container_format=container.format.name,
            fps=float(rate) if rate else 0.0,
            duration=float(vstream.duration * vstream.time_base) if vstream.duration and vstream.time_base else None,
            time_base=vstream.time_base,
            average_rate=vstream.average_rate or vstream.guessed_rate,
            frames_from_header=int(vstream.frames) or None,
        )

    def _load_record(self) -> Optional[index_store.Stored]:
        """This file's record in the on-disk store (None: no store, no record, or not one plain
        file); remembers where the record is kept, for :meth:`write_record`."""
        kept = index_store.store()
        key = kept.key(self.signature, self.stream_index, self.container_options) if kept is not None else None
        if kept is None or key is None:
            return None
        self._record = (kept, key)
        found = kept.load(key)
        if found is not None:
            self.index_source, self._gray = "stored", found.grayscale
            self._record_knows_gray = found.grayscale is not None
        return found

    def _built_index(self) -> FrameIndex:
        """The file's index, demuxed (or counted when packets cannot tell the frames apart)."""
        index, self.index_source = self._build_index(), "demuxed"
        if index.sequential and not index.pts:
            log.info("%s: %s; frames are found by counting", self.filename, index.reason)
            index, self.index_source = self._count_frames(index.reason), "counted"
        return index

    @property
    def record_behind(self) -> bool:
        """Whether this reader learnt something its file's index record lacks (see :meth:`write_record`)."""
        return self._record_behind and self._record is not None

    def write_record(self) -> None:
        """Write what this file's index record lacks that this reader knows (its index as
        opened, its stream's facts, whether the first frame is gray); nothing when the record
        is up to date or there is no store. Never raises (a store that cannot write turns
        itself off)."""
        if self._record is None or self._record_index is None or not self._record_behind:
            return
        kept, key = self._record
        self._record_behind = False
        self._record_knows_gray = self._gray is not None
        kept.save(key, self._record_index, self._gray, self._facts)

    def _record_learnt(self) -> None:
        """The record lacks something this reader knows: written now, or by :meth:`write_record`."""
        self._record_behind = True
        if not self._write_later:
            self.write_record()

    def _detect_grayscale(self) -> bool:
        """Decode the first frame and see whether it is gray; the store's record learns the
        answer too (if it did not know), so no other reader of this file has to decode it again.

        Raises:
            VideoChangedError: the file changed since it was opened (the answer could be the
                new file's: it is not kept).
        """
        gray = is_gray(self.read([0], grayscale=False)[0])
        self.check_unchanged("being read")
        self._gray = gray  # (the record is written with it)
        if self._record is not None and not self._record_knows_gray:
            self._record_learnt()
        return gray

    def _build_index(self) -> FrameIndex:
        """Demux the open container's packets into an index; the container is closed after
        (the first read opens the file afresh, as a sequential decode starts)."""
        container, stream = self._ensure_open()
        try:
            packets = [(p.pts, bool(p.is_keyframe), bool(p.is_discard), p.dts) for p in container.demux(stream) if p.size]
        except av.FFmpegError as exc:
            raise resource_error(exc, f"reading {self.filename}") or VideoOpenError(
                f"{self.filename}: cannot read packets ({exc})"
            ) from exc
        finally:
            self.close()
        return index_from_packets(packets)

    def _count_frames(self, reason: str) -> FrameIndex:
        """The ground truth: decode everything once and count what is presented."""
        self.close()
        container, stream = self._open()
        try:
            pts = [frame.pts for frame in container.decode(stream)]
        except av.FFmpegError as exc:
            server_fault = resource_error(exc, f"reading {self.filename}")
            if server_fault is not None:
                raise server_fault from exc
            raise VideoDecodeError(f"{self.filename}: sequential decode failed after {len(pts)} frames ({exc})") from exc
        finally:
            container.close()
        return FrameIndex(pts=pts, seek_pts=[], sequential=True, reason=reason)

    # -- decoding ------------------------------------------------------------

    def _ensure_open(self) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
        if self._container is None or self._stream is None:
            self._container, self._stream = self._open()
            self._frames = None
            self._untouched = True  # nothing read or sought yet: as good as a fresh open
        return self._container, self._stream

    def _restart(self) -> None:
        """Decode from the very start, exactly like a sequential decode."""
        if not getattr(self, "_untouched", False):
            self.close()  # (a container nothing was read from is reused: opening a long MP4 costs ~13 ms)
        container, stream = self._ensure_open()
        self._untouched = False
        self._frames = self._decoded(container.demux(stream))
        self._last, self._anchor, self._after_seek = -1, None, False
        self._undecoded.clear()

    def _seek_for(self, target: int, back: int = 0, early: int = 0) -> None:
        """Get ready to decode from the keyframe ``back`` keyframes before ``target``'s, pointing
        the demuxer ``early`` keyframes earlier still (packets up to the keyframe are dropped
        undecoded)."""
        if self.index.sequential:
            self._restart()
            return
        key = self.index.keyframe_for(target, back)
        if key == self.index.seek_pts[0]:
            self._restart()
            return
        container, stream = self._ensure_open()
        self._untouched = False
        at = self.index.seek_timestamp(self.index.keyframe_for(target, back + early), self._seek_by_dts)
        try:
            container.seek(at, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            log.debug("%s: seek to %s for pts %s failed (%s); decoding from the start", self.filename, at, key, exc)
            self._restart()
            return
        self.stats.seeks += 1
        self._frames = self._frames_from_keyframe(container.demux(stream), key)
        self._undecoded.clear()
        self._anchor = key
        self._last = self.index.first_at_or_after(key) - 1
        self._after_seek = True

    def _frames_from_keyframe(self, packets: Iterator[av.Packet], key: int) -> Iterator[av.VideoFrame]:
        """Frames decoded from the packets after a seek, starting at the keyframe presented at ``key``.

        Packets before the keyframe (a seek that landed a GOP or more early) are dropped
        without decoding. A seek that went past the keyframe raises :class:`_LandedLate`
        before anything is decoded.
        """
        started = False
        for packet in packets:
            if not started:
                if not packet.size:
                    continue  # the end of the file before the keyframe: handled below
                place = landing(packet.pts, key)
                if place == "before":
                    self.stats.packets_skipped += 1
                    continue
                started = True
                if place == "after":
                    raise _LandedLate()
            if not self._may_leave_undecoded(packet):
                yield from packet.decode()
        if not started:
            raise _LandedLate()

    def _decoded(self, packets: Iterator[av.Packet]) -> Iterator[av.VideoFrame]:
        """Frames decoded from ``packets`` (from the start of the file), as ``container.decode`` gives them."""
        for packet in packets:
            if not self._may_leave_undecoded(packet):
                yield from packet.decode()

    def _may_leave_undecoded(self, packet: av.Packet) -> bool:
        """Whether ``packet`` is left undecoded: a non-reference frame (see :mod:`._disposable`) before the
        current read's last target that the read does not want (nor its cache). Such a frame
        changes no other frame, so the frames wanted come out the same."""
        before, disposable = self._leave_before, self._disposable
        if before is None or disposable is None or not packet.size:
            return False
        i = self.index.index_of(packet.pts)
        if i is None or i >= before or i in self._keep or i <= self._last:
            return False
        if not disposable(memoryview(packet)):  # type: ignore[arg-type]
            return False
        self._undecoded.add(i)
        self.stats.packets_undecoded += 1
        return True

    def _landed_late(self, target: int, back: int) -> bool:
        """After a seek went past its keyframe: seek by decode timestamps from now on, if that
        can help (True: seek again as before; False: point the demuxer earlier)."""
        self.stats.late_landings += 1
        if self._seek_by_dts or self.index.sequential:
            return False
        key = self.index.keyframe_for(target, back)
        key_dts = self.index.dts_of_key(key)
        if key_dts is None or key_dts >= key:
            return False
        log.info("%s: a seek to pts %s went past its keyframe; seeking by decode timestamps from now on", self.filename, key)
        self._seek_by_dts = True
        return True

    def _must_seek(self, target: int) -> bool:
        if self._frames is None or target <= self._last or target in self._undecoded:
            return True  # (left undecoded by a read that stopped before it: its packet is gone)
        if self.index.sequential:
            return False
        key_idx = self.index.first_at_or_after(self.index.keyframe_for(target))
        return key_idx - (self._last + 1) > SEEK_COST_FRAMES

    def _next(self) -> tuple[int, av.VideoFrame]:
        """The next presented frame and its index, checked against the index."""
        assert self._frames is not None
        while True:
            try:
                frame = next(self._frames)
                self.stats.frames_decoded += 1
            except StopIteration:
                self._frames = None
                raise _Mismatch(f"decoder ended after frame {self._last} of {self.frame_count}") from None
            except av.FFmpegError as exc:
                self._frames = None
                server_fault = resource_error(exc, f"reading {self.filename}")
                if server_fault is not None:
                    raise server_fault from exc
                if self.thread_type is not None:
                    # Frame threads report a later packet's error before earlier frames are out;
                    # decode as a sequential decode would to see where it really fails.
                    raise _Damaged() from exc
                raise VideoDecodeError(f"{self.filename}: decoding failed after frame {self._last} ({exc})") from exc
            if self.thread_type is not None and getattr(frame, "is_corrupt", False):
                self._frames = None
                raise _Damaged()
            if self.index.sequential:
                i = self._last + 1
            else:
                if frame.pts is None:
                    raise _Mismatch(f"decoder presented a frame without a timestamp after frame {self._last}")
                if self._anchor is not None and frame.pts < self._anchor:
                    continue  # leftovers decoded before the keyframe we sought
                found = self.index.index_of(frame.pts)
                if found is None:
                    raise _Mismatch(f"decoder presented pts {frame.pts}, which no packet announced")
                i = found
                while self._undecoded and self._last + 1 < i and self._last + 1 in self._undecoded:
                    self._undecoded.discard(self._last + 1)  # left undecoded: never presented
                    self._last += 1
                if i != self._last + 1:
                    if self._after_seek and i > self._last + 1:
                        raise _Overshoot()
                    raise _Mismatch(f"decoder presented frame {i} right after frame {self._last}")
            self._last = i
            self._after_seek = False
            return i, frame

    def _decode(  # type: ignore[no-untyped-def]
        self, wanted: list[int], sink, extra: frozenset[int] = frozenset(), interrupt: Optional[Callable[[], bool]] = None
    ) -> None:
        """Decode every index in ``wanted`` (sorted, unique) once, handing each to ``sink``.

        Frames in ``extra`` that are decoded on the way are handed to ``sink`` too.
        """
        want = set(wanted)
        use = self._leave_undecoded and bool(wanted) and not self.index.sequential
        self._keep, self._leave_before = want | extra, (wanted[-1] if use else None)
        try:
            self._decode_each(wanted, want, sink, extra, interrupt)
        finally:
            self._keep, self._leave_before = frozenset(), None  # what is fed between reads is decoded

    def _decode_each(  # type: ignore[no-untyped-def]
        self, wanted: list[int], want: set[int], sink, extra: frozenset[int], interrupt
    ) -> None:
        done: set[int] = set()
        for target in wanted:
            if target in done:
                continue
            back = early = 0
            if self._must_seek(target):
                self._seek_for(target)
            while target not in done:
                if interrupt is not None and interrupt():
                    raise ReadInterrupted()  # before decoding: what was decoded is all handed on
                try:
                    i, frame = self._next()
                except _LandedLate:
                    # The demuxer went past the keyframe: point it earlier, still start decoding at the keyframe.
                    self._frames = None
                    if not self._landed_late(target, back):
                        early += 1
                    if back + early > SEEK_RETRIES:
                        self._restart()
                    else:
                        self._seek_for(target, back, early)
                    continue
                except _Overshoot:
                    # The decoder did not present the keyframe first: decode from an earlier one.
                    back, early = back + 1, 0
                    if back > SEEK_RETRIES:
                        self._restart()
                    else:
                        self._seek_for(target, back)
                    continue
                if i in want and i not in done:
                    sink(i, frame)
                    done.add(i)
                elif i in extra:
                    sink(i, frame)
                if i > target:
                    raise _Mismatch(f"decoder skipped frame {target}")


def output_for(
    idxs: Sequence[int], shape: tuple[int, ...], out: Optional[np.ndarray], positions: Optional[Sequence[int]]
) -> tuple[np.ndarray, dict[int, list[int]]]:
    """The array a read fills (``out``, checked, or a new one of ``shape``) and where each
    distinct frame goes in it (``positions[k]`` for ``idxs[k]`` if given, else ``k``).

    Raises:
        ValueError: ``out`` has another frame shape or dtype, or too few rows.
    """
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape[1:] != shape[1:] or out.dtype != np.uint8 or (positions is None and len(out) != len(idxs)):
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} uint8")
    places: dict[int, list[int]] = defaultdict(list)
    for pos, i in enumerate(idxs):
        places[int(i)].append(pos if positions is None else positions[pos])
    return out, places


def frame_hwc(shape: tuple[int, int, int], video: Optional[Video]) -> tuple[int, int, int]:
    """A frame shape as (height, width, channels), whatever its layout."""
    return (shape[1], shape[2], shape[0]) if video is not None and video.layout == "CHW" else shape


def _av_open(filename: str, container_options: dict[str, str]) -> Any:
    """``av.open`` for reading, tolerant of undecodable metadata where PyAV lets us say so."""
    try:
        return av.open(filename, mode="r", metadata_errors="ignore", container_options=container_options)
    except TypeError as exc:  # PyAV 19 dropped metadata_errors
        if "metadata_errors" not in str(exc):
            raise
        return av.open(filename, mode="r", container_options=container_options)

