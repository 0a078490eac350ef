"""Opening the videos requests name: the one place that decides which file a reader reads.

Everything about opening lives here: confinement under the server's root and the
demuxers a confined server allows (the rules are :mod:`asyncframes._files`'), a file
checked again once opened, an LRU of open readers, a file that changed on disk closed
and reopened, and decoder workers' own readers of a file, which share its index.
It opens files and stats them (through :mod:`asyncframes._reader` and
:mod:`asyncframes._files`), and has readers write their index records, and nothing else:
no sockets, no clock, no threads of its own.

Threads: :meth:`VideoOpener.open`, :meth:`~VideoOpener.opened`, :meth:`~VideoOpener.forget`
and :meth:`~VideoOpener.close` belong to one thread (the server's);
:meth:`~VideoOpener.worker_reader` is called by decoder worker ``worker`` only, while that
thread waits for the workers (so the open readers do not change under them).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from . import _files as files
from ._images import ImageListReader
from ._reader import VideoReader
from ._video import Video
from .errors import AsyncFramesError, ServerError

#: What a reader is kept under: the file as the request names it, the stream, the image files.
ReaderKey = tuple[str, int, tuple[str, ...]]


def reader_key(video: Video) -> ReaderKey:
    """The key ``video``'s reader is kept under (grayscale does not change what is opened)."""
    return (video.filename, video.stream, video.files)


class VideoOpener:
    """Opens the videos requests name: confined under the root (if any), allowed demuxers only,
    an LRU of open readers, a file that changed on disk reopened."""

    def __init__(self, root: Optional[str] = None, max_open_files: int = 8, write_records_later: bool = False) -> None:
        """
        Args:
            root: requests name files under this folder (see :func:`files.confine`); None
                opens any path this process can read, with FFmpeg's default options.
            max_open_files: readers kept open by the opening thread, and by each worker;
                the least recently used is closed beyond it.
            write_records_later: what opening (or grayscale detection) learns that a file's
                index record lacks is written by :meth:`write_records` (or when its reader
                is closed), not while opening: a server answers first, and writes when idle.
        """
        if max_open_files < 1:
            raise ValueError("max_open_files must be at least 1")
        self.root = root
        self.max_open_files = max_open_files
        #: The FFmpeg options every reader is opened with.
        self.container_options = files.container_options(confined=root is not None)
        self.write_records_later = write_records_later
        self._readers: "OrderedDict[ReaderKey, VideoReader]" = OrderedDict()
        #: Per worker, its own readers (each a sibling of the reader in ``_readers``).
        self._worker_readers: dict[int, "OrderedDict[ReaderKey, VideoReader]"] = {}

    def resolve(self, filename: str) -> str:
        """The path to open for a requested filename: under ``root`` when there is one.

        Relative names resolve under the root; absolute names must lie inside it; ``..``
        and symlinks are resolved first, so neither can lead out; every file of an image
        sequence must lie inside too; URLs are refused (see :func:`files.confine`).

        Raises:
            VideoAccessError: the name leads outside the root, or is a URL.
        """
        if self.root is None:
            return filename
        return files.confine(self.root, filename)

    def open(self, video: Video) -> VideoReader:
        """The opening thread's reader of ``video`` (key: ``(video.filename, video.stream)``),
        opened if needed; a stale one (the file changed on disk) is closed and reopened.

        A confined opener checks the name again once the file is open, and that the file did
        not change while being opened: a file added to an image sequence during the open
        cannot slip past the check.

        Returns:
            The reader (owned by this opener: do not close it).

        Raises:
            VideoAccessError: the name leads outside the root.
            VideoChangedError: the file changed while being opened.
            VideoError: the file could not be opened as a video.
            ServerError: the process ran out of file descriptors or memory.
        """
        key = reader_key(video)
        reader = self._readers.get(key)
        if reader is not None and reader.is_stale():
            self._drop(key)
            reader = None
        if reader is None:
            images = files.image_files(video.filename, video.files, self.root)
            if images is not None:
                reader: "VideoReader | ImageListReader" = ImageListReader(video.filename, images, stream=video.stream)
            else:
                reader = VideoReader(
                    self.resolve(video.filename),
                    stream=video.stream,
                    container_options=self.container_options,
                    write_record_later=self.write_records_later,
                )
            if self.root is not None:
                try:
                    # What was opened is still there, unchanged, and passes the check.
                    if images is None:
                        self.resolve(video.filename)
                    else:
                        files.image_files(video.filename, video.files, self.root)
                    reader.check_unchanged("being opened")
                except AsyncFramesError:
                    reader.close()
                    raise
            self._readers[key] = reader
            while len(self._readers) > self.max_open_files:
                self._drop(next(iter(self._readers)))
        self._readers.move_to_end(key)
        return reader

    def opened(self, video: Video) -> Optional[VideoReader]:
        """The reader of ``video`` if it is open and its file unchanged; never opens one
        (for reading around a request while idle)."""
        reader = self._readers.get(reader_key(video))
        if reader is None or reader.is_stale():
            return None
        return reader

    def worker_reader(self, worker: int, video: Video) -> VideoReader:
        """Worker ``worker``'s own reader of the file :meth:`open` has open for ``video``,
        sharing its index (nothing demuxed twice). Each worker keeps its own LRU of
        ``max_open_files`` readers.

        Returns:
            The worker's reader (owned by this opener).

        Raises:
            VideoChangedError: the file changed since it was indexed.
            ServerError: ``video`` is not open (call :meth:`open` first, in the opening thread).
            VideoError: the file could not be opened again.
        """
        key = reader_key(video)
        main = self._readers.get(key)
        if main is None:
            raise ServerError(f"{video.filename}: a decoder worker asked for a video that is not open")
        readers = self._worker_readers.setdefault(worker, OrderedDict())
        reader = readers.get(key)  # a sibling of ``main``: readers go with their main (see _drop)
        if reader is None:
            reader = main.sibling()
            readers[key] = reader
            while len(readers) > self.max_open_files:
                readers.popitem(last=False)[1].close()
        readers.move_to_end(key)
        return reader

    def records_behind(self) -> bool:
        """Whether an open reader learnt something its file's index record lacks."""
        return any(reader.record_behind for reader in self._readers.values())

    def write_records(self) -> None:
        """Write what the open readers learnt that their files' index records lack (see
        ``write_records_later``); cheap when there is nothing to write."""
        for reader in self._readers.values():
            reader.write_record()

    def forget(self, video: Video) -> None:
        """Close and drop the readers of ``video`` (after an internal error, so the next
        request opens it afresh)."""
        self._drop(reader_key(video))

    def close(self) -> None:
        """Close every reader (the workers must be done)."""
        for key in list(self._readers):
            self._drop(key)
        for readers in self._worker_readers.values():
            for reader in readers.values():
                reader.close()
            readers.clear()

    def __len__(self) -> int:
        """Readers open in the opening thread."""
        return len(self._readers)

    def _drop(self, key: ReaderKey) -> None:
        """Close the reader kept under ``key`` and the workers' siblings of it (they share its index)."""
        reader = self._readers.pop(key, None)
        if reader is not None:
            reader.write_record()
            reader.close()
        for readers in self._worker_readers.values():
            old = readers.pop(key, None)
            if old is not None:
                old.close()

