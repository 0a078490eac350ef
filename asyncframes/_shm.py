"""Shared-memory chunk buffers between a server and a client on the same machine.

The server decodes a chunk straight into an anonymous shared memory file
(``memfd``) and sends only its description; the client maps the same memory
and hands the caller an array over it, so no pixel is copied after decoding.
The client reaches the server's memfd through ``/proc/<pid>/fd/<fd>``, which
the kernel allows only to the same user (or root); a probe buffer carrying a
random token, checked at the handshake, tells whether that works (it does not
across machines, containers or users, and those clients get frames inline).

Nothing has a name, so nothing can leak: the memory is freed when the last
process that maps it exits or lets go, however either side ends.

A slot is reused only after the client says it is free, and the client says so
only when the last array over it is gone (:class:`Lease`), so a chunk the
caller still holds is never overwritten. Which slots exist, are lent or free is
the server core's bookkeeping (:class:`asyncframes._server_state.SlotBook`); the
server's driver makes and closes the :class:`SharedBuffer` each slot names.
"""

from __future__ import annotations

import hmac
import itertools
import math
import mmap
import os
import sys
import weakref
from collections import deque
from typing import Any

import numpy as np

#: memfd needs Linux (os.memfd_create) and /proc.
AVAILABLE = hasattr(os, "memfd_create") and sys.platform.startswith("linux")

_TOKEN_BYTES = 16


class SharedBuffer:
    """A memfd of ``size`` bytes mapped into this process."""

    _serials = itertools.count(1)

    def __init__(self, size: int, name: str = "asyncframes") -> None:
        #: Unique in this process (decoder worker processes keep their mappings by it).
        self.serial = next(SharedBuffer._serials)
        self.size = max(int(size), 1)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)  # type: ignore[attr-defined]
        try:
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self.array = np.frombuffer(self.map, dtype=np.uint8)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The start of the buffer as a uint8 array of ``shape``."""
        return self.array[: int(np.prod(shape))].reshape(shape)

    def close(self) -> None:
        """Let go of this process's hold; the memory lives on while the client maps it."""
        if self.fd >= 0:
            self.array = np.empty(0, np.uint8)
            try:
                self.map.close()
            except BufferError:
                pass  # an array over it is still alive; the mapping goes with it
            os.close(self.fd)
            self.fd = -1


class Probe:
    """The server's proof of reach: a small shared buffer holding a random token."""

    def __init__(self) -> None:
        self.token = os.urandom(_TOKEN_BYTES)  # secrets.token_bytes is os.urandom
        self.buffer = SharedBuffer(_TOKEN_BYTES, "asyncframes-probe")
        self.buffer.array[:] = np.frombuffer(self.token, np.uint8)

    def close(self) -> None:
        self.buffer.close()


def attach(pid: int, fd: int, size: int) -> mmap.mmap:
    """Map another process's memfd; raises OSError or ValueError when it cannot be reached."""
    path = f"/proc/{pid}/fd/{fd}"
    # Look before opening: the pid may be another machine's, naming some unrelated local file.
    if not os.readlink(path).startswith("/memfd:asyncframes"):
        raise ValueError(f"{path} is not an asyncframes shared buffer")
    ours = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(ours).st_size != size:
            raise ValueError("shared buffer has an unexpected size")
        return mmap.mmap(ours, size)
    finally:
        os.close(ours)


#: This process's mappings of servers' slots, by (server pid, memfd inode), while some
#: connection (or an array) still uses one: a server hands a slot on from one client to the
#: next (see ``Spares`` in the server core), and a client of the same process then reuses the
#: mapping, whose pages are already in its page tables (mapping anew costs ~0.08 ms per MB).
_MAPPED: "weakref.WeakValueDictionary[tuple[int, int], np.ndarray]" = weakref.WeakValueDictionary()


def mapped(pid: int, fd: int, size: int) -> np.ndarray:
    """Server ``pid``'s memfd ``fd`` of ``size`` bytes as a uint8 array: this process's
    mapping of it if there is one, else a new one (:func:`attach`)."""
    key = (pid, os.stat(f"/proc/{pid}/fd/{fd}").st_ino)  # the memfd itself, whatever its fd number
    base = _MAPPED.get(key)
    if base is None or base.nbytes != size:
        base = np.frombuffer(attach(pid, fd, size), dtype=np.uint8)
        _MAPPED[key] = base
    return base


def can_reach(pid: int, fd: int, token: bytes) -> bool:
    """Whether the probe of the server ``pid`` is reachable from here and holds ``token``."""
    if not AVAILABLE or len(token) != _TOKEN_BYTES:
        return False
    try:
        mapped = attach(pid, fd, _TOKEN_BYTES)
    except (OSError, ValueError):
        return False
    try:
        return hmac.compare_digest(bytes(mapped[:_TOKEN_BYTES]), token)
    finally:
        mapped.close()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, which holds no memory any more, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


class Lease:
    """One chunk's frames in a mapped slot; when the last array over it dies, the slot is free.

    Arrays made from a lease (``np.asarray(lease)``) keep it alive through their
    ``base``, as do all views of them.
    """

    def __init__(self, base: np.ndarray, address: int, shape: tuple[int, ...], dtype: str, slot: int, freed: "deque[int]") -> None:
        self._base = base  # keeps the mapping alive (``address`` is its first byte)
        self._slot = slot
        self._freed = freed
        self.__array_interface__: dict[str, Any] = {
            "data": (address, False),
            "shape": tuple(shape),
            "typestr": dtype,
            "version": 3,
        }

    def __del__(self) -> None:
        # May run in any thread (garbage collection): only a deque append, which is atomic.
        self._freed.append(self._slot)


class ClientSlots:
    """The client's side of one server's slots: mappings, and slots freed since last told."""

    def __init__(self) -> None:
        #: Per slot, its mapping and the mapping's address.
        self._maps: dict[int, tuple[np.ndarray, int]] = {}
        self.freed: deque[int] = deque()

    def array(self, pid: int, fd: int, slot: int, size: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """An array over slot ``slot`` of the server ``pid``, mapping it the first time."""
        found = self._maps.get(slot)
        if found is None or found[0].nbytes != size:
            base = mapped(pid, fd, size)
            found = self._maps[slot] = (base, base.ctypes.data)
        base, address = found
        need = math.prod(shape) * np.dtype(dtype).itemsize
        if need > base.nbytes:
            raise ValueError(f"chunk of {need} bytes does not fit slot {slot} of {base.nbytes} bytes")
        return np.asarray(Lease(base, address, shape, dtype, slot, self.freed))

    def forget(self, slots: "list[int]") -> None:
        """The server retired these slots: drop our mappings (arrays still using one keep it)."""
        for slot in slots:
            self._maps.pop(slot, None)

    def clear(self) -> None:
        self._maps.clear()
        self.freed.clear()
