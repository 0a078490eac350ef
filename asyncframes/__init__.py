"""asyncframes: decoded video frames served from a background process over ZeroMQ.

>>> from asyncframes import AsyncVideo
>>> with AsyncVideo.from_video("clip.mp4", frame_idxs=range(0, 100, 2)) as av:
...     for frame_idxs, frames in av.chunks:
...         ...
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    AsyncFramesError,
    AuthenticationError,
    FrameIndexError,
    ProtocolError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerDiedError,
    ServerError,
    ServerShutdownError,
    ServerStartError,
    VideoAccessError,
    VideoChangedError,
    VideoDecodeError,
    VideoError,
    VideoNotFoundError,
    VideoOpenError,
)

if TYPE_CHECKING:
    from ._client import AsyncVideo, FrameChunk
    from ._frame_reader import Frame, FrameBatch, FrameReader, VideoMetadata
    from ._frame_reader import open_video as open  # noqa: F401 (asyncframes.open, not in __all__: a star import must not shadow the builtin)
    from ._video import Video, VideoInfo

#: Names imported on first use: the client side (ZeroMQ, the process helpers and their
#: exit hook) is not loaded by a server, nor by anything that imports only a submodule;
#: nor NumPy and attrs (``Video``), so that ``from asyncframes import AsyncVideo`` costs a
#: few milliseconds and a client's first ``AsyncVideo()`` starts its server before it
#: loads them (the two then overlap).
_LAZY = {"AsyncVideo": "_client", "FrameChunk": "_client", "Video": "_video", "VideoInfo": "_video"}
#: The reader facade, also on first use (``open`` is :func:`asyncframes._frame_reader.open_video`;
#: it is never bound inside the package's modules, where ``open`` stays the builtin).
_LAZY.update({name: "_frame_reader" for name in ("Frame", "FrameBatch", "FrameReader", "VideoMetadata")})
_RENAMED = {"open": ("_frame_reader", "open_video")}


def __getattr__(name: str) -> Any:
    module, attr = _RENAMED.get(name, (_LAZY.get(name), name))
    if module is None:
        raise AttributeError(f"module 'asyncframes' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """What the package holds, including the names it imports on first use."""
    return sorted(set(globals()) | set(_LAZY) | set(_RENAMED))


__all__ = [
    "AsyncFramesError",
    "AuthenticationError",
    "AsyncVideo",
    "Frame",
    "FrameBatch",
    "FrameChunk",
    "FrameReader",
    "FrameIndexError",
    "ProtocolError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "ServerDiedError",
    "ServerError",
    "ServerShutdownError",
    "ServerStartError",
    "Video",
    "VideoAccessError",
    "VideoChangedError",
    "VideoDecodeError",
    "VideoError",
    "VideoInfo",
    "VideoMetadata",
    "VideoNotFoundError",
    "VideoOpenError",
    "__version__",
]
