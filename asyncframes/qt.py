"""Qt: frames delivered as signals, driven by the event loop, never blocking the GUI thread.

:class:`QtVideo` is a thin driver of :class:`asyncframes.AsyncVideo` (made with
``wait=False``: its private server starts without the GUI thread waiting): a
``QSocketNotifier`` watches each of the client's descriptors, and when one fires the
client takes in what arrived and the chunks go out as signals. There is no polling timer:
ZeroMQ's descriptors are edge-triggered, so the client is drained on every activation and
again after every call that sends. :class:`Scrubber` shows one frame at a time where the
newest request replaces any pending one (a slider dragged across a video).

Works with PySide6, PyQt6 and PyQt5 through qtpy (``pip install 'asyncframes-video[qt]'``);
importing :mod:`asyncframes` never imports Qt.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import numpy as np
from qtpy.QtCore import QObject, QSocketNotifier, QTimer, Signal

from . import _protocol
from ._client import AsyncVideo, FrameIdxs, VideoLike
from .errors import AsyncFramesError

__all__ = ["QtVideo", "Scrubber"]

# cattrs builds its (un)structuring code on first use: now, at import, not on the loop.
_protocol.warm_up()

#: While a server starts, how often to look whether it failed to (it sends nothing until ready).
_START_CHECK_MS = 250
#: QSocketNotifier's read type (scoped in Qt 6 bindings, not in PyQt5).
_READ = getattr(QSocketNotifier, "Type", QSocketNotifier).Read


class QtVideo(QObject):
    """Frames from background frame servers, as Qt signals.

    Takes the keyword arguments of :class:`asyncframes.AsyncVideo` (``endpoint``,
    ``window``, ...). Calls return at once; what they ask for arrives as signals:

    * ``ready()``: every server answered (a private one has started), once; requests made
      while a server is starting or reconnecting wait for it and then go out;
    * ``infoReady(object)``: the :class:`~asyncframes.VideoInfo` asked for by :meth:`request_info`;
    * ``chunkReady(list, object)``: frame indices and their ``(n, h, w, c)`` frames, in order
      (the frames are valid until the next chunk of the same request is taken: copy what you keep);
    * ``requestFinished()``: the request's last chunk was delivered;
    * ``failed(object)``: an :class:`~asyncframes.errors.AsyncFramesError` (the request, or
      the client, cannot go on).
    """

    ready = Signal()
    infoReady = Signal(object)
    chunkReady = Signal(list, object)
    requestFinished = Signal()
    failed = Signal(object)

    def __init__(self, endpoint: Any = None, parent: Optional[QObject] = None, **options: Any) -> None:
        super().__init__(parent)
        self._client = AsyncVideo(endpoint, wait=False, **options)
        self._notifiers: list[QSocketNotifier] = []
        self._watched: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self._watch()
        self._was_ready = False
        self._pending: Optional[tuple[Any, ...]] = None  # a request made before the server was ready
        self._infos: list[int] = []  # info requests sent, not answered yet
        self._early_infos: list[Any] = []  # asked for before the server was ready
        self._stream: Any = None
        self._starting = QTimer(self)  # only while the server starts: did it fail to?
        self._starting.timeout.connect(self._on_activity)
        self._starting.start(_START_CHECK_MS)
        QTimer.singleShot(0, self._on_activity)

    @property
    def client(self) -> AsyncVideo:
        """The client underneath (its blocking calls would block the GUI thread: avoid them)."""
        return self._client

    @property
    def is_ready(self) -> bool:
        """Whether every server has answered (now: False while reconnecting)."""
        return self._client.ready

    def load(self, video: VideoLike, frame_idxs: FrameIdxs = None, frames_per_chunk: int = 64) -> None:
        """Request frames; they arrive as ``chunkReady``. A new request replaces the one in flight
        (its chunks are never delivered). Before the server is ready, the request waits for it."""
        if not self._client.ready:  # starting, or reconnecting to a server that came back
            self._pending, self._stream = (video, frame_idxs, frames_per_chunk), None
            return
        self._guarded(self._start, video, frame_idxs, frames_per_chunk)

    def request_info(self, video: VideoLike) -> None:
        """Ask what ``video`` holds; it arrives as ``infoReady``."""
        if not self._client.ready:
            self._early_infos.append(video)
            return
        self._guarded(lambda: self._infos.append(self._client.request_info(video)))

    def cancel(self) -> None:
        """Abandon the current request (nothing more of it is delivered)."""
        self._pending, self._stream = None, None
        self._guarded(self._client.cancel)

    def _watch(self) -> bool:
        """A notifier on each of the client's descriptors; again when its sockets change (a
        connection replaced after its server went away has new descriptors, though the system
        may reuse the old numbers); whether they did (then drain again: what the new socket
        signalled before it was watched raised no notifier)."""
        watched = (tuple(self._client.fds()), self._client.sockets_generation())
        if watched == self._watched:
            return False
        self._unwatch()
        for fd in watched[0]:
            notifier = QSocketNotifier(fd, _READ, self)
            notifier.activated.connect(self._on_activity)
            self._notifiers.append(notifier)
        self._watched = watched
        return True

    def _unwatch(self) -> None:
        for notifier in self._notifiers:
            notifier.setEnabled(False)
            notifier.deleteLater()
        self._notifiers, self._watched = [], ((), ())

    def close(self) -> None:
        """Stop watching and close the client, in a background thread (with ``server="own"``,
        waiting for its server to exit would hold the GUI thread ~0.1 s)."""
        self._starting.stop()
        self._unwatch()
        threading.Thread(target=self._client.close, name="asyncframes-close", daemon=True).start()

    # -- driving ------------------------------------------------------------------------------

    def _start(self, video: VideoLike, frame_idxs: FrameIdxs, frames_per_chunk: int) -> None:
        self._client.load_by_chunk(video, frame_idxs, frames_per_chunk)
        self._stream = self._client.iteration_start()
        self._drain()

    def _guarded(self, call: Any, *args: Any) -> None:
        try:
            call(*args)
            self._drain()
        except AsyncFramesError as exc:
            self._stream = None
            self.failed.emit(exc)

    def _on_activity(self, *_: Any) -> None:
        self._guarded(lambda: None)

    def _drain(self) -> None:
        """Take in everything, deliver what is due; drained again after every send (edge-triggered)."""
        client = self._client
        client.process_events()
        while self._watch():
            client.process_events()
        if client.ready and (not self._was_ready or self._pending is not None or self._early_infos):
            if not self._was_ready:
                self._was_ready = True
                self._starting.stop()
                self.ready.emit()
            early, self._early_infos = self._early_infos, []
            self._infos += [client.request_info(video) for video in early]
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._start(*pending)
                return
        for rid in list(self._infos):
            if (info := client.info_reply(rid)) is not None:
                self._infos.remove(rid)
                self.infoReady.emit(info)
        while self._stream is not None:
            if client.iteration_over(self._stream):
                self._stream = None
                self.requestFinished.emit()
                break
            chunk = client.next_chunk(timeout=0)
            if chunk is None:
                break
            client.process_events()  # taking it sent credit
            self.chunkReady.emit(chunk.frame_idxs, chunk.frames)


class Scrubber(QObject):
    """One frame at a time, the newest request replacing any pending one: for a slider.

    ``show(i)`` asks for frame ``i`` of ``video``; ``frameReady(int, object)`` delivers it
    (a copy, yours to keep). Frames asked for and overtaken by a newer ``show`` before they
    arrive are never delivered, so a dragged slider never waits for the frames it passed.

    Args:
        video: what to show.
        source: a :class:`QtVideo` to use (its other requests are replaced by ours); None
            makes one with ``options``.
    """

    frameReady = Signal(int, object)
    failed = Signal(object)

    def __init__(self, video: VideoLike, source: Optional[QtVideo] = None, parent: Optional[QObject] = None,
                 **options: Any) -> None:
        super().__init__(parent)
        self.video = video
        self.source = source if source is not None else QtVideo(parent=self, **options)
        self.source.chunkReady.connect(self._on_chunk)
        self.source.failed.connect(self.failed)
        self.wanted: Optional[int] = None

    def show(self, frame_idx: int) -> None:
        """Ask for frame ``frame_idx``; any frame asked for before is no longer delivered."""
        self.wanted = int(frame_idx)
        self.source.load(self.video, [self.wanted], frames_per_chunk=1)

    def _on_chunk(self, frame_idxs: list, frames: np.ndarray) -> None:
        if frame_idxs and frame_idxs[0] == self.wanted:
            self.frameReady.emit(self.wanted, np.array(frames[0]))

    def close(self) -> None:
        self.source.close()
