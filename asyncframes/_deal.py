"""How a request is dealt over several servers, and when it is dealt again: every rule of it lives here.

Pure: numpy and attrs only, no clock (the caller passes ``now``), no sockets.

* **Owners.** A request of ``idxs`` is cut into chunks of ``frames_per_chunk``; chunk *k*
  comes from server ``owners[k]``. Servers of equal pace get chunk *k* from server
  *k mod n*; otherwise each server's share is in proportion to its pace, spread evenly
  through the request (:func:`owners`), so the caller, who takes chunks in order, finds
  every server's next chunk due about when that server can have made it.
* **Pace.** A :class:`Pace` per server measures how fast it delivers: for each chunk, the
  time from when the server could start it (the request or the credit that allowed it
  reached the server, and its previous chunk was done) to its arrival; frames per second
  of that busy time over its last :data:`SAMPLES` chunks. It covers whatever slows a
  server down: a slower machine, other clients, a busy disk, a paused process.
* **Dealing again.** While a request is delivered, :func:`redeal_weights` says when the
  shares left are so out of balance with the servers' paces that the slowest would hold
  the caller up (its share would finish :data:`REDEAL_RATIO` times later than a balanced
  deal would): the frames not yet taken are then dealt again by pace. The chunks the
  servers had made ahead are lost, at most a window per server; hence the bar, and the
  need for fresh measurements (:data:`MIN_SAMPLES` per server) before each new deal.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping, Optional, Sequence, Union

import attrs
import numpy as np

#: Chunks a server's pace is measured over (the most recent ones).
SAMPLES = 16
#: Chunks each server must have delivered since the last deal before the request is dealt again.
MIN_SAMPLES = 2
#: Deal again when the shares left would take this many times longer than a deal by pace.
REDEAL_RATIO = 1.5
#: ... and only while at least this many chunks per server are left (else it cannot pay off).
MIN_CHUNKS_LEFT_PER_SERVER = 4


def owners(chunks: int, weights: Sequence[float]) -> np.ndarray:
    """Which server each of ``chunks`` chunks comes from, in proportion to ``weights``.

    Server *j*'s *m*-th chunk is placed at its virtual time ``(m + 1) / weights[j]`` and
    the chunks are taken in that order (ties: the lower server first), so each server's
    chunks are spread evenly through the request. Equal weights give chunk *k* to server
    *k mod n*.

    Args:
        chunks: how many chunks the request has.
        weights: one positive weight per server (e.g. its pace, frames per second).

    Returns:
        An int64 array of ``chunks`` server numbers (positions in ``weights``).

    Raises:
        ValueError: no weights, or one that is not a positive finite number.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive finite numbers, one per server, got {list(weights)!r}")
    n = len(w)
    if chunks <= 0:
        return np.empty(0, np.int64)
    if np.all(w == w[0]):
        return np.arange(chunks, dtype=np.int64) % n
    counts = np.ceil(chunks * w / w.sum()).astype(np.int64) + 1  # enough candidates from each server
    times = np.concatenate([(np.arange(c) + 1) / w[j] for j, c in enumerate(counts)])
    server = np.concatenate([np.full(c, j, np.int64) for j, c in enumerate(counts)])
    order = np.lexsort((server, times))[:chunks]
    return server[order]


def local_numbers(owner: np.ndarray) -> np.ndarray:
    """For each chunk, its number among its own server's chunks (what that server calls it)."""
    local = np.empty(len(owner), np.int64)
    for j in np.unique(owner):
        mine = owner == j
        local[mine] = np.arange(int(mine.sum()))
    return local


def shares(idxs: "Union[range, np.ndarray]", frames_per_chunk: int, owner: np.ndarray, servers: int) -> list[np.ndarray]:
    """Each server's frames, in order: the chunks it owns, concatenated (it cuts them into chunks again)."""
    frames = np.asarray(idxs, dtype=np.int64)
    frame_owner = np.repeat(owner, frames_per_chunk)[: len(frames)]
    return [frames[frame_owner == j] for j in range(servers)]


@attrs.define
class Pace:
    """How fast one server delivers the chunks we ask of it (see the module's rules).

    The caller says when chunks became due (:meth:`asked`: a request's window, then one per
    credit) and when each arrived (:meth:`arrived`).
    """

    samples: deque = attrs.field(factory=lambda: deque(maxlen=SAMPLES))  # (frames, seconds) per chunk
    since_deal: int = 0  # chunks measured since the server was last given a share
    due: deque = attrs.field(factory=deque)  # when each chunk we still await could be started
    last: Optional[float] = None  # when its previous chunk of this deal arrived (None: none yet)

    def dealt(self, now: float, window: int) -> None:
        """The server was sent a new share with ``window`` chunks of credit at ``now``."""
        self.due = deque([now] * window)
        self.last = None
        self.since_deal = 0

    def asked(self, now: float, chunks: int = 1) -> None:
        """We sent the server credit for ``chunks`` more chunks at ``now``."""
        self.due.extend([now] * chunks)

    def arrived(self, frames: int, now: float) -> None:
        """A chunk of ``frames`` frames arrived at ``now``.

        The first chunk of a share is not measured: it also holds opening the video and
        the first seek, which say nothing about the pace that follows.
        """
        due = self.due.popleft() if self.due else now
        if self.last is not None and frames > 0:
            self.samples.append((frames, max(now - max(due, self.last), 1e-6)))
            self.since_deal += 1
        self.last = now

    @property
    def rate(self) -> Optional[float]:
        """Frames per second of busy time over the recent chunks (None: nothing measured yet)."""
        if not self.samples:
            return None
        frames = sum(f for f, _ in self.samples)
        seconds = sum(s for _, s in self.samples)
        return frames / seconds

    def forget(self) -> None:
        """The server went away: what was measured was another process's pace."""
        self.samples.clear()
        self.due.clear()
        self.last = None
        self.since_deal = 0


def weights_for(servers: Sequence[int], paces: Mapping[int, Pace]) -> list[float]:
    """Weights to deal a new request over ``servers``: their paces if every one is known, else equal."""
    rates = [paces[j].rate for j in servers]
    if any(rate is None for rate in rates):
        return [1.0] * len(servers)
    return [float(rate) for rate in rates]  # type: ignore[arg-type]


def redeal_weights(frames_left: Mapping[int, int], paces: Mapping[int, Pace], chunks_left: int) -> Optional[list[float]]:
    """Whether the rest of a request should be dealt again, and by which weights.

    Args:
        frames_left: for each server of the request, the frames of its share not yet taken.
        paces: each server's :class:`Pace`.
        chunks_left: the request's chunks not yet taken.

    Returns:
        The servers' paces (in the order of ``frames_left``) if each has been measured
        :data:`MIN_SAMPLES` times since the deal (or has finished its share) and the shares left would take more than
        :data:`REDEAL_RATIO` times as long as shares by pace; else None.
    """
    servers = list(frames_left)
    if len(servers) < 2 or chunks_left < MIN_CHUNKS_LEFT_PER_SERVER * len(servers):
        return None
    if any(paces[j].rate is None or (frames_left[j] and paces[j].since_deal < MIN_SAMPLES) for j in servers):
        return None
    rates = [float(paces[j].rate) for j in servers]  # type: ignore[arg-type]
    as_dealt = max(frames_left[j] / rate for j, rate in zip(servers, rates))
    by_pace = sum(frames_left.values()) / sum(rates)
    return rates if as_dealt > REDEAL_RATIO * by_pace else None
