"""A list of image files read as a video: frame *i* is the *i*-th file, decoded with PyAV.

Folders, globs, explicit lists and numbered sequences that FFmpeg's image2 demuxer cannot
start (numbered from 10, gaps) all become a list of files (:func:`asyncframes._files.image_files`);
:class:`ImageListReader` reads such a list with the interface of
:class:`~asyncframes._reader.VideoReader`, so the opener, the decoder pool and the server
treat it like any video.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import av
import numpy as np

from ._convert import Converter, is_gray, shaped
from ._files import SourceIdentity, resource_error, source_identity
from ._index import FrameIndex
from ._reader import FrameCache, FrameSource, ReadInterrupted, changed_error, output_for
from ._times import FrameTimes
from ._video import Video
from .errors import VideoDecodeError, VideoNotFoundError, VideoOpenError


class ImageListReader(FrameSource):
    """Images as frames: ``files[i]`` is frame ``i``. Every image must have the first one's size.

    Args:
        filename: the name the request gave (a folder, glob, pattern or the first file), for
            messages and :class:`VideoInfo`.
        files: the image files, in frame order.

    Raises:
        VideoOpenError: no files, or the first cannot be decoded as an image.
        VideoNotFoundError: a file is missing.
    """

    def __init__(self, filename: str, files: Sequence[str], stream: int = 0) -> None:
        if not files:
            raise VideoOpenError(f"{filename}: no image files")
        if stream != 0:
            raise VideoOpenError(f"{filename}: images have one video stream, asked for video stream {stream}")
        self.filename = filename
        self.files = list(files)
        self._codec = ""
        self.stream_index = 0
        self.signature: SourceIdentity = self._identity()
        #: Frame i presents at "pts" i: images have no timestamps (their times are NaN).
        self.index = FrameIndex(pts=list(range(len(self.files))), seek_pts=list(range(len(self.files))))
        self._convert = Converter(filename)
        first = self._decode(0)
        self.width, self.height = first.width, first.height
        self.codec = self._codec
        self.pix_fmt = first.format.name
        self.fps = 0.0
        self.container_format = "images"
        self.duration = None
        self._gray = is_gray(self._convert.rgb(first))  # the first image is at hand: no decode saved by waiting

    # -- the VideoReader interface ---------------------------------------------------------------

    @property
    def frame_count(self) -> int:
        return len(self.files)

    def frame_times(self) -> FrameTimes:
        """Images have no timestamps: every time is NaN (lookups by time say so)."""
        nan = np.full(self.frame_count, np.nan)
        return FrameTimes(pts_seconds=nan, duration_seconds=nan.copy(), num_frames_from_header=None)

    def gop_starts(self) -> np.ndarray:
        """Every image starts a GOP of its own: each is decoded alone (how the decoder pool
        splits a chunk over its workers, see :func:`asyncframes._split.chunk_shares`)."""
        return np.arange(self.frame_count)

    def sibling(self) -> "ImageListReader":
        """A reader of the same files for a decoder worker (nothing to share: images are cheap to open)."""
        if self.is_stale():
            raise changed_error(self.filename)
        reader = ImageListReader(self.filename, self.files)
        if reader.signature != self.signature:
            raise changed_error(self.filename)
        return reader

    def is_stale(self) -> bool:
        try:
            return self._identity() != self.signature
        except VideoNotFoundError:
            return True

    def check_unchanged(self, doing: str = "being read") -> None:
        if self.is_stale():
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
        """Frames ``idxs`` (any order, duplicates allowed) as ``(len(idxs), h, w, c)`` uint8;
        the arguments are those of :meth:`VideoReader.read <asyncframes._reader.VideoReader.read>`."""
        gray = self.resolve_grayscale(grayscale)
        self.check_indices(idxs)
        shape = (len(idxs), *self.frame_shape(gray, video))
        shape_it = video is not None and video.transformed
        out, places = output_for(idxs, shape, out, positions)
        for i, where in places.items():
            if interrupt is not None and interrupt():
                raise ReadInterrupted()
            image = cache.get(i) if cache is not None else None
            if image is None:
                frame = self._decode(i)
                if frame.width != self.width or frame.height != self.height:
                    raise VideoDecodeError(
                        f"{self.filename}: image {i} ({self.files[i]}) is {frame.width}x{frame.height}, "
                        f"but the first is {self.width}x{self.height}; all images must have one size"
                    )
                if shape_it:
                    image = shaped(frame, gray, video, self._convert)  # type: ignore[arg-type]
                else:
                    image = self._convert.gray(frame) if gray else self._convert.rgb(frame)
                if cache is not None:
                    cache.offer(i, image)
            out[where] = image
        return out

    def close(self) -> None:
        pass  # each image is opened and closed as it is read

    def __enter__(self) -> "ImageListReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading one image ----------------------------------------------------------------------

    def _identity(self) -> SourceIdentity:
        return tuple(ident for f in self.files for ident in source_identity(f))

    def _decode(self, i: int) -> av.VideoFrame:
        path = self.files[i]
        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                self._codec = stream.codec_context.name
                for frame in container.decode(stream):
                    return frame
        except FileNotFoundError as exc:
            raise changed_error(self.filename) if i else VideoNotFoundError(f"image not found: {path}") from exc
        except (av.FFmpegError, OSError, IndexError) as exc:
            fault = resource_error(exc, f"opening {path}")
            if fault is not None:
                raise fault from exc
            raise VideoOpenError(f"{self.filename}: image {i} ({path}) is not a readable image ({exc})") from exc
        raise VideoDecodeError(f"{self.filename}: image {i} ({path}) holds no picture")

