"""Memory for frames a server keeps, written ahead of need or written over.

Fresh memory costs a page fault per 4 KiB page on first touch: ~0.7 ms per MB written for
the first time on the VMs we measure on (a 640x480 RGB frame: 0.65 ms, as long as decoding
it), against ~0.03 ms per MB for memory written before. A cache that copies each new frame
into fresh memory pays that on the way of every frame it keeps. :class:`FrameArena` holds
the frames of one shape in one mapping, where a slot let go of is written over by the next
frame (a request's frame cache); :class:`Warmer` writes memory ahead of need on a thread of
its own, while the server waits or sends (the recent-frames cache's spare frames).

Transparent huge pages were tried (``MADV_HUGEPAGE``, one fault per 2 MiB) and dropped: with
the kernel's ``defrag=madvise`` each huge-page fault compacted memory first, 5-10 ms each
(3-5 ms per MB), five times the cost of 4 KiB pages.
"""

from __future__ import annotations

import mmap
import sys
import threading
from typing import Callable, Optional

import numpy as np

#: Slots of frames of a page or more start on a cache line (smaller ones are packed).
ALIGN = 64


class FrameArena:
    """Up to ``capacity`` arrays of ``shape`` and ``dtype`` in one mapping, made on first use.

    A free slot is *warm* once written (taking it costs no page faults) until
    :meth:`release` gives its memory back. The arrays are views of the mapping: it stays
    mapped while any of them lives, so dropping the arena never invalidates one. Thread-safe
    (decoder workers share a request's frame cache).
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        #: Bytes from one slot's start to the next.
        self.stride = -(-self.nbytes // ALIGN) * ALIGN if self.nbytes >= mmap.PAGESIZE else max(self.nbytes, 1)
        self.capacity = capacity
        self._map = _anonymous(self.stride * capacity)
        self._buffer = np.frombuffer(self._map, np.uint8)
        self._lock = threading.Lock()
        self._views: dict[int, np.ndarray] = {}
        self._warm: list[int] = []  # free slots written before
        self._cold: list[int] = []  # free slots whose memory was given back
        self._top = 0  # slots at and after this were never used
        #: Slots handed out and not taken back.
        self.used = 0

    @property
    def resident_bytes(self) -> int:
        """Bytes of slots in use or warm (what this arena holds of the machine's memory)."""
        return (self.used + len(self._warm)) * self.stride

    def take(self) -> Optional[tuple[int, np.ndarray]]:
        """A free slot and its array, warm ones first; None when all ``capacity`` are in use."""
        with self._lock:
            slot = self._pop_free(warm=True)
            if slot is None:
                return None
            self.used += 1
            return slot, self._view(slot)

    def take_warm(self) -> Optional[tuple[int, np.ndarray]]:
        """A warm free slot and its array, or None."""
        with self._lock:
            if not self._warm:
                return None
            slot = self._warm.pop()
            self.used += 1
            return slot, self._view(slot)

    def give_back(self, slot: int) -> None:
        """``slot`` is free again (its memory kept: the next :meth:`take` writes over it)."""
        with self._lock:
            self.used -= 1
            self._warm.append(slot)

    def release(self) -> int:
        """Give the memory of one warm free slot back to the system; the bytes that no longer
        count as resident (0 when no slot is warm and free)."""
        with self._lock:
            if not self._warm:
                return 0
            slot = self._warm.pop()
            self._cold.append(slot)
        start = slot * self.stride
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # only whole pages inside the slot
        last = (start + self.stride) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
        return self.stride

    def _pop_free(self, warm: bool) -> Optional[int]:
        if warm and self._warm:
            return self._warm.pop()
        if self._cold:
            return self._cold.pop()
        if self._top < self.capacity:
            self._top += 1
            return self._top - 1
        return None

    def _view(self, slot: int) -> np.ndarray:
        view = self._views.get(slot)
        if view is None:
            start = slot * self.stride
            view = self._views[slot] = self._buffer[start : start + self.nbytes].view(self.dtype).reshape(self.shape)
        return view


class Warmer:
    """A thread that writes memory ahead of need: it calls each ``step`` it is asked to run
    (:meth:`ask`) until the step says there is nothing more to write (returns False), and
    stops at :meth:`close`. A step that fails (the system out of memory) only leaves memory
    unwritten: using it then costs what it did without a warmer.
    """

    def __init__(self) -> None:
        self._steps: list[Callable[[], bool]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="asyncframes-warmer", daemon=True)
        self._thread.start()

    def ask(self, step: Callable[[], bool]) -> None:
        """Run ``step`` until it returns False (once queued, asking again changes nothing)."""
        with self._wake:
            if step not in self._steps:
                self._steps.append(step)
            self._wake.notify_all()

    def wait_done(self, timeout: float) -> bool:
        """Wait until every step asked for is done; False if ``timeout`` seconds passed first."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._steps or self._closed, timeout)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._steps:
                    self._wake.wait()
                if self._closed:
                    return
                step = self._steps[0]
            try:
                more = step()
            except Exception:  # e.g. MemoryError: what is left stays unwritten
                more = False
            if not more:
                with self._wake:
                    if step in self._steps:
                        self._steps.remove(step)
                    self._wake.notify_all()


def _anonymous(size: int) -> mmap.mmap:
    """Private anonymous memory of ``size`` bytes, zero-filled on first touch."""
    size = max(size, 1)
    if sys.platform == "win32":
        return mmap.mmap(-1, size)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
