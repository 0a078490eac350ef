"""Synthetic clips made with PyAV: the built-in sample video and test material.

Every frame carries its own index as a block barcode over a moving gradient,
so neighbouring frames always differ and a wrong frame is visible.
"""

from __future__ import annotations

import functools
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, cast

import av
import numpy as np
from av.video.stream import VideoStream

#: Codec options that force B-frames and a long GOP for H.264/HEVC encoders.
_ENCODER_OPTIONS = {
    "libx264": lambda gop, bf: {"bf": str(bf), "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"},
    "libx265": lambda gop, bf: {"x265-params": f"keyint={gop}:min-keyint={gop}:bframes={bf}:scenecut=0:log-level=error"},
}


def pattern(i: int, height: int, width: int) -> np.ndarray:
    """The RGB picture of frame ``i``: a moving gradient with ``i`` written as a barcode."""
    base = _gradient(height, width)
    # uint8 arithmetic wraps modulo 256, which is the motion we want
    img = base + np.array([i * 7 % 256, i * 3 % 256, i * 11 % 256], dtype=np.uint8)
    block = max(4, width // 16)
    for b in range(12):
        x0 = (b % 8) * block * 2
        y0 = (b // 8) * block * 2
        img[y0 : y0 + block, x0 : x0 + block] = 255 if (i >> b) & 1 else 0
    return img


@functools.lru_cache(maxsize=8)
def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = (x * 2) % 256
    img[..., 1] = (y * 2) % 256
    img[..., 2] = (x + y) % 256
    img.flags.writeable = False
    return img


def write_clip(
    path: "str | os.PathLike[str]",
    frames: int = 90,
    size: tuple[int, int] = (96, 128),
    codec: str = "libx264",
    rate: int = 30,
    gop: int = 30,
    bframes: int = 2,
    pix_fmt: Optional[str] = None,
    pts: Optional[Sequence[int]] = None,
    time_base: Optional[Fraction] = None,
    grayscale: bool = False,
    options: Optional[dict[str, str]] = None,
    start: Optional[int] = None,
    streams: int = 1,
    container_options: Optional[dict[str, str]] = None,
) -> Path:
    """Encode a clip of ``frames`` pattern frames of ``size=(h, w)``; the container follows the suffix.

    ``pts`` (with ``time_base``) sets explicit presentation times, e.g. for variable frame rate;
    ``start`` shifts them (a negative start makes MP4 write an edit list that hides those frames).
    ``options`` go to the encoder. Stream *k* of ``streams`` shows frame numbers from ``1000 * k``.
    """
    path = Path(path)
    height, width = size
    encoder_options = {**_ENCODER_OPTIONS.get(codec, lambda g, b: {})(gop, bframes), **(options or {})}
    with av.open(str(path), mode="w", options=container_options or {}) as out:
        outs: list[VideoStream] = []
        for _ in range(streams):
            stream = cast(VideoStream, out.add_stream(codec, rate=rate, options=encoder_options))
            stream.width, stream.height = width, height
            stream.pix_fmt = pix_fmt or _default_pix_fmt(codec)
            if codec not in _ENCODER_OPTIONS:
                stream.codec_context.gop_size = gop
                if bframes and codec in ("mpeg4", "mpeg2video", "mpeg1video"):
                    stream.codec_context.max_b_frames = bframes
            if time_base is not None:
                stream.time_base = time_base
                stream.codec_context.time_base = time_base
            outs.append(stream)
        for i in range(frames):
            for k, stream in enumerate(outs):
                img = pattern(i + 1000 * k, height, width)
                if grayscale:
                    img[...] = img[..., :1]
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                if pts is not None:
                    frame.pts = int(pts[i]) + (start or 0)
                    frame.time_base = time_base
                elif start is not None:
                    frame.pts = i + start
                for packet in stream.encode(frame):
                    out.mux(packet)
        for stream in outs:
            for packet in stream.encode():
                out.mux(packet)
    return path


def _default_pix_fmt(codec: str) -> str:
    return {"mjpeg": "yuvj420p", "ffv1": "yuv444p"}.get(codec, "yuv420p")


def sample_video() -> Path:
    """The package's own sample clip (H.264 with B-frames, 300 frames of 240x320), made once per user."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asyncframes"
    path = cache / "sample-v1.mp4"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=cache)
        os.close(fd)
        write_clip(tmp, frames=300, size=(240, 320), gop=60, bframes=3)
        os.replace(tmp, path)
    return path
