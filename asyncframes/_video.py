"""The video spec: which file, which stream, and how frames should be shaped.

A :class:`Video` is plain data. It travels from client to server as a cattrs
unstructured dict inside a msgpack header, so it must only hold wire-safe fields.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import attrs
import numpy as np


def _filename(value: Any) -> str:
    """A non-empty path string (``os.PathLike`` accepted)."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"Video filename must be a path (str or os.PathLike), got {type(value).__name__} {value!r}")
    name = os.fspath(value)
    if not isinstance(name, str):
        raise TypeError(f"Video filename must be a text path, got {type(name).__name__} {name!r}")
    if not name:
        raise ValueError("Video filename is empty: give the path of a video file")
    return name


def _grayscale(value: Any) -> Optional[bool]:
    """None, or a bool (NumPy bools too)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"Video grayscale must be None (detect), True or False, got {type(value).__name__} {value!r}")


def _stream(value: Any) -> int:
    """A stream number >= 0 (NumPy ints too, never a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Video stream must be a video stream number (an int >= 0), got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"Video stream must be >= 0 (0 is the first video stream), got {value}")
    return int(value)


def _files(value: Any) -> tuple[str, ...]:
    """Image files as a tuple of non-empty path strings (any sequence of paths accepted)."""
    if isinstance(value, (str, bytes, os.PathLike)):
        raise TypeError(f"Video files must be a list of image paths, got one path {value!r} (use filename)")
    return tuple(_filename(v) for v in value)


#: Resize interpolations: swscale's, as PyAV names them (``VideoFrame.reformat(interpolation=...)``).
INTERPOLATIONS = ("bilinear", "area", "bicubic", "fast_bilinear", "point", "lanczos", "gauss", "sinc", "spline", "bicublin", "x")
#: Frame layouts: as decoded (height, width, channels), or channels first.
LAYOUTS = ("HWC", "CHW")
#: Largest side a frame may be resized to.
MAX_SIDE = 16384


def _ints(name: str, count: int, low: int) -> Any:
    """A converter to None or a tuple of ``count`` ints >= ``low`` (lists, NumPy ints accepted)."""
    def convert(value: Any) -> Optional[tuple[int, ...]]:
        if value is None:
            return None
        try:
            items = tuple(value)
        except TypeError:
            raise TypeError(f"Video {name} must be {count} integers, got {value!r}") from None
        if len(items) != count or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in items):
            raise TypeError(f"Video {name} must be {count} integers, got {value!r}")
        if any(v < low or v > MAX_SIDE for v in items):
            raise ValueError(f"Video {name} must be {count} integers from {low} to {MAX_SIDE}, got {value!r}")
        return tuple(int(v) for v in items)
    return convert


def _crop(value: Any) -> Optional[tuple[int, int, int, int]]:
    crop = _ints("crop (top, left, height, width)", 4, 0)(value)
    if crop is not None and (crop[2] < 1 or crop[3] < 1):
        raise ValueError(f"Video crop (top, left, height, width) needs a height and width of at least 1, got {value!r}")
    return crop


def _choice(name: str, allowed: tuple[str, ...]) -> Any:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"Video {name} must be one of {', '.join(allowed)}; got {value!r}")
        return value
    return convert


@attrs.frozen
class Video:
    """A video source: which file, which stream, and how its frames are shaped.

    Args:
        filename: the path of a video file or an image sequence (``frame_%04d.png``), as
            the server sees it (a standalone server with a root: relative to that root).
        grayscale: ``None`` detects it from the first frames (neutral chroma, or all
            channels equal), ``True`` gives ``(h, w, 1)`` frames, ``False`` RGB ``(h, w, 3)``.
        stream: which video stream, when a container holds several (0: the first).
        files: image files read as frames, in order (then ``filename`` only names the
            video in messages). A folder, a glob (``frames/*.png``) or a printf pattern
            numbered from anywhere may also be given as ``filename``.
        crop: ``(top, left, height, width)``: keep only this part of each frame (it must
            lie inside the frame).
        resize: ``(height, width)``: scale each frame (after the crop) to this size with
            swscale, as PyAV's ``frame.reformat(width=, height=, format="rgb24",
            interpolation=)`` does (uncropped: straight from the decoded frame).
        interpolation: the resize's: one of :data:`INTERPOLATIONS` (default bilinear).
        layout: ``"HWC"`` (as decoded) or ``"CHW"`` (channels first, e.g. for PyTorch).
        The transforms run on the server, at decode: frames arrive shaped.

    Raises:
        TypeError: a field of the wrong type (the message names the value given).
        ValueError: an empty filename or a negative stream.
    """

    filename: str = attrs.field(converter=_filename)
    grayscale: Optional[bool] = attrs.field(default=None, converter=_grayscale)
    stream: int = attrs.field(default=0, converter=_stream)
    files: tuple[str, ...] = attrs.field(default=(), converter=_files)
    crop: Optional[tuple[int, int, int, int]] = attrs.field(default=None, converter=_crop)
    resize: Optional[tuple[int, int]] = attrs.field(default=None, converter=_ints("resize (height, width)", 2, 1))
    interpolation: str = attrs.field(default="bilinear", converter=_choice("interpolation", INTERPOLATIONS))
    layout: str = attrs.field(default="HWC", converter=_choice("layout", LAYOUTS))

    @property
    def transformed(self) -> bool:
        """Whether frames are cropped, resized or laid out channels first."""
        return self.crop is not None or self.resize is not None or self.layout != "HWC"

    def shaped(self, height: int, width: int, channels: int) -> tuple[int, int, int]:
        """The shape of a frame of ``height`` x ``width`` x ``channels`` after the transforms
        (``(c, h, w)`` for CHW).

        Raises:
            ValueError: the crop does not lie inside the frame (naming both).
        """
        if self.crop is not None:
            top, left, h, w = self.crop
            if top + h > height or left + w > width:
                raise ValueError(
                    f"crop (top, left, height, width) = {self.crop} does not lie inside the {width}x{height} frame "
                    f"(top + height <= {height}, left + width <= {width})"
                )
            height, width = h, w
        if self.resize is not None:
            height, width = self.resize
        return (channels, height, width) if self.layout == "CHW" else (height, width, channels)

    @classmethod
    def from_filename(cls, filename: "str | os.PathLike[str]", **options: Any) -> "Video":
        """Describe the video at ``filename``.

        Args:
            filename: a path (``str`` or ``os.PathLike``).
            **options: the other fields (``grayscale``, ``stream``).

        Returns:
            The :class:`Video`.
        """
        return cls(filename=os.fspath(filename), **options)


def as_video(video: Any) -> Video:
    """``video`` as a :class:`Video`.

    Accepted: a :class:`Video` as it is; a path (a video file, an image folder, a glob or a
    numbered pattern) as ``Video(path)``; a list of image paths as ``Video(files=...)``; and,
    by duck typing (no import of sleap-io), a ``sleap_io.Video`` of a media file or of an
    image list, keeping its grayscale setting.

    Raises:
        TypeError: anything else (naming what was given and what is accepted).
    """
    if isinstance(video, Video):
        return video
    if isinstance(video, (str, os.PathLike)):
        return Video.from_filename(video)
    if isinstance(video, (list, tuple)) and video:
        files = _files(video)
        return Video(filename=files[0], files=files)
    filename = getattr(video, "filename", None)
    if filename is not None and hasattr(video, "backend_metadata"):  # a sleap_io.Video
        return _from_sleap(video, filename)
    raise TypeError(
        f"expected a Video, a path, a list of image paths or a sleap_io.Video, got {type(video).__name__}"
    )


def _from_sleap(video: Any, filename: Any) -> Video:
    """A sleap_io.Video as a :class:`Video`: its file (or image list) and grayscale setting."""
    meta = getattr(video, "backend_metadata", None) or {}
    if "dataset" in meta or str(filename).lower().endswith((".h5", ".hdf5", ".slp", ".pkg.slp")):
        raise TypeError(f"a sleap_io.Video stored in HDF5 ({filename}) is not a video file or image list; "
                        "asyncframes serves media files and images")
    grayscale = meta.get("grayscale")
    if grayscale is None:
        try:
            grayscale = video.grayscale  # may open its backend to detect it
        except Exception:  # noqa: BLE001  (a backend that cannot open: let the server detect it)
            grayscale = None
    if isinstance(filename, (list, tuple)):
        files = _files(filename)
        return Video(filename=files[0], grayscale=grayscale, files=files)
    return Video(filename=filename, grayscale=grayscale)


@attrs.frozen
class VideoInfo:
    """What the server knows about a video: the metadata a caller needs to size buffers.

    ``channels`` and ``grayscale`` reflect the spec's ``grayscale`` option (or the
    detection when it is ``None``), so they describe the frames you will receive.
    """

    filename: str
    frame_count: int
    height: int
    width: int
    channels: int
    grayscale: bool
    fps: float
    codec: str
    pix_fmt: str
    container: str
    duration: Optional[float] = None
    #: The decoded frame's size when transforms change it (``height``/``width`` are the
    #: frames you receive); None otherwise.
    source_height: Optional[int] = None
    source_width: Optional[int] = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of the whole video as an array: ``(frames, h, w, c)``."""
        return (self.frame_count, self.height, self.width, self.channels)
