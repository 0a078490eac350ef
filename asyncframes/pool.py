"""Decoder workers: one chunk decoded by several threads, split by GOP.

Each worker thread keeps its own open reader per file (sharing the file's
frame index, so nothing is demuxed twice). A chunk's frames are grouped by the
keyframe they decode from, and GOP *g* always goes to worker *g mod n*, so in
a sequential stream a worker that had the end of a GOP in one chunk carries on
with it in the next without seeking. PyAV releases the GIL while decoding and
converting, so the threads run in parallel. With one worker, or a chunk within
one GOP, the server's own reader does the work as before.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .reader import FrameCache, VideoReader, changed_error


def default_workers() -> int:
    """One worker per two CPUs: each decoder already runs frame threads of its own."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


class DecoderPool:
    """``workers`` decoder threads; :meth:`read` fills one chunk using all of them."""

    def __init__(self, workers: int, max_open_files: int = 8) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.max_open_files = max_open_files
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="asyncframes-decoder") if workers > 1 else None
        self._readers: list["OrderedDict[Any, VideoReader]"] = [OrderedDict() for _ in range(workers)]

    def read(
        self,
        main: VideoReader,
        key: Any,
        idxs: Sequence[int],
        grayscale: bool,
        out: np.ndarray,
        cache: Optional[FrameCache] = None,
        interrupt: Optional[Callable[[], bool]] = None,
    ) -> None:
        """Frames ``idxs`` of ``main``'s file into ``out``; ``key`` names the file for the workers' readers.

        ``interrupt`` (asked between frames, in this thread only) is honoured when one reader does the work.
        """
        shares = self._split(main, idxs)
        if self._executor is None or len(shares) < 2:
            main.read(idxs, grayscale=grayscale, out=out, cache=cache, interrupt=interrupt)
            return
        futures = [
            self._executor.submit(self._read_share, worker, main, key, [idxs[p] for p in share], share, grayscale, out, cache)
            for worker, share in shares.items()
        ]
        errors = [f.exception() for f in futures]  # wait for every share: none may still write into out
        for error in errors:
            if error is not None:
                raise error

    def _split(self, main: VideoReader, idxs: Sequence[int]) -> dict[int, list[int]]:
        """Positions in ``idxs`` per worker, by the GOP each frame decodes from."""
        index = main.index
        if self.workers == 1 or index.sequential or len(idxs) < 2:
            return {0: list(range(len(idxs)))}
        shares: dict[int, list[int]] = defaultdict(list)
        for pos, i in enumerate(idxs):
            gop = bisect.bisect_left(index.seek_pts, index.keyframe_for(i))
            shares[gop % self.workers].append(pos)
        return shares

    def _read_share(
        self,
        worker: int,
        main: VideoReader,
        key: Any,
        idxs: list[int],
        positions: list[int],
        grayscale: bool,
        out: np.ndarray,
        cache: Optional[FrameCache],
    ) -> None:
        reader = self._reader(worker, main, key)
        reader.read(idxs, grayscale=grayscale, out=out, cache=cache, positions=positions)

    def _reader(self, worker: int, main: VideoReader, key: Any) -> VideoReader:
        readers = self._readers[worker]
        reader = readers.get(key)
        if reader is not None and (reader.signature != main.signature or reader.index is not main.index):
            reader.close()
            del readers[key]
            reader = None
        if reader is None:
            # A worker opening a changed file would read it under main's index. Only ask: main
            # belongs to the server's thread (and other workers may share it), so it is never
            # closed from here.
            if main.is_stale():
                raise changed_error(main.filename)
            reader = VideoReader(
                main.filename,
                stream=main.stream_index,
                thread_type=main.thread_type,
                container_options=main.container_options,
                index=main.index,
            )
            if reader.signature != main.signature:
                # The file changed since ``main`` indexed it: this reader sees the new file,
                # and its frames must not be served under the old file's index.
                reader.close()
                raise changed_error(main.filename)
            readers[key] = reader
            while len(readers) > self.max_open_files:
                readers.popitem(last=False)[1].close()
        readers.move_to_end(key)
        return reader

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for readers in self._readers:
            for reader in readers.values():
                reader.close()
            readers.clear()
