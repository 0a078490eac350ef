"""asyncframes: decoded video frames served from a background process over ZeroMQ.

>>> from asyncframes import AsyncVideo
>>> with AsyncVideo.from_video("clip.mp4", frame_idxs=range(0, 100, 2)) as av:
...     for frame_idxs, frames in av.chunks:
...         ...
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from ._video import Video, VideoInfo
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

#: Names imported on first use: the client side (ZeroMQ, the process helpers and their
#: exit hook) is not loaded by a server, nor by anything that imports only a submodule.
_LAZY = {"AsyncVideo": "_client", "FrameChunk": "_client"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncframes' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "AsyncFramesError",
    "AuthenticationError",
    "AsyncVideo",
    "FrameChunk",
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
    "VideoNotFoundError",
    "VideoOpenError",
    "__version__",
]
