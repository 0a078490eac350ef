"""Decoded frames to the arrays we serve: RGB, or one gray channel, exactly and cheaply.

The definition is fixed: RGB is PyAV's ``to_ndarray(format="rgb24")``, and a gray
frame is that RGB's R channel when R == G == B (gray content), else BT.601 luma
of it. The shortcuts below only ever return those same pixels:

* swscale runs single-threaded (about 2.5x faster than its default on small frames);
* a frame whose chroma planes are neutral (128 everywhere) is gray content, which
  costs a look at the small chroma planes instead of comparing three channels;
* :meth:`Converter.rgb_into` has swscale write RGB straight into the output (see
  :mod:`._sws`), which saves copying PyAV's array there.

Each converter checks each shortcut against PyAV's conversion on its first
frames and turns it off for good at the first disagreement. (A table from Y to
R would skip the RGB conversion, but gathering through it costs more than
swscale's conversion.)
"""

from __future__ import annotations

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
        rgb = rgb24(frame)
        if self._trials is None or not _neutral_chroma(frame):
            return luma(rgb)[..., None]
        if self._trials > 0:
            if not is_gray(rgb):
                log.info("%s: neutral chroma without equal RGB channels; comparing channels from now on", self.name)
                self._trials = None
                return luma(rgb)[..., None]
            self._trials -= 1
        return rgb[..., :1]


def _neutral_chroma(frame: av.VideoFrame) -> bool:
    if frame.format.name not in YUV_8BIT:
        return False
    return all(bool((_plane(frame, k) == 128).all()) for k in (1, 2))


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
