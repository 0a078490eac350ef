"""Starting and watching a private frame server process.

The server runs in a fresh interpreter (``python -m asyncframes serve``): a
spawn, never a fork, so it is safe from apps that run threads (Qt), and unlike
``multiprocessing``'s spawn it does not re-import the caller's ``__main__``.
Its stdin is a lifeline pipe: when this process dies, the pipe closes and the
server exits by itself. It binds a private endpoint (ipc in a 0700 temp dir)
and reports it on stdout when ready. The server also removes that dir when it
exits (``--private-dir``), so it goes even when this process is SIGKILLed.
Set ``ASYNCFRAMES_PYTHON`` to the interpreter to use where ``sys.executable``
is not a plain Python (embedded or frozen apps).
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import IO, Optional, Sequence

from ._version import __version__
from .errors import ServerDiedError, ServerStartError, process_ended

#: What a private server's folder is called (by :func:`private_endpoint`).
PRIVATE_DIR_PREFIX = "asyncframes-"
#: The one thing a private server's folder holds.
PRIVATE_SOCKET = "server.sock"

#: Printed (with the endpoints) on stdout by ``asyncframes serve`` once it accepts connections.
READY_LINE = "asyncframes server ready on"
#: Longest unix socket path (sun_path holds 108 bytes on Linux, 104 on macOS, with a NUL).
_MAX_IPC_PATH = 103


def private_endpoint() -> tuple[str, Optional[str]]:
    """An endpoint only this user can reach: ipc in a fresh 0700 temp dir, or loopback tcp.

    Returns the bind address and the directory to delete afterwards (None for tcp,
    whose ``*`` port is chosen by the server when it binds). It needs no ZeroMQ: a
    client starts its server before loading it (every libzmq that pyzmq ships for a
    POSIX system has ipc).
    """
    if sys.platform.startswith("win"):
        return "tcp://127.0.0.1:*", None
    import tempfile  # here: a client of a given or per-user server never needs it (nor shutil below)

    directory = tempfile.mkdtemp(prefix=PRIVATE_DIR_PREFIX)
    path = f"{directory}/{PRIVATE_SOCKET}"
    if len(path.encode()) > _MAX_IPC_PATH:  # a long TMPDIR: unix socket paths are short
        remove_private_dir(directory)
        return "tcp://127.0.0.1:*", None
    return f"ipc://{path}", directory


def remove_private_dir(directory: Optional[str]) -> None:
    """Delete a directory made by :func:`private_endpoint`."""
    if directory:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


def serve_command(*args: str) -> list[str]:
    """``asyncframes serve ARGS`` in a fresh interpreter (``$ASYNCFRAMES_PYTHON`` if set)."""
    return [os.environ.get("ASYNCFRAMES_PYTHON") or sys.executable, "-m", "asyncframes", "serve", *args]


class ServerProcess:
    """A private frame server: owned by one client, or shared by every client of this process (:func:`shared_server`)."""

    def __init__(
        self, start_timeout: float = 30.0, log_level: str = "WARNING", options: Sequence[str] = (), wait: bool = True
    ) -> None:
        """``options``: more ``asyncframes serve`` options (e.g. ``--workers 2``).
        ``wait=False`` returns at once; :meth:`wait_ready` then waits for the server."""
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.options = tuple(options)
        self.owner_pid = os.getpid()
        self.endpoint = ""
        bind, self._private_dir = private_endpoint()
        #: Where it will listen: known before it is ready unless the system picks a port.
        self.bind = bind
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        owned = ["--private-dir", self._private_dir] if self._private_dir else []
        try:
            self.popen = subprocess.Popen(
                serve_command("--bind", bind, *owned, "--lifeline", "--allow-stop", "--unconfined", "--log-level", log_level, *options),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,  # the server's log lines go to our stderr
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            remove_private_dir(self._private_dir)
            raise ServerStartError(f"could not start the frame server: {exc}") from exc
        self._lines: "queue.Queue[str]" = queue.Queue()
        assert self.popen.stdout is not None
        threading.Thread(target=_read_first_line, args=(self.popen.stdout, self._lines), daemon=True).start()
        self._started = time.monotonic()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> str:
        """The endpoint, once the server says it is ready (within ``start_timeout`` of its start)."""
        if self.endpoint:
            return self.endpoint
        deadline = self._started + self.start_timeout
        while True:
            try:
                line = self._lines.get(timeout=0.05)
            except queue.Empty:
                if self.popen.poll() is not None:
                    self.kill()
                    raise ServerStartError(
                        f"the frame server exited with code {self.popen.returncode} before it was ready"
                    ) from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServerStartError(f"the frame server did not start within {self.start_timeout:g} s") from None
                continue
            if line.startswith(READY_LINE):
                self.endpoint = line[len(READY_LINE) :].split()[0]
                return self.endpoint
            self.kill()
            raise ServerStartError(f"the frame server said {line!r} instead of getting ready")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> Optional[int]:
        """None while running, else the exit code (negative: killed by that signal)."""
        return self.popen.poll()

    def exit_error(self) -> Optional[ServerDiedError]:
        """How the server ended, as the error to raise (e.g. "ended: killed by SIGKILL (signal 9)"); None while it runs."""
        code = self.popen.poll()
        if code is None:
            return None
        return ServerDiedError(f"the frame server (pid {self.pid}) ended: {process_ended(code)}")

    def wait_exit_error(self, within: float = 1.0) -> Optional[ServerDiedError]:
        """:meth:`exit_error` once the process has ended, waiting up to ``within`` seconds for it; None if it runs on."""
        try:
            self.popen.wait(within)
        except subprocess.TimeoutExpired:
            pass
        return self.exit_error()

    def stop(self, timeout: float = 2.0) -> None:
        """Ask nicely (close the lifeline), then terminate, then kill."""
        if self.popen.poll() is None:
            try:
                if self.popen.stdin is not None:
                    self.popen.stdin.close()
            except OSError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._cleanup()

    def let_go(self) -> None:
        """Close the lifeline (the server exits by itself, and removes its folder) without waiting."""
        for pipe in (self.popen.stdin, self.popen.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._cleanup()

    def _cleanup(self) -> None:
        self.let_go()  # its pipes
        remove_private_dir(self._private_dir)
        self._private_dir = None


def is_private_dir(directory: str) -> bool:
    """Whether ``directory`` looks like a private server's folder: ``asyncframes-*``, holding at most its socket."""
    if not os.path.basename(os.path.normpath(directory)).startswith(PRIVATE_DIR_PREFIX):
        return False
    try:
        return set(os.listdir(directory)) <= {PRIVATE_SOCKET}
    except OSError:
        return False


def remove_own_private_dir(directory: str) -> None:
    """Remove a private server's folder from the server's side: its socket, then the (then empty) folder.

    Never removes anything else: a folder that holds more than the socket stays.
    """
    try:
        os.unlink(os.path.join(directory, PRIVATE_SOCKET))
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        os.rmdir(directory)
    except OSError:
        pass  # gone already (the client removed it), or not ours to empty


_spare_lock = threading.Lock()
_spare: Optional[ServerProcess] = None


def prestart(log_level: str = "WARNING", options: Sequence[str] = ()) -> int:
    """Start a private server in the background for the next client of this process; its pid.

    Python, NumPy and PyAV take a few hundred milliseconds to start; an app that
    calls this early (at start-up) finds its first server ready when it needs it.
    A server nobody takes exits with this process.
    """
    global _spare
    with _spare_lock:
        if _spare is None or _spare.exit_code() is not None or _spare.owner_pid != os.getpid():
            _spare = ServerProcess(log_level=log_level, options=options, wait=False)
        return _spare.pid


def take_prestarted(log_level: str, options: Sequence[str], start_timeout: float, wait: bool = True) -> Optional[ServerProcess]:
    """The prestarted server if there is one started like this (and by this process), ready
    (``wait=False``: perhaps still starting)."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is None:
        return None
    if spare.owner_pid != os.getpid():
        return None  # a forked child: that server belongs to the parent
    if spare.exit_code() is not None or (spare.log_level, spare.options) != (log_level, tuple(options)):
        spare.stop()
        return None
    spare.start_timeout = start_timeout
    if wait:
        spare.wait_ready()
    return spare


_shared_lock = threading.Lock()
_shared: dict[tuple[str, tuple[str, ...]], ServerProcess] = {}


def shared_server(log_level: str, options: Sequence[str], start_timeout: float) -> ServerProcess:
    """This process's private server started like this, shared by all its clients; started now
    (without waiting: see :meth:`ServerProcess.wait_ready`) if there is none yet, or if the
    last one ended.

    A shared server outlives the clients that use it, so the next client of this process
    costs a connection, not a process start; it exits with this process (its lifeline).
    A forked child gets its own: the parent's belongs to the parent.
    """
    key = (log_level, tuple(options))
    with _shared_lock:
        server = _shared.get(key)
        if server is not None and server.owner_pid == os.getpid() and server.exit_code() is None:
            server.start_timeout = max(server.start_timeout, start_timeout)
            return server
        if server is not None and server.owner_pid == os.getpid():
            server.stop()  # it ended: tidy up its folder
        server = take_prestarted(log_level, options, start_timeout, wait=False) or ServerProcess(
            start_timeout=start_timeout, log_level=log_level, options=options, wait=False
        )
        _shared[key] = server
        return server


def stop_shared_servers() -> None:
    """Stop this process's shared private servers (they also stop when it exits); the next
    client starts a new one."""
    with _shared_lock:
        servers = [s for s in _shared.values() if s.owner_pid == os.getpid()]
        _shared.clear()
    for server in servers:
        server.stop()


@atexit.register
def _let_shared_servers_go() -> None:
    """At exit: close each shared server's lifeline and go; the server notices, finishes, removes
    its folder and exits by itself (waiting for it would only delay this process's exit)."""
    with _shared_lock:
        servers = [s for s in _shared.values() if s.owner_pid == os.getpid()]
        _shared.clear()
    for server in servers:
        server.let_go()


#: A per-user server exits after this many seconds without a client (``$ASYNCFRAMES_USER_SERVER_IDLE`` overrides).
USER_SERVER_IDLE_S = 600.0


def user_runtime_dir() -> str:
    """This user's folder for per-user servers: ``$ASYNCFRAMES_RUNTIME_DIR``, else
    ``$XDG_RUNTIME_DIR/asyncframes``, else ``<tmp>/asyncframes-<uid>``; made 0700.

    Raises:
        ServerStartError: it exists but is not a folder that only this user can enter
            (another user could then reach or replace the server).
    """
    folder = os.environ.get("ASYNCFRAMES_RUNTIME_DIR")
    if not folder:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg):
            folder = os.path.join(xdg, "asyncframes")
        else:
            import tempfile  # here: with a runtime folder set, a client never needs it

            folder = os.path.join(tempfile.gettempdir(), f"asyncframes-{os.getuid()}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise ServerStartError(f"cannot make the per-user server folder {folder}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ServerStartError(
            f"{folder} is not a folder only this user can enter (mode {oct(info.st_mode & 0o777)}, owner {info.st_uid}): "
            "remove it, or set ASYNCFRAMES_RUNTIME_DIR"
        )
    return folder


def user_server(log_level: str, options: Sequence[str], start_timeout: float) -> str:
    """The endpoint of this user's frame server for this version and these options, started
    now if none is listening; it outlives this process and exits after
    :data:`USER_SERVER_IDLE_S` seconds without a client.

    One server per package version and option set (its socket is named after them), so a
    process of another version never talks to a stale server. Starting is serialised by
    a lock in the folder: two processes starting at once get the same server.

    Raises:
        ServerStartError: the folder is unsafe, the socket path too long, or the server did
            not start within ``start_timeout`` (its log is in the folder).
    """
    path = user_server_path(log_level, options)
    folder, name = os.path.dirname(path), os.path.basename(path)[: -len(".sock")]
    endpoint = f"ipc://{path}"
    idle = float(os.environ.get("ASYNCFRAMES_USER_SERVER_IDLE") or USER_SERVER_IDLE_S)
    if listening(path):
        return endpoint
    deadline = time.monotonic() + start_timeout
    with open(os.path.join(folder, "start.lock"), "w") as lock:
        _lock(lock, deadline)
        if listening(path):  # another process started it meanwhile
            return endpoint
        try:
            os.unlink(path)  # a socket nobody listens on: its server is gone
        except FileNotFoundError:
            pass
        log_path = os.path.join(folder, name + ".log")
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                serve_command("--bind", endpoint, "--unconfined", "--allow-stop", "--idle-exit", f"{idle:g}", "--log-level", log_level, *options),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True, start_new_session=True,
            )
        while not listening(path):
            if popen.poll() is not None:
                raise ServerStartError(f"the per-user frame server exited with code {popen.returncode} before it was ready (see {log_path})")
            if time.monotonic() > deadline:
                popen.kill()
                raise ServerStartError(f"the per-user frame server did not start within {start_timeout:g} s (see {log_path})")
            time.sleep(0.01)
        _user_servers.append(popen)  # reaped by subprocess when it ends, if this process lives that long
    return endpoint


_user_servers: list[subprocess.Popen] = []


def user_server_path(log_level: str, options: Sequence[str]) -> str:
    """Where this user's server for this version and these options listens (a unix socket).

    Raises:
        ServerStartError: the folder is unsafe (see :func:`user_runtime_dir`), or the path is
            too long for a unix socket.
    """
    tag = hashlib.blake2b(repr((log_level, tuple(options))).encode(), digest_size=4).hexdigest()
    path = os.path.join(user_runtime_dir(), f"server-{__version__}-{tag}.sock")
    if len(path.encode()) > 100:
        raise ServerStartError(f"the per-user server's socket path is too long ({path}): set ASYNCFRAMES_RUNTIME_DIR to a shorter folder")
    return path


def listening(path: str) -> bool:
    """Whether a server listens on the unix socket ``path`` (a connection is accepted)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _lock(file: IO[str], deadline: float) -> None:
    """Hold an exclusive lock on ``file`` (released when it is closed), waiting until ``deadline``."""
    import fcntl

    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                raise ServerStartError(f"could not lock {file.name} to start the per-user frame server: {exc}") from exc
            time.sleep(0.01)


@atexit.register
def _stop_prestarted() -> None:
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is not None and spare.owner_pid == os.getpid():
        spare.stop()


def _read_first_line(stream: IO[bytes], out: "queue.Queue[str]") -> None:
    try:
        line = stream.readline()
    except (OSError, ValueError):
        return
    if line:
        out.put(line.decode(errors="replace").strip())
