"""The package's own exception hierarchy.

Every failure a caller can see is one of these, so ``except AsyncFramesError``
catches everything we raise, and the subclass names the cause. Errors raised in
the server travel over the wire by class name (see :mod:`asyncframes._protocol`)
and are re-raised in the client as the same class.
"""

from __future__ import annotations


class AsyncFramesError(Exception):
    """Base class of every error raised by asyncframes."""


class VideoError(AsyncFramesError):
    """Something is wrong with a video source."""


class VideoOpenError(VideoError):
    """The video could not be opened: not a video, no video stream, unreadable."""


class VideoNotFoundError(VideoOpenError, FileNotFoundError):
    """The video file does not exist."""


class VideoAccessError(VideoOpenError, PermissionError):
    """The server refuses this path: it lies outside the server's video root."""


class VideoChangedError(VideoError):
    """The file changed (replaced or rewritten) while a request was reading it; ask again."""


class VideoDecodeError(VideoError):
    """A frame could not be decoded (corrupt data, or a frame the decoder never presents)."""


class FrameIndexError(AsyncFramesError, IndexError):
    """A requested frame index is negative or not below the video's frame count."""


class ServerError(AsyncFramesError):
    """The frame server failed, refused a request, or could not be reached."""


class ServerStartError(ServerError):
    """A frame server process could not be started."""


class ServerDiedError(ServerError):
    """The frame server went away while a request was outstanding."""


class ServerShutdownError(ServerDiedError):
    """The frame server shut down (e.g. its operator stopped it) while a request was outstanding."""


class AuthenticationError(ServerError):
    """The server refused our CURVE credentials, or ours do not match its key."""


class ProtocolError(ServerError):
    """A message did not follow the wire protocol (bad header, wrong version)."""


class UnknownClientError(ProtocolError):
    """The server does not know this connection: it must say hello first. To a client that had
    been greeted, this means another server process now answers at the endpoint (the old one
    was restarted); the client treats it as a lost connection."""


class RequestTimeoutError(AsyncFramesError, TimeoutError):
    """No reply arrived within the caller's timeout."""


class RequestCancelledError(AsyncFramesError):
    """The request was cancelled (by the client, or by a server shutting down)."""


#: Classes that may be named in an error message on the wire. Anything else
#: arriving from a server is raised as :class:`ServerError`.
WIRE_ERRORS: dict[str, type[AsyncFramesError]] = {
    cls.__name__: cls
    for cls in (
        AsyncFramesError,
        VideoError,
        VideoOpenError,
        VideoNotFoundError,
        VideoAccessError,
        VideoChangedError,
        VideoDecodeError,
        FrameIndexError,
        ServerError,
        ProtocolError,
        UnknownClientError,
        RequestCancelledError,
    )
}


def error_from_wire(kind: str, message: str) -> AsyncFramesError:
    """Rebuild the exception a server reported, falling back to :class:`ServerError`."""
    cls = WIRE_ERRORS.get(kind, ServerError)
    return cls(message)


def process_ended(code: int) -> str:
    """How a child process ended, in the words every error about one uses: ``"exited with
    code 1"``, or for a negative ``code`` (``Popen.returncode``) ``"killed by SIGKILL (signal 9)"``."""
    if code >= 0:
        return f"exited with code {code}"
    import signal  # loaded by the interpreter already; imported here to keep this module bare

    try:
        return f"killed by {signal.Signals(-code).name} (signal {-code})"
    except ValueError:
        return f"killed by signal {-code}"
