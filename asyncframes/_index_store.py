"""Frame indexes kept on disk, so a new server opens a long video without demuxing it again.

A record is stored under a key made of the file's identity (device, inode, size and
modification time in nanoseconds), the stream, the container options and the PyAV and
FFmpeg versions (a demuxer upgrade may index differently): a file that changes gets a new
key, so a stale record is never used, it just ages out. A record is one file of plain
arrays (:func:`asyncframes._index.index_record`; never pickle, see :func:`write_arrays`),
written to a temporary file in the same folder and renamed into place, so a reader sees a whole
record or none, whatever other servers write at the same time. A record that does not
load or check (:func:`asyncframes._index.index_from_record`) is a miss, and is removed.
A record also keeps the stream's metadata (:class:`asyncframes._index.StreamFacts`), so a
reader of an indexed file is described without opening it, and whether the file's first
frame is gray once a reader had to find out (grayscale detection), so another server need
not decode it again; records without those entries are still valid, and simply do not know.

The folder (``$ASYNCFRAMES_INDEX_CACHE``, else ``$XDG_CACHE_HOME/asyncframes/index``,
else ``~/.cache/asyncframes/index``; ``asyncframes serve --index-cache DIR``, ``off`` to
turn it off) is made 0700 and kept under :data:`MAX_BYTES`: after each write, the least
recently used records (by modification time, which a hit renews) go. A folder that
cannot be written turns the store off, with one log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Optional

import attrs
import av
import msgpack
import numpy as np

from ._files import SourceIdentity
from ._index import FrameIndex, StreamFacts, index_from_record, index_record, record_facts, record_grayscale

log = logging.getLogger(__name__)

#: Total bytes of records kept; the least recently used go first beyond it.
MAX_BYTES = 256 * 1024 * 1024
#: Indexes of fewer frames are not worth a file (demuxing them takes well under a millisecond).
MIN_FRAMES = 64
#: What ``--index-cache`` and ``$ASYNCFRAMES_INDEX_CACHE`` take to turn the store off.
OFF = ("", "off", "none", "0")
#: A record's file name ends so; records of earlier versions (``.npz``) age out with the rest.
SUFFIX = ".idx"
_OLD_SUFFIXES = (".npz",)
#: The array kinds a record may hold: booleans, integers, floats and strings (never objects).
_KINDS = frozenset("biufU")


def write_arrays(out: "BinaryIO", arrays: dict[str, np.ndarray]) -> None:
    """Write named arrays as one msgpack map ``{"arrays": {name: [dtype, shape, bytes]}}``.

    One read and no parsing per array to load (an ``.npz``, a zip of ``.npy`` files with a
    header to parse per array, took longer to load than opening a small video in-process).
    """
    body = {name: [a.dtype.str, list(a.shape), np.ascontiguousarray(a).tobytes()] for name, a in arrays.items()}
    out.write(msgpack.packb({"arrays": body}, use_bin_type=True))


def read_arrays(path: "str | os.PathLike[str]") -> dict[str, np.ndarray]:
    """The named arrays :func:`write_arrays` wrote to the file ``path`` (see :func:`arrays_from`).

    Raises:
        OSError: the file cannot be read (FileNotFoundError: there is none).
        ValueError: it is not such a record.
    """
    with open(path, "rb") as f:
        return arrays_from(f.read())


def arrays_from(data: bytes) -> dict[str, np.ndarray]:
    """The named arrays (read-only views of ``data``) that :func:`write_arrays` wrote.

    Raises:
        ValueError: ``data`` is not such a record (malformed, or an array of a kind never written).
    """
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_map_len=64, max_array_len=64, max_ext_len=0)
        arrays = {}
        for name, (dtype, shape, raw) in body["arrays"].items():
            dt = np.dtype(dtype)
            if dt.kind not in _KINDS or not isinstance(raw, bytes) or not all(isinstance(n, int) for n in shape):
                raise ValueError(f"array {name!r} of {dtype} is not one a record holds")
            arrays[name] = np.frombuffer(raw, dtype=dt).reshape(shape)
        return arrays
    except ValueError:
        raise
    except Exception as exc:  # msgpack's and unpacking's many error types: not a record
        raise ValueError(f"not an index record ({type(exc).__name__}: {exc})") from exc


@attrs.frozen
class Stored:
    """What a record holds: the file's index, whether its first frame is gray (None: not
    known) and its stream's facts (None: not kept)."""

    index: FrameIndex
    grayscale: Optional[bool] = None
    facts: Optional[StreamFacts] = None


class IndexStore:
    """Records in one folder (see the module's rules); thread-safe."""

    def __init__(self, folder: "str | os.PathLike[str]", max_bytes: int = MAX_BYTES) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._broken = False

    @staticmethod
    def key(identity: SourceIdentity, stream: int, options: Optional[dict[str, str]] = None) -> Optional[str]:
        """The record name for one file's stream (None: not one plain file, nothing to key by)."""
        if len(identity) != 1 or identity[0].ino < 0:
            return None
        f = identity[0]
        parts = (f.dev, f.ino, f.size, f.mtime_ns, stream, sorted((options or {}).items()), av.__version__, av.library_versions.get("libavformat"))
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()

    def load(self, key: str) -> Optional[Stored]:
        """The record stored under ``key``, or None (none, or one that does not load: removed)."""
        path = self.folder / f"{key}{SUFFIX}"
        try:
            record = read_arrays(path)
            stored = Stored(index_from_record(record), record_grayscale(record), record_facts(record))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001  (truncated, corrupt, foreign: a miss, never trusted)
            log.info("index record %s is unusable (%s); indexing again", path, exc)
            _remove(path)
            return None
        _touch(path)  # recently used
        return stored

    def save(
        self, key: str, index: FrameIndex, grayscale: Optional[bool] = None, facts: Optional[StreamFacts] = None
    ) -> None:
        """Store ``index`` under ``key`` (atomically), with whether the first frame is gray and
        the stream's facts (None: not known), then keep the folder under its cap.
        Never raises: a store that cannot write turns itself off."""
        if self._broken or index.frame_count < MIN_FRAMES:
            return
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    write_arrays(out, index_record(index, grayscale, facts))
                os.replace(tmp, self.folder / f"{key}{SUFFIX}")
                _touch(self.folder / f"{key}{SUFFIX}")
            except BaseException:
                _remove(Path(tmp))
                raise
        except OSError as exc:
            self._broken = True
            log.info("cannot keep frame indexes in %s (%s): indexing every open", self.folder, exc)
            return
        self._prune()

    def _prune(self) -> None:
        with self._lock:
            try:
                stats = [(e.stat(), Path(e.path)) for e in os.scandir(self.folder) if e.name.endswith((SUFFIX, *_OLD_SUFFIXES))]
                records = [(st.st_mtime_ns, st.st_size, path) for st, path in stats]
            except OSError:
                return
            total = sum(size for _, size, _ in records)
            for _, size, path in sorted(records):
                if total <= self.max_bytes:
                    break
                _remove(path)
                total -= size


def _touch(path: Path) -> None:
    """Mark ``path`` as used now, to the nanosecond (the file system's own clock ticks coarsely:
    two records written or used within one tick would tie, and the wrong one could go)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def default_folder() -> Optional[Path]:
    """Where records go unless told otherwise (None: turned off by ``$ASYNCFRAMES_INDEX_CACHE``)."""
    env = os.environ.get("ASYNCFRAMES_INDEX_CACHE")
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncframes" / "index"


_store: Optional[IndexStore] = None
_configured = False


def configure(folder: "Optional[str | os.PathLike[str]]") -> None:
    """Use ``folder`` for this process's records (a value of :data:`OFF`: none; None: the default)."""
    global _store, _configured
    if folder is None:
        default = default_folder()
        _store = IndexStore(default) if default is not None else None
    else:
        _store = None if str(folder).strip().lower() in OFF else IndexStore(folder)
    _configured = True


def store() -> Optional[IndexStore]:
    """This process's store (None: turned off)."""
    if not _configured:
        configure(None)
    return _store
