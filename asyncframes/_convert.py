"""Decoded frames to the arrays we serve: RGB, or one gray channel, exactly and cheaply.

The definition is fixed: RGB is PyAV's ``to_ndarray(format="rgb24")``, and a gray
frame is that RGB's R channel when R == G == B (gray content), else BT.601 luma
of it. The shortcuts below only ever return those same pixels:

* swscale runs single-threaded (about 2.5x faster than its default on small frames);
* a frame whose chroma planes are neutral (128 everywhere) is gray content, which
  costs a look at the small chroma planes instead of comparing three channels;
* :meth:`Converter.rgb_into` has swscale write RGB straight into the output (see
  :mod:`._sws`), which saves copying PyAV's array there;
* for gray content, R is the R plane of swscale's planar RGB (``gbrp``), one contiguous
  plane instead of every third byte of RGB (101 against 161 us a frame at 384x384). It
  is used for a kind of frame (format, size, range, colour space) only once a test
  pattern of that kind, every luma value at every place with neutral chroma, has come
  out with the same R both ways (see :func:`planar_r_is_r`).

Each converter checks each shortcut against PyAV's conversion on its first
frames and turns it off for good at the first disagreement. (A table from Y to
R would skip the RGB conversion, but gathering through it costs more than
swscale's conversion.)
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import av
import numpy as np

from ._video import Video

log = logging.getLogger(__name__)

#: Frames whose RGB channels confirm the neutral-chroma shortcut before it is trusted alone.
TRIALS = 32
#: Frames converted both straight into the output and by PyAV (and compared) before the
#: direct conversion is trusted alone, for each kind of frame (format, size, range, colour space).
DIRECT_TRIALS = 8
#: Bytes after a trial's scratch image that swscale must leave alone.
_CANARY_BYTES = 4096
#: The R plane of a ``gbrp`` frame (its planes are G, B, R).
_GBRP_R = 2
#: Gray frames a converter serves from RGB before it works out whether R may come from the
#: planar conversion (once per kind of frame in a process: 6 ms at 384x384, 38 ms at 1080p,
#: mostly first touches of fresh memory), so that a short request never pays for that.
PLANAR_AFTER = 128
#: Planar 8-bit YUV formats: plane 0 is Y, planes 1 and 2 are chroma, where 128 is neutral.
YUV_8BIT = frozenset(
    {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p", "yuv411p", "yuv410p"}
)


def _swscale_options() -> dict[str, Any]:
    try:
        av.VideoFrame(16, 16, "yuv420p").to_ndarray(format="rgb24", threads=1)
    except TypeError:  # PyAV before 14.1 cannot ask for it
        return {}
    return {"threads": 1}


_SWSCALE = _swscale_options()


def rgb24(frame: av.VideoFrame) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 array, exactly as ``to_ndarray(format="rgb24")`` makes it."""
    return frame.to_ndarray(format="rgb24", **_SWSCALE)


def is_gray(rgb: np.ndarray) -> bool:
    """Whether an ``(..., 3)`` RGB array has all three channels equal (gray content)."""
    r = rgb[..., 0]
    return bool(np.array_equal(r, rgb[..., 1]) and np.array_equal(r, rgb[..., 2]))


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an ``(..., 3)`` uint8 RGB array (8-bit weights 77/150/29); exactly R when R == G == B."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if is_gray(rgb):
        return r  # gray content: skip the arithmetic
    acc = r.astype(np.uint16) * 77
    acc += g.astype(np.uint16) * 150
    acc += b.astype(np.uint16) * 29
    acc += 128
    acc >>= 8
    return acc.astype(np.uint8)


def _plane(frame: av.VideoFrame, k: int) -> np.ndarray:
    """The visible part of plane ``k`` as an ``(h, w)`` uint8 view."""
    plane = frame.planes[k]
    data = np.frombuffer(plane, np.uint8)  # type: ignore[call-overload]
    return data.reshape(plane.height, plane.line_size)[:, : plane.width]


class Converter:
    """Converts one video's frames; keeps what it learnt about them. Not thread-safe."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._trials: Optional[int] = TRIALS  # None: the neutral-chroma shortcut is off
        #: The direct conversion (made on first use); None with ``_direct_off``: off for good.
        self._direct: Optional[Any] = None
        self._direct_off = False
        self._direct_trials: dict[tuple[Any, ...], int] = {}
        #: Per kind of frame, whether the planar R is R (see :func:`planar_r_is_r`).
        self._planar: dict[tuple[Any, ...], bool] = {}
        #: Gray-content frames served past the trials.
        self._served = 0

    def rgb(self, frame: av.VideoFrame) -> np.ndarray:
        return rgb24(frame)

    def rgb_into(self, frame: av.VideoFrame, out: np.ndarray) -> None:
        """Write :meth:`rgb` of ``frame`` into ``out`` (``(h, w, 3)`` uint8), by swscale
        straight into ``out`` where that is known to give the same pixels."""
        if self._direct_off or not self._into(frame, out):
            out[...] = rgb24(frame)

    def _into(self, frame: av.VideoFrame, out: np.ndarray) -> bool:
        """Whether ``out`` now holds ``frame``'s RGB (False: nothing written, convert as usual)."""
        direct = self._direct
        if direct is None:
            from . import _sws  # the server side only: the client never loads ctypes wrappers of FFmpeg

            lib = _sws.library()
            if lib is None:
                self._direct_off = True
                return False
            direct = self._direct = _sws.DirectRGB(lib)
        key = direct.key(frame)
        if key is None:
            return False
        left = self._direct_trials.get(key, DIRECT_TRIALS)
        if left <= 0:
            return bool(direct.convert(frame, out, key))
        # A trial: into a scratch image followed by canary bytes (its value changes from one
        # trial to the next), which must come out as PyAV's conversion with the canary intact.
        canary = 0xA5 if left & 1 else 0x5A
        n = out.nbytes
        scratch = np.full(n + _CANARY_BYTES, canary, dtype=np.uint8)
        image = scratch[:n].reshape(out.shape)
        expected = rgb24(frame)
        if not direct.convert(frame, image, key):
            return False  # not for this output (e.g. not contiguous): the usual path
        if not (np.array_equal(image, expected) and bool((scratch[n:] == canary).all())):
            log.info(
                "%s: swscale writing %s frames straight into the output disagrees with PyAV's conversion; "
                "converting through PyAV from now on",
                self.name,
                key[0],
            )
            self.close()
            self._direct_off = True
        else:
            self._direct_trials[key] = left - 1
        out[...] = expected
        return True

    def close(self) -> None:
        """Free the direct conversion's swscale context (it is also freed when dropped)."""
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()

    def gray(self, frame: av.VideoFrame) -> np.ndarray:
        """An ``(h, w, 1)`` uint8 array: R of the RGB conversion for gray content, else its luma."""
        if self._trials is None or not _neutral_chroma(frame):
            return luma(rgb24(frame))[..., None]
        if self._trials > 0:
            rgb = rgb24(frame)
            if not is_gray(rgb):
                log.info("%s: neutral chroma without equal RGB channels; comparing channels from now on", self.name)
                self._trials = None
                return luma(rgb)[..., None]
            self._trials -= 1
            return rgb[..., :1]
        self._served += 1
        r = self._planar_r(frame) if self._served > PLANAR_AFTER else None
        return rgb24(frame)[..., :1] if r is None else r[..., None]

    def _planar_r(self, frame: av.VideoFrame) -> Optional[np.ndarray]:
        """R of ``frame``'s RGB conversion as the R plane of its planar one, an ``(h, w)`` view;
        None where that is not known to be the same for this kind of frame."""
        if frame.interlaced_frame:
            return None  # converted field by field: left to the usual path
        key = (frame.format.name, frame.width, frame.height, getattr(frame, "color_range", None), getattr(frame, "colorspace", None))
        same = self._planar.get(key)
        if same is None:
            same = self._planar[key] = planar_r_is_r(*key)
            if not same:
                log.info("%s: planar R differs from RGB's R for %s frames; taking R from RGB", self.name, key[0])
        if not same:
            return None
        return _plane(frame.reformat(format="gbrp", **_SWSCALE), _GBRP_R)


@functools.lru_cache(maxsize=64)
def planar_r_is_r(fmt: str, width: int, height: int, color_range: Optional[int], colorspace: Optional[int]) -> bool:
    """Whether, for gray content (neutral chroma) in frames of this kind, the R plane of the
    planar RGB conversion (``gbrp``) is exactly R of :func:`rgb24`.

    Checked on a test pattern of that kind, chroma neutral, that holds every luma value in
    every column and every row of each band of eight (the period of swscale's ordered
    dither), in ``ceil(256 / (height // 8))`` frames: with neutral chroma, each pixel's R
    is a function of its luma (and at most its place) in both conversions, so the pattern
    covers every case. Worked out once per kind in a process (see :data:`PLANAR_AFTER`).
    A PyAV that does not show a frame's range or colour space (None) gets False.
    """
    if fmt not in YUV_8BIT or height < 8 or color_range is None or colorspace is None:
        return False  # (frames under 8 rows gain nothing worth 256 test frames)
    bands = height // 8  # each band of 8 rows holds one value per column
    pattern = ((np.arange(height)[:, None] // 8 + np.arange(width)[None, :]) % 256).astype(np.uint8)
    try:
        for first in range(0, 256, bands):
            frame = av.VideoFrame(width, height, fmt)
            frame.color_range = color_range
            frame.colorspace = colorspace
            np.add(pattern, np.uint8(first), out=_plane(frame, 0))  # wraps at 256
            for k in range(1, len(frame.planes)):
                _plane(frame, k)[...] = 128
            planar = _plane(frame.reformat(format="gbrp", **_SWSCALE), _GBRP_R)
            if not np.array_equal(planar, rgb24(frame)[..., 0]):
                return False
    except (ValueError, TypeError, AttributeError, av.FFmpegError) as exc:
        log.debug("no planar R for %s %dx%d: %s", fmt, width, height, exc)
        return False
    return True


#: Chroma every byte of which is neutral (128), eight bytes at a time.
_NEUTRAL_8 = np.uint64(0x8080808080808080)


def _neutral_chroma(frame: av.VideoFrame) -> bool:
    if frame.format.name not in YUV_8BIT:
        return False
    for k in (1, 2):
        plane, neutral = _plane(frame, k), 128
        if plane.shape[1] % 8 == 0:  # rows of whole 8-byte words: compared a word at a time
            plane, neutral = plane.view(np.uint64), _NEUTRAL_8
        if not bool((plane == neutral).all()):
            return False
    return True


def shaped(frame: av.VideoFrame, gray: bool, video: Video, convert: Converter) -> np.ndarray:
    """``frame`` with ``video``'s transforms: cropped, resized, gray, laid out as asked.

    Resize alone is PyAV's ``frame.reformat(width=, height=, format="rgb24", interpolation=)``
    straight from the decoded frame; after a crop, the cropped RGB is reformatted the same
    way. Gray is then the R channel where R == G == B, else luma (as for whole frames).
    """
    if video.crop is None and video.resize is None:
        image = convert.gray(frame) if gray else convert.rgb(frame)
    else:
        if video.crop is None:
            h, w = video.resize  # type: ignore[misc]
            rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation=video.interpolation.upper()).to_ndarray()
        else:
            top, left, ch, cw = video.crop
            rgb = convert.rgb(frame)[top : top + ch, left : left + cw]
            if video.resize is not None:
                h, w = video.resize
                rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
                    width=w, height=h, format="rgb24", interpolation=video.interpolation.upper()
                ).to_ndarray()
        if gray:
            image = rgb[..., :1] if is_gray(rgb) else luma(rgb)[..., None]
        else:
            image = rgb
    return image.transpose(2, 0, 1) if video.layout == "CHW" else image
