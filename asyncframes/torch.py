"""PyTorch datasets of exact video frames and clips, served by frame servers.

* :class:`FramesDataset` (iterable): frames of many videos; yields dicts with ``frame`` (a
  uint8 tensor), ``frame_index`` and ``video`` (the path as given).
* :class:`ClipsDataset` (iterable): clips; yields ``frames`` (frames x ...), ``frame_indices``
  and ``video``.
* :class:`ClipsMapDataset` (map-style): the same clips by number, for random sampling with a
  DataLoader's sampler.

Both iterable datasets are sharded deterministically over training processes (the rank
from ``torch.distributed``, else ``RANK``/``WORLD_SIZE``, else ``SLURM_PROCID``/
``SLURM_NTASKS``) and over DataLoader workers, every item exactly once per epoch
(:mod:`asyncframes._shard`); :meth:`set_epoch` reshuffles. Each process (the main one, or a
worker under fork or spawn) makes its own client on first use: a dataset pickles without
one, and a forked copy never uses its parent's.

PyTorch is an optional extra (``pip install 'asyncframes-video[torch]'``): importing
:mod:`asyncframes` never imports it; importing this module does.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.utils.data

from ._client import AsyncVideo
from ._index import per_video
from ._shard import Shard, items_of, rank_from_env
from ._video import Video, as_video

__all__ = ["FramesDataset", "ClipsDataset", "ClipsMapDataset", "current_shard"]

VideoLike = Union[Video, str, "os.PathLike[str]"]
LAYOUTS = ("HWC", "CHW")


def current_shard(rank: Optional[int] = None, world_size: Optional[int] = None) -> Shard:
    """This process's shard: its rank and world size (given, or from ``torch.distributed`` if
    initialised, else the launcher's environment, else 0 of 1) and its DataLoader worker.

    Raises:
        ValueError: a rank outside the world, or unreadable launcher variables.
    """
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            found: Optional[tuple[int, int]] = (dist.get_rank(), dist.get_world_size())
        else:
            found = rank_from_env(os.environ)
        rank = rank if rank is not None else (found[0] if found else 0)
        world_size = world_size if world_size is not None else (found[1] if found else 1)
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return Shard(rank=rank, world_size=world_size, worker=worker, num_workers=workers)


class _Frames:
    """What the datasets share: the videos, a client made lazily in each process, tensors."""

    def __init__(self, videos: Union[VideoLike, Sequence[VideoLike]], layout: str, client_options: Optional[dict[str, Any]],
                 frames_per_chunk: int) -> None:
        self.videos = list(videos) if isinstance(videos, (list, tuple)) else [videos]
        if not self.videos:
            raise ValueError("a dataset needs at least one video")
        self.specs = [as_video(v) for v in self.videos]
        #: Each video as given (a path's spelling; otherwise its file name), for the items.
        self.names = [os.fspath(v) if isinstance(v, (str, os.PathLike)) else s.filename for v, s in zip(self.videos, self.specs)]
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
        self.layout = layout
        self.client_options = dict(client_options or {})
        self.frames_per_chunk = frames_per_chunk
        self._client: Optional[AsyncVideo] = None
        self._client_pid = -1
        self._counts: Optional[list[int]] = None

    @property
    def client(self) -> AsyncVideo:
        """This process's client, made on first use (a forked copy makes its own)."""
        if self._client is None or self._client_pid != os.getpid():
            # Items are read at random: frames after one are not the next item's (no reading ahead).
            self._client = AsyncVideo(**{"read_ahead": False, **self.client_options})
            self._client_pid = os.getpid()
        return self._client

    def frame_counts(self) -> list[int]:
        if self._counts is None:
            self._counts = [self.client.info(spec).frame_count for spec in self.specs]
        return self._counts

    def tensor(self, frames: np.ndarray) -> torch.Tensor:
        """``frames`` (``(..., h, w, c)``) as a tensor in the layout asked (CHW: a permuted view)."""
        t = torch.from_numpy(frames)
        return t.movedim(-1, -3) if self.layout == "CHW" else t

    def read(self, video: int, idxs: Sequence[int]) -> Iterator[tuple[list[int], np.ndarray]]:
        """Chunks of ``idxs`` of video ``video``, each copied out of the client's buffers (a chunk
        lives in shared memory only until the next is taken; a tensor must outlive that)."""
        client = self.client
        client.load_by_chunk(self.specs[video], list(idxs), self.frames_per_chunk)
        for chunk_idxs, frames in client.chunks:
            yield chunk_idxs, np.array(frames)

    def close(self) -> None:
        """Close this process's client (the process's shared private server keeps running for the next)."""
        if self._client is not None and self._client_pid == os.getpid():
            self._client.close()
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"], state["_client_pid"] = None, -1  # each process makes its own
        return state


class FramesDataset(_Frames, torch.utils.data.IterableDataset):
    """Exact frames of many videos, sharded over ranks and DataLoader workers.

    Args:
        videos: paths or :class:`~asyncframes.Video` specs (or anything :func:`as_video` takes).
        frame_idxs: None (every frame of every video), one sequence of indices for every
            video, or one sequence (or None) per video.
        layout: ``"HWC"`` (``(h, w, c)``, as decoded) or ``"CHW"`` (a permuted view; a
            DataLoader's collate stacks it into a contiguous batch).
        shuffle: a new order each epoch (:meth:`set_epoch`), the same on every rank.
        seed: the shuffle's seed.
        rank, world_size: override what :func:`current_shard` finds.
        frames_per_chunk: frames per chunk asked of the server.
        client_options: keyword arguments of :class:`~asyncframes.AsyncVideo` (e.g.
            ``endpoint`` of a standalone server, ``window``).

    Yields:
        ``{"frame": uint8 tensor, "frame_index": int, "video": the path as given}``; with
        ``shuffle``, the frames of each run of up to ``shuffle_block`` items are read video by
        video (each a request), in shuffled order within each video.
    """

    def __init__(
        self,
        videos: Union[VideoLike, Sequence[VideoLike]],
        frame_idxs: Any = None,
        *,
        layout: str = "HWC",
        shuffle: bool = False,
        seed: int = 0,
        shuffle_block: int = 1024,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        frames_per_chunk: int = 64,
        client_options: Optional[dict[str, Any]] = None,
    ) -> None:
        _Frames.__init__(self, videos, layout, client_options, frames_per_chunk)
        self.frame_idxs = per_video(frame_idxs, len(self.videos))
        self.shuffle, self.seed, self.shuffle_block = shuffle, seed, shuffle_block
        self.rank, self.world_size = rank, world_size
        self.epoch, self._begun = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order (call it on every rank before each epoch, as with DistributedSampler).

        With ``persistent_workers=True`` a worker keeps the copy it was given, so it cannot hear
        later calls: it counts the epochs it has begun from the one set when it started, which
        is the same order as long as epochs are set one after another."""
        self.epoch, self._begun = int(epoch), 0

    def _epoch(self) -> int:
        """This iteration's epoch: the one set, plus the epochs this copy has begun since."""
        epoch = self.epoch + getattr(self, "_begun", 0)
        self._begun = getattr(self, "_begun", 0) + 1
        return epoch

    def _items(self) -> tuple[np.ndarray, np.ndarray]:
        """(video, frame index) of every item, in the dataset's base order."""
        counts = None
        videos, frames = [], []
        for v, idxs in enumerate(self.frame_idxs):
            if idxs is None:
                counts = counts or self.frame_counts()
                idxs = range(counts[v])
            arr = np.asarray(idxs, dtype=np.int64).reshape(-1)
            videos.append(np.full(len(arr), v, dtype=np.int64))
            frames.append(arr)
        return np.concatenate(videos), np.concatenate(frames)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        videos, frames = self._items()
        mine = items_of(current_shard(self.rank, self.world_size), len(frames), self.shuffle, self.seed, self._epoch())
        block = self.shuffle_block if self.shuffle else len(mine) or 1
        for start in range(0, len(mine), block):
            part = mine[start : start + block]
            for v in dict.fromkeys(videos[part].tolist()):  # videos in order of first appearance
                idxs = frames[part][videos[part] == v]
                for chunk_idxs, chunk in self.read(v, idxs.tolist()):
                    for i, frame in zip(chunk_idxs, chunk):
                        yield {"frame": self.tensor(frame), "frame_index": int(i), "video": self.names[v]}


class _Clips(_Frames):
    """Clips of the videos: given as ``(video, indices)``, or cut from every video."""

    def __init__(self, videos: Any, clips: Any, frames_per_clip: Optional[int], stride: int, clip_step: Optional[int],
                 layout: str, client_options: Optional[dict[str, Any]], frames_per_chunk: int) -> None:
        _Frames.__init__(self, videos, layout, client_options, frames_per_chunk)
        if clips is None and frames_per_clip is None:
            raise ValueError("give clips=[(video, indices), ...] or frames_per_clip (with stride, clip_step)")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self._given = None if clips is None else [(self._video_of(v), [int(i) for i in idxs]) for v, idxs in clips]
        self.frames_per_clip, self.stride = frames_per_clip, stride
        self.clip_step = clip_step if clip_step is not None else (frames_per_clip or 1) * stride
        if self.clip_step < 1:
            raise ValueError(f"clip_step must be >= 1, got {self.clip_step}")
        self._clips: Optional[list[tuple[int, list[int]]]] = None

    def _video_of(self, video: Any) -> int:
        if isinstance(video, (int, np.integer)) and not isinstance(video, bool):
            if not 0 <= video < len(self.videos):
                raise ValueError(f"clip names video {video}; there are {len(self.videos)} (0 to {len(self.videos) - 1})")
            return int(video)
        name = os.fspath(video) if isinstance(video, (str, os.PathLike)) else as_video(video).filename
        if name not in self.names:
            raise ValueError(f"clip names {name!r}, which is not one of the videos: {self.names}")
        return self.names.index(name)

    def clips(self) -> list[tuple[int, list[int]]]:
        """Every clip: ``(video number, frame indices)``."""
        if self._clips is None:
            if self._given is not None:
                self._clips = self._given
            else:
                assert self.frames_per_clip is not None
                span = (self.frames_per_clip - 1) * self.stride + 1
                self._clips = [
                    (v, list(range(start, start + span, self.stride)))
                    for v, n in enumerate(self.frame_counts())
                    for start in range(0, n - span + 1, self.clip_step)
                ]
        return self._clips

    def clip(self, k: int) -> dict[str, Any]:
        v, idxs = self.clips()[k]
        frames = np.concatenate([chunk for _, chunk in self.read(v, idxs)]) if idxs else np.zeros((0, 0, 0, 0), np.uint8)
        return {"frames": self.tensor(frames), "frame_indices": torch.tensor(idxs, dtype=torch.int64), "video": self.names[v]}


class ClipsDataset(_Clips, torch.utils.data.IterableDataset):
    """Clips of frames, sharded over ranks and DataLoader workers (see :class:`FramesDataset`).

    Args:
        videos: paths or :class:`~asyncframes.Video` specs.
        clips: ``(video, frame indices)`` of each clip, the video by position or as given; or
            None to cut every video into clips of ``frames_per_clip`` frames ``stride`` apart,
            one starting every ``clip_step`` frames (default: back to back).
        layout: ``"HWC"`` gives ``(frames, h, w, c)``; ``"CHW"`` gives ``(frames, c, h, w)``.
        shuffle, seed, rank, world_size, frames_per_chunk, client_options: as for
            :class:`FramesDataset`.

    Yields:
        ``{"frames": uint8 tensor, "frame_indices": int64 tensor, "video": the path as given}``.
    """

    def __init__(self, videos: Any, clips: Any = None, *, frames_per_clip: Optional[int] = None, stride: int = 1,
                 clip_step: Optional[int] = None, layout: str = "HWC", shuffle: bool = False, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, frames_per_chunk: int = 64,
                 client_options: Optional[dict[str, Any]] = None) -> None:
        _Clips.__init__(self, videos, clips, frames_per_clip, stride, clip_step, layout, client_options, frames_per_chunk)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch, self._begun = 0, 0

    set_epoch = FramesDataset.set_epoch
    _epoch = FramesDataset._epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard = current_shard(self.rank, self.world_size)
        for k in items_of(shard, len(self.clips()), self.shuffle, self.seed, self._epoch()).tolist():
            yield self.clip(k)


class ClipsMapDataset(_Clips, torch.utils.data.Dataset):
    """The clips of :class:`ClipsDataset` by number, for random sampling (a DataLoader's
    sampler, ``DistributedSampler``): ``len(ds)`` clips, ``ds[k]`` one clip's dict."""

    def __init__(self, videos: Any, clips: Any = None, *, frames_per_clip: Optional[int] = None, stride: int = 1,
                 clip_step: Optional[int] = None, layout: str = "HWC", frames_per_chunk: int = 64,
                 client_options: Optional[dict[str, Any]] = None) -> None:
        _Clips.__init__(self, videos, clips, frames_per_clip, stride, clip_step, layout, client_options, frames_per_chunk)

    def __len__(self) -> int:
        return len(self.clips())

    def __getitem__(self, k: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"clip {k} out of range: there are {n} clips")
        return self.clip(k % n)

