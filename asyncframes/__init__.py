"""asyncframes: decoded video frames served from a background process over ZeroMQ.

>>> from asyncframes import AsyncVideo
>>> with AsyncVideo.from_video("clip.mp4", frame_idxs=range(0, 100, 2)) as av:
...     for frame_idxs, frames in av.chunks:
...         ...
"""

__version__ = "0.1.0"

from .client import AsyncVideo, FrameChunk
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
from .video import Video, VideoInfo

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
