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

from ._convert import Converter, shaped
from ._files import SourceIdentity, resource_error, source_identity
from ._index import FrameIndex, check_frame_idxs
from ._reader import FrameCache, ReadInterrupted, changed_error, frame_hwc, output_for
from ._times import FrameTimes
from ._video import Video, VideoInfo
from .errors import VideoDecodeError, VideoNotFoundError, VideoOpenError


class ImageListReader:
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
        rgb = self._convert.rgb(first)
        self.detected_grayscale = bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))

    # -- the VideoReader interface ---------------------------------------------------------------

    @property
    def frame_count(self) -> int:
        return len(self.files)

    def resolve_grayscale(self, grayscale: Optional[bool]) -> bool:
        return self.detected_grayscale if grayscale is None else grayscale

    def info(self, grayscale: Optional[bool] = None, video: Optional[Video] = None) -> VideoInfo:
        gray = self.resolve_grayscale(grayscale)
        h, w, c = frame_hwc(self.frame_shape(gray, video), video)
        resized = (h, w) != (self.height, self.width)
        return VideoInfo(
            source_height=self.height if resized else None, source_width=self.width if resized else None,
            filename=self.filename, frame_count=self.frame_count, height=h, width=w,
            channels=c, grayscale=gray, fps=self.fps, codec=self.codec, pix_fmt=self.pix_fmt,
            container=self.container_format, duration=None,
        )

    def frame_times(self) -> FrameTimes:
        """Images have no timestamps: every time is NaN (lookups by time say so)."""
        nan = np.full(self.frame_count, np.nan)
        return FrameTimes(pts_seconds=nan, duration_seconds=nan.copy(), num_frames_from_header=None)

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

    def check_indices(self, idxs: "Sequence[int] | range | np.ndarray") -> None:
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

