"""A decoder worker process: decodes its share of a chunk straight into the server's shared slot.

Started by :class:`asyncframes._procpool.ProcessWorkers` (``python -c ...main()`` with
the inherited descriptors as arguments): a fresh interpreter that inherits nothing but
one end of a private ``SOCK_SEQPACKET`` socket pair, the small shared control word its
server writes a cancel into, and stderr. Nothing else crosses: no sockets of the
server's clients, no threads, no locks.

Each job names the file by the path the server's opener already resolved (confined
under its root, if any) and opened, with the opener's FFmpeg options and the identity
(device, inode, size, mtime) the server saw; the worker opens that path with the same
reader code (:class:`asyncframes._reader.VideoReader`; the index comes from the on-disk
store the server's reader filled, :mod:`asyncframes._index_store`) and refuses to decode
when what it opened is not that same file. The slot's memfd arrives over the socket
(``SCM_RIGHTS``) the first time a worker sees it and stays mapped until the server says
the slot is gone. Frames are written at their places in the slot; the server sends the
chunk when every share is done.

The worker exits when its socket reaches end of file (the server closed it, or died), and
the kernel kills it if the server dies first (``PR_SET_PDEATHSIG``). It ignores SIGINT:
Ctrl-C in a terminal reaches the whole process group, and the server stops its workers.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import socket
import sys
from collections import OrderedDict
from typing import Any, Optional

import numpy as np

from . import _procwire as procwire

#: Largest message either way (a job holds a chunk's indices and a request cache's wish list).
MAX_MESSAGE = 4 << 20
#: Readers a worker keeps open (least recently used are closed).
MAX_READERS = 8

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent exits (Linux); exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the socket's end of file still ends the worker
    if os.getppid() != parent:
        os._exit(0)


def main(argv: Optional[list[str]] = None) -> None:
    """``argv``: socket fd, control memfd fd, the server's pid, the index store folder ('' for default)."""
    args = sys.argv[1:] if argv is None else argv
    sock_fd, ctl_fd, parent = int(args[0]), int(args[1]), int(args[2])
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="asyncframes worker %(process)d: %(levelname)s %(message)s")
    if len(args) > 3 and args[3]:
        from . import _index_store as index_store

        index_store.configure(args[3])
    ctl = np.frombuffer(mmap.mmap(ctl_fd, 8), dtype=np.int64)
    os.close(ctl_fd)
    sock = socket.socket(fileno=sock_fd)
    Worker(sock, ctl).run()


class Worker:
    def __init__(self, sock: socket.socket, ctl: np.ndarray) -> None:
        self.sock = sock
        self.ctl = ctl
        self.readers: "OrderedDict[tuple[str, int], Any]" = OrderedDict()
        self.maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}
        self.caches: dict[int, Any] = {}

    def run(self) -> None:
        sock = self.sock
        sock.sendall(procwire.pack_answer("ready", os.getpid()))
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
            except (ConnectionError, OSError):
                break
            if not data:
                break  # the server closed its end, or is gone
            job = procwire.unpack_job(data)
            try:
                reply: tuple = self.job(job, fds)
            except BaseException as exc:  # noqa: BLE001  (every failure is the request's, reported)
                reply = ("error", job["job"], exc)
            try:
                sock.sendall(procwire.pack_answer(*reply))
            except (ConnectionError, OSError):
                break
        self.close()

    def job(self, job: dict, fds: list[int]) -> tuple:
        from ._reader import FrameCache, ReadInterrupted

        for serial in job["forget_buffers"]:
            self._unmap(serial)
        for token in job["forget_caches"]:
            self.caches.pop(token, None)
        if "serial" not in job:
            return ("done", job["job"])  # only tidying
        if fds:
            fd = fds[0]
            try:
                size = os.fstat(fd).st_size
                mapped = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._unmap(job["serial"])
            self.maps[job["serial"]] = (mapped, np.frombuffer(mapped, dtype=np.uint8))
        shape = tuple(job["shape"])
        out = self.maps[job["serial"]][1][: int(np.prod(shape))].reshape(shape)
        reader = self.reader(job)
        cache = None
        if job["cache"] is not None:
            token, max_bytes, finish_gops, later, now = job["cache"]
            cache = self.caches.get(token)
            if cache is None:
                cache = self.caches[token] = FrameCache(max_bytes, finish_gops=finish_gops)
            elif cache.max_bytes != max_bytes:
                cache.resize(max_bytes)
            cache.want(later=later, now=now)
        number = job["job"]
        ctl = self.ctl
        try:
            reader.read(
                job["idxs"], grayscale=job["grayscale"], out=out, positions=job["positions"], cache=cache,
                interrupt=lambda: int(ctl[0]) == number, video=job["video"],
            )
        except ReadInterrupted:
            return ("interrupted", number)
        return ("done", number)

    def reader(self, job: dict) -> Any:
        """This worker's reader of the job's file, opened if need be; the very file the server opened."""
        from ._reader import VideoReader, changed_error

        key = (job["path"], job["stream"])
        reader = self.readers.get(key)
        if reader is not None and reader.signature != job["identity"]:
            self.readers.pop(key).close()  # the server reopened a changed file: so do we
            reader = None
        if reader is None:
            reader = VideoReader(job["path"], stream=job["stream"], thread_type=job["thread_type"], container_options=job["options"])
            if reader.signature != job["identity"]:
                reader.close()
                raise changed_error(job["path"])
            self.readers[key] = reader
            while len(self.readers) > MAX_READERS:
                self.readers.popitem(last=False)[1].close()
        self.readers.move_to_end(key)
        if job["thread_type"] is None and reader.thread_type is not None:
            reader.thread_type = None  # the server's reader met damaged data: decode as it does
            reader.close()
        return reader

    def _unmap(self, serial: int) -> None:
        old = self.maps.pop(serial, None)
        if old is not None:
            mapped, _array = old
            del _array
            try:
                mapped.close()
            except BufferError:
                pass

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
        self.sock.close()


if __name__ == "__main__":
    main()
