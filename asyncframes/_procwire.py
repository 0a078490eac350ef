"""What a server and its decoder worker processes say to each other, in msgpack (never pickle).

A job is a map of plain values; the :class:`~asyncframes._video.Video` in it travels as the
wire protocol's converter unstructures it, and the file's identity as lists of integers. An
answer is a list: ``["ready", pid]``, ``["done", job]``, ``["interrupted", job]`` or
``["error", job, kind, message]``, where ``kind`` names a class of :mod:`asyncframes.errors`
(any other exception becomes a ``ServerError`` naming its type), rebuilt with
:func:`asyncframes.errors.error_from_wire` as clients rebuild a server's errors.
"""

from __future__ import annotations

from typing import Any

import msgpack

from . import _files as files
from ._protocol import converter
from ._video import Video
from .errors import WIRE_ERRORS, AsyncFramesError, error_from_wire


def pack_job(job: dict[str, Any]) -> bytes:
    """A job (or a tidying note) as bytes."""
    plain = dict(job)
    if "video" in plain:
        plain["video"] = converter.unstructure(plain["video"])
    if "identity" in plain:
        plain["identity"] = [[f.dev, f.ino, f.size, f.mtime_ns, f.ctime_ns] for f in plain["identity"]]
    return msgpack.packb(plain, use_bin_type=True)


def unpack_job(data: bytes) -> dict[str, Any]:
    """A job as :func:`pack_job` packed it (tuples come back as lists)."""
    job = msgpack.unpackb(data, raw=False)
    if "video" in job:
        job["video"] = converter.structure(job["video"], Video)
    if "identity" in job:
        job["identity"] = tuple(files.FileIdentity(*f) for f in job["identity"])
    return job


def pack_answer(*answer: Any) -> bytes:
    """An answer; an exception in it goes as its kind and message."""
    if answer and answer[0] == "error":
        _, job, exc = answer
        kind = type(exc).__name__ if isinstance(exc, AsyncFramesError) and type(exc).__name__ in WIRE_ERRORS else "ServerError"
        message = str(exc) if kind != "ServerError" or isinstance(exc, AsyncFramesError) else f"{type(exc).__name__}: {exc}"
        answer = ("error", job, kind, message)
    return msgpack.packb(list(answer), use_bin_type=True)


def unpack_answer(data: bytes) -> list[Any]:
    """An answer as a list; an error's is ``["error", job, exception]``."""
    answer = msgpack.unpackb(data, raw=False)
    if answer and answer[0] == "error":
        _, job, kind, message = answer
        return ["error", job, error_from_wire(kind, message)]
    return answer
