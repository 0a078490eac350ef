"""A video as an array of frames, in torchcodec's shape: ``asyncframes.open(video)``.

:class:`FrameReader` reads through an :class:`~asyncframes.AsyncVideo` (its own, or one
given): ``len(r)``, ``r[i]``, ``r[a:b:c]``, ``get_frame_at``, ``get_frames_at``,
``get_frames_in_range``, and by time ``get_frames_played_at`` / ``get_frames_played_in_range``.
Every read is one chunked request; the frames land in one preallocated array. Frame *i* and
its times are those of a plain sequential decode (:mod:`asyncframes._times`).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import attrs
import numpy as np

from ._client import AsyncVideo
from ._times import FrameTimes, indices_played_at, indices_played_in_range
from ._video import Video, VideoInfo, as_video
from .errors import AsyncFramesError, FrameIndexError

#: Bytes of frames per chunk a reader asks for (fewer frames per chunk for big frames).
CHUNK_BYTES = 16 * 1024 * 1024
#: Most frames per chunk a reader asks for (a server's default limit is 1024).
MAX_FRAMES_PER_CHUNK = 256

Indices = Union[Sequence[int], np.ndarray, range]


@attrs.frozen(eq=False)
class Frame:
    """One frame with its time: ``data`` ``(h, w, c)`` uint8, ``pts_seconds``, ``duration_seconds``, ``index``."""

    data: np.ndarray
    pts_seconds: float
    duration_seconds: float
    index: int


@attrs.frozen(eq=False)
class FrameBatch:
    """Frames with their times: ``data`` ``(n, h, w, c)`` uint8 and, per frame, ``pts_seconds``,
    ``duration_seconds`` (float64) and ``indices`` (int64, the frame numbers)."""

    data: np.ndarray
    pts_seconds: np.ndarray
    duration_seconds: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> "Frame | FrameBatch":
        """Frame ``i`` of the batch (negative counts from the end); of a batch of clips
        (2-D ``indices``), clip ``i`` as a batch."""
        if self.indices.ndim > 1:
            return FrameBatch(self.data[i], self.pts_seconds[i], self.duration_seconds[i], self.indices[i])
        return Frame(self.data[i], float(self.pts_seconds[i]), float(self.duration_seconds[i]), int(self.indices[i]))


@attrs.frozen
class VideoMetadata:
    """What a video holds, as the server decodes it.

    ``num_frames`` is the number of frames a sequential decode presents (what ``len`` gives);
    ``num_frames_from_header`` the count the container states (None if none; it may differ).
    ``average_fps`` is the stream's average frame rate; ``begin_stream_seconds`` the first frame's
    pts, ``end_stream_seconds`` when the last frame stops (its pts plus its duration), and
    ``duration_seconds`` their difference (``duration_seconds_from_header``: the container's).
    """

    filename: str
    num_frames: int
    num_frames_from_header: Optional[int]
    average_fps: float
    duration_seconds: float
    duration_seconds_from_header: Optional[float]
    begin_stream_seconds: float
    end_stream_seconds: float
    width: int
    height: int
    channels: int
    codec: str
    pix_fmt: str
    container: str

    @classmethod
    def of(cls, info: VideoInfo, times: FrameTimes) -> "VideoMetadata":
        """The metadata from a server's :class:`VideoInfo` and :class:`FrameTimes`."""
        return cls(
            filename=info.filename,
            num_frames=times.num_frames,
            num_frames_from_header=times.num_frames_from_header,
            average_fps=info.fps,
            duration_seconds=times.end_stream_seconds - times.begin_stream_seconds,
            duration_seconds_from_header=info.duration,
            begin_stream_seconds=times.begin_stream_seconds,
            end_stream_seconds=times.end_stream_seconds,
            width=info.width,
            height=info.height,
            channels=info.channels,
            codec=info.codec,
            pix_fmt=info.pix_fmt,
            container=info.container,
        )


class FrameReader:
    """A video's frames by index and by time, read from a frame server.

    Args:
        video: a path, a :class:`Video`, or anything :func:`asyncframes._video.as_video` takes.
        client: an :class:`AsyncVideo` to read through (left open by :meth:`close`); None
            makes a private one from ``client_options``.
        frames_per_chunk: frames per chunk of each read (None: about 16 MB of frames).
        **client_options: passed to :class:`AsyncVideo` (``endpoint``, ``timeout``, ...).

    Raises:
        ValueError: both ``client`` and ``client_options`` are given, or ``frames_per_chunk`` < 1.
        TypeError: ``video`` is not something :func:`~asyncframes._video.as_video` takes.
        VideoNotFoundError, VideoOpenError, VideoAccessError: the server cannot open it.
        ServerStartError: a private server could not start.
    """

    def __init__(
        self,
        video: Any,
        *,
        client: Optional[AsyncVideo] = None,
        frames_per_chunk: Optional[int] = None,
        **client_options: Any,
    ) -> None:
        if client is not None and client_options:
            raise ValueError(f"give either client or client options ({', '.join(sorted(client_options))}), not both")
        if frames_per_chunk is not None and (_integer(frames_per_chunk, "frames_per_chunk") < 1):
            raise ValueError(f"frames_per_chunk must be a positive integer or None, got {frames_per_chunk!r}")
        self._video: Video = as_video(video)
        self._owns_client = client is None
        self._client: Optional[AsyncVideo] = AsyncVideo(**client_options) if client is None else client
        try:
            info = self._client.info(self._video)
            self._times = self._client.frame_times(self._video)
        except BaseException:
            self.close()
            raise
        self._info = info
        self.metadata = VideoMetadata.of(info, self._times)
        frame_bytes = max(1, info.height * info.width * info.channels)
        self._frames_per_chunk = frames_per_chunk or max(1, min(MAX_FRAMES_PER_CHUNK, CHUNK_BYTES // frame_bytes))

    # -- by index ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.metadata.num_frames

    def __getitem__(self, key: Union[int, slice]) -> np.ndarray:
        """Frame ``key`` as an ``(h, w, c)`` array, or the frames of a slice stacked as ``(n, h, w, c)``.

        Args:
            key: a frame index (negative counts from the end) or a slice (any step).

        Returns:
            The frame, or the stacked frames.

        Raises:
            FrameIndexError: the index is outside ``-len .. len-1``.
            TypeError: ``key`` is neither an integer nor a slice.
        """
        if isinstance(key, slice):
            return self._read(range(*key.indices(len(self))))
        return self._read(np.array([self._index(key)]))[0]

    def get_frame_at(self, index: int) -> Frame:
        """Frame ``index`` with its time.

        Args:
            index: the frame number (negative counts from the end).

        Returns:
            A :class:`Frame`.

        Raises:
            FrameIndexError: ``index`` is outside ``-len .. len-1``.
        """
        return self.get_frames_at([index])[0]  # type: ignore[return-value]

    def get_frames_at(self, indices: Indices) -> FrameBatch:
        """The frames at ``indices``, in that order (duplicates repeated, negatives from the end).

        Args:
            indices: frame numbers: a list, range or 1-D integer array.

        Returns:
            A :class:`FrameBatch`.

        Raises:
            FrameIndexError: an index is outside ``-len .. len-1`` (naming it).
            TypeError: ``indices`` are not integers.
        """
        return self._batch(self._indices(indices))

    def get_frames_in_range(self, start: int, stop: int, step: int = 1) -> FrameBatch:
        """Frames ``start, start + step, ...`` before ``stop``, like ``range(start, stop, step)``.

        Args:
            start: the first frame, ``0 <= start``.
            stop: the end (not included), ``stop <= len``.
            step: a positive stride.

        Returns:
            A :class:`FrameBatch`.

        Raises:
            FrameIndexError: ``start`` or ``stop`` outside ``0 .. len``.
            ValueError: ``step`` is not positive.
        """
        start, stop, step = (_integer(v, name) for v, name in ((start, "start"), (stop, "stop"), (step, "step")))
        n = len(self)
        if step < 1:
            raise ValueError(f"step must be a positive integer, got {step}")
        if not 0 <= start <= n or not 0 <= stop <= n:
            raise FrameIndexError(f"range {start}:{stop} is outside {self._video.filename}'s frames: start and stop must lie in 0..{n}")
        return self._batch(range(start, stop, step))

    # -- by time -----------------------------------------------------------------------------

    def get_frame_played_at(self, seconds: float) -> Frame:
        """The frame played at ``seconds``: ``pts <= seconds < pts + duration``.

        Args:
            seconds: a time in ``[metadata.begin_stream_seconds, metadata.end_stream_seconds)``.

        Returns:
            A :class:`Frame`.

        Raises:
            FrameIndexError: ``seconds`` is outside that range (naming both).
        """
        return self.get_frames_played_at([seconds])[0]  # type: ignore[return-value]

    def get_frames_played_at(self, seconds: "Union[float, Sequence[float], np.ndarray]") -> FrameBatch:
        """The frames played at each of ``seconds`` (frame i is played in ``[pts_i, pts_i + duration_i)``).

        Args:
            seconds: times (a number counts as one time), each in
                ``[metadata.begin_stream_seconds, metadata.end_stream_seconds)``.

        Returns:
            A :class:`FrameBatch`, one frame per time, in that order.

        Raises:
            FrameIndexError: a time outside that range (naming it and the range).
            VideoError: the video's timestamps do not order its frames.
        """
        idxs = indices_played_at(self._times, np.atleast_1d(np.asarray(seconds, dtype=np.float64)), self._video.filename)
        return self._batch(idxs.reshape(-1))

    def get_frames_played_in_range(self, start_seconds: float, stop_seconds: float) -> FrameBatch:
        """The frames played at some time in ``[start_seconds, stop_seconds)``, in order.

        Args:
            start_seconds: a played time (``begin <= start < end``).
            stop_seconds: the end, not included (``start <= stop <= end``).

        Returns:
            A :class:`FrameBatch` (empty when ``start_seconds == stop_seconds``).

        Raises:
            FrameIndexError: a bound outside the video's times, or ``stop < start``.
            VideoError: the video's timestamps do not order its frames.
        """
        return self._batch(indices_played_in_range(self._times, start_seconds, stop_seconds, self._video.filename))

    # -- life --------------------------------------------------------------------------------

    @property
    def video(self) -> Video:
        """The :class:`Video` read."""
        return self._video

    @property
    def frame_times(self) -> FrameTimes:
        """Every frame's ``pts_seconds`` and ``duration_seconds`` (float64 arrays, frame order)."""
        return self._times

    def close(self) -> None:
        """Stop a private client's server; a client given is left open. Idempotent."""
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            client.close()

    def __enter__(self) -> "FrameReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.metadata
        return f"FrameReader({self._video.filename!r}, {m.num_frames} frames, {m.width}x{m.height}x{m.channels}, {m.average_fps:g} fps)"

    # -- reading -----------------------------------------------------------------------------

    def _index(self, i: Any) -> int:
        i = _integer(i, "frame index")
        n = len(self)
        if not -n <= i < n:
            raise FrameIndexError(f"frame index {i} is out of range; {self._video.filename} has {n} frames (indices {-n}..{n - 1})")
        return i % n

    def _indices(self, indices: Indices) -> "Union[range, np.ndarray]":
        if isinstance(indices, range):
            indices = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
        arr = np.asarray(indices)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu") or arr.dtype == bool:
            raise TypeError(f"indices must be a 1-D sequence of integers, got {arr.dtype} of shape {arr.shape}")
        arr = arr.astype(np.int64, copy=False)
        n = len(self)
        bad = np.flatnonzero((arr < -n) | (arr >= n))
        if bad.size:
            i = int(arr[bad[0]])
            raise FrameIndexError(f"frame index {i} is out of range; {self._video.filename} has {n} frames (indices {-n}..{n - 1})")
        return arr % n if n else arr

    def _batch(self, idxs: "Union[range, np.ndarray]") -> FrameBatch:
        arr = np.arange(idxs.start, idxs.stop, idxs.step, dtype=np.int64) if isinstance(idxs, range) else idxs
        return FrameBatch(
            data=self._read(idxs),
            pts_seconds=self._times.pts_seconds[arr],
            duration_seconds=self._times.duration_seconds[arr],
            indices=arr,
        )

    def _read(self, idxs: "Union[range, np.ndarray]") -> np.ndarray:
        """The frames at ``idxs`` (all valid, non-negative) stacked in one array, in one request.

        Indices asked for twice are fetched once: the request names each distinct frame once,
        in sorted order, and the result is scattered back.
        """
        client = self._live_client()
        n = len(idxs)
        if n == 0:
            return np.empty((0, self._info.height, self._info.width, self._info.channels), dtype=np.uint8)
        wanted: "Union[range, np.ndarray]" = idxs
        inverse = None
        if not isinstance(idxs, range):
            unique, inverse = np.unique(idxs, return_inverse=True)
            if len(unique) == n:
                inverse = None  # no duplicates: ask in the caller's order, no scatter
            else:
                wanted = unique
        client.load_by_chunk(self._video, wanted, frames_per_chunk=self._frames_per_chunk)
        out: Optional[np.ndarray] = None
        at = 0
        for _idxs, frames in client.chunks:
            if out is None:
                out = np.empty((len(wanted),) + frames.shape[1:], dtype=frames.dtype)
            out[at : at + len(frames)] = frames
            at += len(frames)
        assert out is not None and at == len(wanted), "the client checks every chunk against the request"
        return out if inverse is None else out[inverse.reshape(-1)]

    def _live_client(self) -> AsyncVideo:
        if self._client is None:
            raise AsyncFramesError(f"this reader of {self._video.filename} is closed")
        return self._client


def _integer(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def open_video(video: "Union[Video, str, os.PathLike[str], Any]", **client_options: Any) -> FrameReader:
    """Open ``video`` for reading by index and by time (``asyncframes.open``).

    Args:
        video: a path, a :class:`Video`, or anything :func:`asyncframes._video.as_video` takes.
        **client_options: ``client`` (an :class:`AsyncVideo` to share), ``frames_per_chunk``,
            or options for the private :class:`AsyncVideo` (``endpoint``, ``timeout``, ...).

    Returns:
        A :class:`FrameReader`; close it (or use ``with``) to let go of its server.
    """
    return FrameReader(video, **client_options)
