"""Starting and watching a private frame server process.

The server runs in a fresh interpreter (``python -m asyncframes serve``): a
spawn, never a fork, so it is safe from apps that run threads (Qt), and unlike
``multiprocessing``'s spawn it does not re-import the caller's ``__main__``.
Its stdin is a lifeline pipe: when this process dies, the pipe closes and the
server exits by itself. It binds a private endpoint (ipc in a 0700 temp dir)
and reports it on stdout when ready. Set ``ASYNCFRAMES_PYTHON`` to the
interpreter to use where ``sys.executable`` is not a plain Python (embedded or
frozen apps).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from typing import IO, Optional, Sequence

from .errors import ServerStartError
from .transport import private_endpoint, remove_private_dir

#: Printed (with the endpoints) on stdout by ``asyncframes serve`` once it accepts connections.
READY_LINE = "asyncframes server ready on"


class ServerProcess:
    """A private frame server owned by one client."""

    def __init__(self, start_timeout: float = 30.0, log_level: str = "WARNING", options: Sequence[str] = ()) -> None:
        """``options``: more ``asyncframes serve`` options (e.g. ``--workers 2``)."""
        bind, self._private_dir = private_endpoint()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            self.popen = subprocess.Popen(
                [os.environ.get("ASYNCFRAMES_PYTHON") or sys.executable, "-m", "asyncframes", "serve", "--bind", bind, "--lifeline", "--allow-stop", "--unconfined", "--log-level", log_level, *options],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,  # the server's log lines go to our stderr
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            remove_private_dir(self._private_dir)
            raise ServerStartError(f"could not start the frame server: {exc}") from exc
        self.endpoint = self._wait_ready(start_timeout)

    def _wait_ready(self, timeout: float) -> str:
        lines: "queue.Queue[str]" = queue.Queue()
        stdout = self.popen.stdout
        assert stdout is not None
        threading.Thread(target=_read_first_line, args=(stdout, lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                if self.popen.poll() is not None:
                    self.kill()
                    raise ServerStartError(
                        f"the frame server exited with code {self.popen.returncode} before it was ready"
                    ) from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServerStartError(f"the frame server did not start within {timeout:g} s") from None
                continue
            if line.startswith(READY_LINE):
                return line[len(READY_LINE) :].split()[0]
            self.kill()
            raise ServerStartError(f"the frame server said {line!r} instead of getting ready")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> Optional[int]:
        """None while running, else the exit code (negative: killed by that signal)."""
        return self.popen.poll()

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

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._cleanup()

    def _cleanup(self) -> None:
        for pipe in (self.popen.stdin, self.popen.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        remove_private_dir(self._private_dir)
        self._private_dir = None


def _read_first_line(stream: IO[bytes], out: "queue.Queue[str]") -> None:
    try:
        line = stream.readline()
    except (OSError, ValueError):
        return
    if line:
        out.put(line.decode(errors="replace").strip())
