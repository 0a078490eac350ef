"""ZeroMQ transport: endpoints, security, and the two socket roles.

The server owns a ROUTER socket, each client one DEALER per server: both
directions are reliable queues (no PUB/SUB, so nothing is dropped before a peer
is ready), and the ROUTER knows which client each message came from. The
server's ROUTER is *mandatory*: sending to a client that has gone raises
:class:`PeerGone` instead of silently dropping, so its work is freed at once.
Payload frames are sent with ``copy=False``. A client socket carries a monitor
so a lost connection or a refused CURVE handshake is seen, not waited out.
Optional CURVE encryption and authentication use ZeroMQ's own ``zmq.auth``.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import attrs
import zmq

from . import _protocol as protocol
from ._protocol import ConnectionEvent

if TYPE_CHECKING:  # zmq.auth is imported only when CURVE is used: it costs ~20 ms at start-up
    from zmq.auth.thread import ThreadAuthenticator
from ._protocol import Message
from .errors import AsyncFramesError, AuthenticationError, ServerStartError

#: ZMTP heartbeats: a peer that stops answering is disconnected within seconds.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
#: How often a client looks again for a unix socket that is not there yet (or gone), in ms.
IPC_RECONNECT_IVL_MS = 5

#: Largest frame a server accepts by default (what a request for 10 million explicit frame
#: indices needs, see :func:`protocol.max_header_bytes`); ZeroMQ drops a peer that sends a
#: bigger frame as soon as it reads the frame's length, before any of it is in memory.
#: ZeroMQ applies this per *frame*, and nothing in libzmq 4.3 bounds the number of frames
#: of one message, which it buffers whole before the server sees any of it (docs/security.md).
MAX_MESSAGE_BYTES = protocol.max_header_bytes(10_000_000)

#: The monitor events a client acts on, as the client core names them.
CLIENT_EVENTS: dict[int, ConnectionEvent] = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: ConnectionEvent.CONNECTED,
    zmq.EVENT_DISCONNECTED: ConnectionEvent.LOST,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: ConnectionEvent.AUTH_FAILED,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: ConnectionEvent.HANDSHAKE_FAILED,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: ConnectionEvent.HANDSHAKE_FAILED,
}

#: The endpoint forms a client connects to, for error messages.
ENDPOINT_FORMS = "tcp://host:port (e.g. tcp://127.0.0.1:9010) or ipc://path"


class PeerGone(Exception):
    """The client this message was for is no longer connected."""


class PeerBusy(Exception):
    """The client's queue is full; try again later."""


@attrs.frozen
class ServerCurve:
    """The server's CURVE key pair and the folder of client public keys it accepts."""

    public: bytes
    secret: bytes
    allowed_clients_dir: str

    @classmethod
    def load(cls, secret_file: "str | os.PathLike[str]", allowed_clients_dir: "str | os.PathLike[str]") -> "ServerCurve":
        public, secret = _load_secret(secret_file)
        if not os.path.isdir(allowed_clients_dir):
            raise AuthenticationError(f"client key folder {allowed_clients_dir} does not exist")
        return cls(public=public, secret=secret, allowed_clients_dir=os.fspath(allowed_clients_dir))


@attrs.frozen
class ClientCurve:
    """A client's CURVE key pair and the public key of the server it expects."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, secret_file: "str | os.PathLike[str]", server_key_file: "str | os.PathLike[str]") -> "ClientCurve":
        public, secret = _load_secret(secret_file)
        server_public, _ = _load_certificate(server_key_file, "the server's public key")
        return cls(public=public, secret=secret, server_public=server_public)


def _load_certificate(path: "str | os.PathLike[str]", what: str) -> tuple[bytes, Optional[bytes]]:
    """(public, secret or None) from a ``zmq.auth`` certificate file, failing as AuthenticationError."""
    import zmq.auth

    try:
        return zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise AuthenticationError(f"cannot read {what} {path}: {exc}") from exc


def _load_secret(path: "str | os.PathLike[str]") -> tuple[bytes, bytes]:
    public, secret = _load_certificate(path, "the key pair")
    if secret is None:
        raise AuthenticationError(f"{path} holds no secret key (use the .key_secret file made by 'asyncframes keygen')")
    return public, secret


def create_keys(directory: "str | os.PathLike[str]", name: str) -> tuple[str, str]:
    """Write ``name.key`` (public, to share) and ``name.key_secret`` (keep private) into ``directory``."""
    import zmq.auth

    os.makedirs(directory, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(os.fspath(directory), name)
    os.chmod(secret_file, 0o600)
    return public_file, secret_file


def _context() -> zmq.Context:
    return zmq.Context.instance()


class ServerSocket:
    """The server's ROUTER: receives (client, message, payload), sends to a named client."""

    def __init__(
        self,
        binds: Sequence[str],
        *,
        curve: Optional[ServerCurve] = None,
        sndhwm: int = 1000,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.socket = _context().socket(zmq.ROUTER)
        self.authenticator: "Optional[ThreadAuthenticator]" = None
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        # No receive high-water mark: libzmq (4.3.5 and master, issue 4841) aborts the whole
        # process when a connection whose inbound queue was full (RCVHWM reached, so its
        # engine stopped reading) closes and a heartbeat or a queued ZMTP PING then makes the
        # engine write: "Assertion failed: !_io_error (stream_engine_base.cpp)". With no limit
        # the engine never stops reading, so that state cannot arise; the server bounds
        # inbound work itself by reading promptly into bounded per-client queues (server.py).
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if curve is not None:
            # ZAP handler: only clients whose public key is in the folder get through.
            from zmq.auth.thread import ThreadAuthenticator

            self.authenticator = ThreadAuthenticator(_context())
            self.authenticator.start()
            self.authenticator.configure_curve(domain="*", location=curve.allowed_clients_dir)
            self.socket.curve_server = True
            self.socket.curve_publickey = curve.public
            self.socket.curve_secretkey = curve.secret
        self.endpoints: list[str] = []
        self._last_identity: Optional[zmq.Frame] = None
        try:
            for address in binds:
                self.socket.bind(address)
                self.endpoints.append(self.socket.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError:
            self.close()
            raise

    def recv(self) -> Optional[tuple[bytes, list[Any]]]:
        """Next (client id, message parts) without blocking; None when nothing is queued.

        Nothing is decoded here: reading is cheap, so the server can always keep up with
        what is queued and decide later what each client's messages are worth.
        """
        try:
            # The identity part as a zmq.Frame: it carries the connection's metadata (its file
            # descriptor, for disconnect_last_sender); the rest copied, cheaper for small headers.
            identity = self.socket.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        self._last_identity = identity
        return identity.bytes, self.socket.recv_multipart(flags=zmq.NOBLOCK) if identity.more else []

    def disconnect_last_sender(self) -> str:
        """Cut the connection the last received message came from (a client that floods after
        it was dropped); says what was cut, or why nothing was. ROUTER sockets have no call for
        this, so the connection's socket is shut down under libzmq, which then closes it as it
        would a peer that went away (it never stopped reading it: no RCVHWM, so libzmq issue
        4841 does not arise). A peer that reconnects gets a new identity. inproc has no
        descriptor: nothing is cut.
        """
        identity, self._last_identity = self._last_identity, None
        fd = identity.get(zmq.SRCFD) if identity is not None else -1
        if fd < 0:
            return "not cut: the connection has no descriptor"
        try:
            copy = os.dup(fd)
        except OSError as exc:  # closed already
            return f"not cut: descriptor {fd}: {exc.strerror}"
        try:
            conn = socket.socket(fileno=copy)
        except OSError as exc:  # the number now names something else
            os.close(copy)
            return f"not cut: descriptor {fd}: {exc.strerror}"
        with conn:
            try:
                peer = conn.getpeername()
            except OSError as exc:
                peer = f"none: {exc.strerror}"
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                return f"not cut: descriptor {fd} (peer {peer}): {exc.strerror}"
        return f"cut descriptor {fd} (peer {peer})"

    def has_message(self) -> bool:
        """Whether a message waits to be read."""
        return bool(self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def poller(self, *fds: int) -> Callable[[float], set[int]]:
        """A wait for this socket and the file descriptors ``fds``: called with seconds (at most),
        it returns which of ``fds`` are readable (the socket's messages are read with :meth:`recv`)."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        for fd in fds:
            poller.register(fd, zmq.POLLIN)

        def wait(timeout_s: float) -> set[int]:
            events = dict(poller.poll(max(0, math.ceil(timeout_s * 1000))))
            return {fd for fd in fds if fd in events}

        return wait

    def send(self, client: bytes, message: Message, payload: Any = None) -> Optional[zmq.MessageTracker]:
        """Queue ``message`` for ``client``; raise :class:`PeerGone` or :class:`PeerBusy`.

        With a payload, returns a tracker that is ``done`` once ZeroMQ no longer needs the buffer.
        """
        try:
            return self.socket.send_multipart(
                [client, *protocol.parts_of(message, payload)], flags=zmq.NOBLOCK, copy=False, track=payload is not None
            )
        except zmq.Again as exc:
            raise PeerBusy() from exc
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise PeerGone() from exc
            raise

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


class ClientSocket:
    """A client's DEALER connected to one server, with a monitor of its connection.

    Nothing of ZeroMQ leaks out: connection events come as :class:`ConnectionEvent`,
    failures as :mod:`asyncframes.errors` classes.
    """

    def __init__(self, endpoint: str, curve: Optional[ClientCurve] = None) -> None:
        """Connect (in the background: ZeroMQ keeps trying) to ``endpoint``.

        Raises:
            ServerStartError: ZeroMQ refuses the endpoint (e.g. an unknown host or a
                malformed address), naming it and the forms accepted.
        """
        self.endpoint = endpoint
        self.socket = _context().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # credit-based flow control bounds what is queued
        if curve is not None:
            self.socket.curve_publickey = curve.public
            self.socket.curve_secretkey = curve.secret
            self.socket.curve_serverkey = curve.server_public
        if endpoint.startswith("ipc://"):
            # A private server's socket appears a few hundred milliseconds after we connect: look
            # again every few milliseconds, without backing off (ZeroMQ's backoff doubled the wait,
            # so the first greeting came up to half the start time after the server listened); a
            # missing unix socket costs one failed connect() per attempt.
            self.socket.setsockopt(zmq.RECONNECT_IVL, IPC_RECONNECT_IVL_MS)
            self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 0)
        self.monitor = self.socket.get_monitor_socket(functools.reduce(operator.or_, CLIENT_EVENTS))
        try:
            self.socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ServerStartError(f"cannot connect to {endpoint!r} ({exc}): use {ENDPOINT_FORMS}") from exc

    def send(self, message: Message, deadline: Optional[float], between: Callable[[], None], slice_s: float = 0.05) -> bool:
        """Queue ``message`` without ever blocking unboundedly; False if it could not be queued by ``deadline``.

        A DEALER blocks a send while it has no pipe to queue into (no peer yet, or
        ZeroMQ gave up on a peer after a failed handshake). So the send is
        non-blocking, and while it cannot proceed we wait for room in slices of at
        most ``slice_s`` seconds, calling ``between()`` after each (it raises if the
        connection failed, e.g. a CURVE mismatch), until ``deadline``
        (``time.monotonic()`` seconds; None: as long as ``between`` lets us).
        Short slices also let Ctrl-C through.
        """
        parts = protocol.parts_of(message)
        while True:
            try:
                self.socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
                return True
            except zmq.Again:
                pass
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            wait = slice_s if remaining is None else min(slice_s, remaining)
            self.socket.poll(max(1, int(wait * 1000)), zmq.POLLOUT)
            between()

    def recv(self) -> tuple[Message, Optional[memoryview]]:
        """The waiting message and its payload (zero-copy); raises ProtocolError if malformed."""
        return protocol.parse(self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False), max_bin_len=protocol.MAX_REPLY_BIN_BYTES)

    def fds(self) -> list[int]:
        """The descriptors an event loop watches: the socket's and its monitor's (edge-triggered:
        readable means "look again", so drain both after every activation and every send)."""
        return [self.socket.getsockopt(zmq.FD), self.monitor.getsockopt(zmq.FD)]

    def has_message(self) -> bool:
        """True if a message is waiting to be received."""
        return bool(self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def leftovers(self) -> list[Message]:
        """Every message still queued (malformed ones skipped): the last words of a connection that is gone."""
        found = []
        try:
            while self.has_message():
                try:
                    found.append(self.recv()[0])
                except AsyncFramesError:
                    continue
        except zmq.ZMQError:
            pass
        return found

    def events(self) -> list[ConnectionEvent]:
        """What happened to the connection since the last call, oldest first."""
        found = []
        while self.monitor.poll(0):
            # zmq_socket_monitor's first frame: uint16 event, uint32 value (native byte order).
            # Parsed here because zmq.utils.monitor imports asyncio, ~25 ms at every start.
            first = self.monitor.recv_multipart()[0]
            event = CLIENT_EVENTS.get(struct.unpack("=H", first[:2])[0])
            if event is not None:
                found.append(event)
        return found

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket and its monitor. Safe to call twice.

        Args:
            linger_ms: how long libzmq may go on sending what is queued, in the background
                (at most that long, also at exit); 0 drops it.
        """
        if not self.socket.closed:
            try:
                self.socket.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(linger=0)
            self.socket.close(linger=linger_ms)


def poll_any(sockets: Sequence[ClientSocket], timeout_ms: int) -> list[ClientSocket]:
    """The sockets with a message waiting, after at most ``timeout_ms``."""
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock.socket, zmq.POLLIN)
    ready = dict(poller.poll(timeout_ms))
    return [sock for sock in sockets if sock.socket in ready]
