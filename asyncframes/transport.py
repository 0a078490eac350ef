"""ZeroMQ transport: endpoints and the two socket roles.

The server owns a ROUTER socket, each client a DEALER: both directions are
reliable queues (no PUB/SUB, so nothing is dropped before a peer is ready),
and the ROUTER knows which client each message came from. The server's ROUTER
is *mandatory*: sending to a client that has gone raises
:class:`PeerGone` instead of silently dropping, so its work is freed at once.
Payload frames are sent with ``copy=False``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from typing import Any, Optional, Sequence

import zmq

from . import protocol
from .protocol import Message

#: Kernel-level keepalive for TCP, plus ZMTP heartbeats: a silent peer is dropped in seconds.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


class PeerGone(Exception):
    """The client this message was for is no longer connected."""


class PeerBusy(Exception):
    """The client's queue is full; try again later."""


def private_endpoint() -> tuple[str, Optional[str]]:
    """An endpoint only this user can reach: ipc in a fresh 0700 temp dir, or loopback tcp.

    Returns the bind address and the directory to delete afterwards (None for tcp,
    whose ``*`` port is chosen by the server when it binds).
    """
    if sys.platform.startswith("win") or not zmq.has("ipc"):
        return "tcp://127.0.0.1:*", None
    directory = tempfile.mkdtemp(prefix="asyncframes-")
    return f"ipc://{directory}/server.sock", directory


def remove_private_dir(directory: Optional[str]) -> None:
    """Delete a directory made by :func:`private_endpoint`."""
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def _context() -> zmq.Context:
    return zmq.Context.instance()


class ServerSocket:
    """The server's ROUTER: receives (client, message, payload), sends to a named client."""

    def __init__(self, binds: Sequence[str], *, sndhwm: int = 1000, rcvhwm: int = 1000) -> None:
        self.socket = _context().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.endpoints: list[str] = []
        try:
            for address in binds:
                self.socket.bind(address)
                self.endpoints.append(self.socket.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError:
            self.socket.close(linger=0)
            raise

    def recv(self) -> tuple[bytes, Sequence[Any]]:
        """Next (client id, frames) without blocking; raises zmq.Again when nothing is queued."""
        parts = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        return parts[0].bytes, parts[1:]

    def send(self, client: bytes, message: Message, payload: Any = None) -> Optional[zmq.MessageTracker]:
        """Queue ``message`` for ``client``; raise :class:`PeerGone` or :class:`PeerBusy`.

        With a payload, returns a tracker that is ``done`` once ZeroMQ no longer needs the buffer.
        """
        try:
            return self.socket.send_multipart(
                [client, *protocol.frames_of(message, payload)], flags=zmq.NOBLOCK, copy=False, track=payload is not None
            )
        except zmq.Again as exc:
            raise PeerBusy() from exc
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise PeerGone() from exc
            raise

    def close(self) -> None:
        self.socket.close(linger=0)


class ClientSocket:
    """A client's DEALER connected to one or more server endpoints."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.socket = _context().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # credit-based flow control bounds what is queued
        for endpoint in endpoints:
            self.socket.connect(endpoint)

    def send(self, message: Message) -> None:
        self.socket.send_multipart(protocol.frames_of(message), copy=True)

    def poll(self, timeout_ms: int) -> bool:
        """True when a message is waiting."""
        return bool(self.socket.poll(timeout_ms, zmq.POLLIN))

    def recv(self) -> tuple[Message, Optional[memoryview]]:
        """The waiting message and its payload (zero-copy); raises ProtocolError if malformed."""
        return protocol.parse(self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False))

    def close(self) -> None:
        if not self.socket.closed:
            self.socket.close(linger=0)


def fd_is_readable(fd: int) -> bool:
    """Whether a file descriptor (e.g. the lifeline pipe) has data or EOF waiting."""
    poller = zmq.Poller()
    poller.register(fd, zmq.POLLIN)
    return bool(poller.poll(0))


__all__ = [
    "ClientSocket",
    "PeerBusy",
    "PeerGone",
    "ServerSocket",
    "fd_is_readable",
    "private_endpoint",
    "remove_private_dir",
]
