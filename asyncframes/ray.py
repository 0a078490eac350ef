"""Frame-exact decoding as a Ray Data source: :func:`read_frames`.

Each video is indexed once on the driver; its selected frames are split into read tasks
along keyframe (GOP) boundaries (:mod:`asyncframes._split`), so one long video spreads
over many workers and no GOP is decoded by two tasks. Each task decodes its frames with
the same reader the frame server uses (frame *i* is the *i*-th frame a sequential decode
presents) and yields blocks of many frames with the columns ``frame`` (``(h, w, c)``
uint8), ``frame_index``, ``pts_seconds`` and ``video`` (the path as given). Given a table
of clips instead, each row is one clip (``frames``, ``frame_indices``, ``pts_seconds``,
``video``, ``clip``), and the tasks are split along clips.

Ray is an optional extra (``pip install 'asyncframes-video[ray]'``): importing
:mod:`asyncframes` never imports it; importing this module does.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import attrs
import numpy as np
import ray.data
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ._index import FrameIndex, check_frame_idxs, per_video
from ._reader import VideoReader, changed_error
from ._split import Piece, gop_starts, split, split_clips
from ._video import Video, as_video

if TYPE_CHECKING:
    from ._files import SourceIdentity

__all__ = ["read_frames", "FramesDatasource", "FrameServers"]

VideoLike = Union[Video, str, "os.PathLike[str]"]
#: Frames per block a read task yields (a block is one Arrow table of many frames).
FRAMES_PER_BLOCK = 64


class _Planned:
    """What the driver learned about one video: enough for a task to decode without demuxing again."""

    def __init__(self, given: str, video: Video, index: FrameIndex, identity: "SourceIdentity", pts_seconds: np.ndarray,
                 shape: tuple[int, int, int]) -> None:
        self.given = given
        self.video = video
        self.index = index
        self.identity = identity
        self.pts_seconds = pts_seconds
        self.shape = shape


class FramesDatasource(Datasource):
    """A Ray Data source of exact frames of several videos, split into read tasks by GOP.

    Args:
        videos: paths or :class:`~asyncframes.Video` specs (grayscale, stream).
        frame_idxs: None (every frame), one sequence of indices for every video, or one
            sequence (or None) per video. Any order, duplicates allowed (a frame asked for
            twice gives two rows, decoded once).
        frames_per_block: frames per block a task yields.

    Raises:
        FrameIndexError: an index that is not a frame of its video (naming it).
        VideoError: a video that cannot be opened.
    """

    def __init__(
        self,
        videos: Sequence[VideoLike],
        frame_idxs: Any = None,
        frames_per_block: int = FRAMES_PER_BLOCK,
        clips: Optional[Sequence[tuple[Union[int, str], Sequence[int]]]] = None,
    ) -> None:
        super().__init__()
        if isinstance(videos, (str, os.PathLike, Video)):
            videos = [videos]
        if not videos:
            raise ValueError("read_frames needs at least one video")
        if frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
        self.frames_per_block = frames_per_block
        self._planned = [self._plan(v) for v in videos]
        self._selections = [
            np.arange(p.index.frame_count, dtype=np.int64) if idxs is None else np.asarray(idxs, dtype=np.int64).reshape(-1)
            for p, idxs in zip(self._planned, per_video(frame_idxs, len(videos)))
        ]
        for p, selected in zip(self._planned, self._selections):
            check_frame_idxs(selected, p.index.frame_count, p.given)
        self._clips: Optional[list[tuple[int, np.ndarray]]] = None
        if clips is not None:
            if frame_idxs is not None:
                raise ValueError("give frame_idxs or clips, not both")
            self._clips = [self._clip(k, clip) for k, clip in enumerate(clips)]
            self._selections = [np.concatenate([c for v, c in self._clips if v == k] or [np.zeros(0, np.int64)])
                                for k in range(len(self._planned))]

    def _clip(self, k: int, clip: Any) -> tuple[int, np.ndarray]:
        """Clip ``k`` as (video position, indices), checked."""
        try:
            video, idxs = clip
        except (TypeError, ValueError):
            raise TypeError(f"clip {k} must be (video, frame indices), got {clip!r}") from None
        given = [p.given for p in self._planned]
        if isinstance(video, (int, np.integer)) and not isinstance(video, bool):
            if not 0 <= video < len(given):
                raise ValueError(f"clip {k} names video {video}; there are {len(given)} (0 to {len(given) - 1})")
            v = int(video)
        else:
            name = video.filename if isinstance(video, Video) else os.fspath(video)
            if name not in given:
                raise ValueError(f"clip {k} names {name!r}, which is not one of the videos: {given}")
            v = given.index(name)
        frames = np.asarray(idxs, dtype=np.int64).reshape(-1)
        check_frame_idxs(frames, self._planned[v].index.frame_count, self._planned[v].given)
        return v, frames

    @staticmethod
    def _plan(video: VideoLike) -> _Planned:
        spec = as_video(video)
        given = spec.filename if isinstance(video, Video) else os.fspath(video)
        with VideoReader(spec.filename, stream=spec.stream) as reader:
            # The grayscale option as served, resolved once here: no read task decodes frame 0 to find out.
            spec = attrs.evolve(spec, grayscale=reader.resolve_grayscale(spec.grayscale))
            return _Planned(given, spec, reader.index, reader.signature, reader.frame_times().pts_seconds,
                            reader.frame_shape(spec.grayscale, spec))

    def get_name(self) -> str:
        return "AsyncframesFrames"

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(len(s) * int(np.prod(p.shape)) for p, s in zip(self._planned, self._selections))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None, data_context: Any = None) -> list[ReadTask]:
        """One read task per group of GOPs (about ``parallelism`` of them), or of clips."""
        if self._clips is not None:
            return self._clip_tasks(parallelism, per_task_row_limit)
        tasks = split(self._selections, [gop_starts(p.index) for p in self._planned], max(1, parallelism))
        out = []
        for pieces in tasks:
            planned = {piece.video: self._planned[piece.video] for piece in pieces}
            rows = sum(piece.rows for piece in pieces)
            size = sum(piece.rows * int(np.prod(planned[piece.video].shape)) for piece in pieces)
            meta = BlockMetadata(num_rows=rows, size_bytes=size, exec_stats=None,
                                 input_files=tuple(p.video.filename for p in planned.values()))
            out.append(ReadTask(_task(pieces, planned, self.frames_per_block), meta, per_task_row_limit=per_task_row_limit))
        return out


    def _clip_tasks(self, parallelism: int, per_task_row_limit: Optional[int]) -> list[ReadTask]:
        assert self._clips is not None
        out = []
        for positions in split_clips(self._clips, [gop_starts(p.index) for p in self._planned], max(1, parallelism)):
            clips = [(k, *self._clips[k]) for k in positions]
            planned = {v: self._planned[v] for _, v, _ in clips}
            size = sum(len(idxs) * int(np.prod(planned[v].shape)) for _, v, idxs in clips)
            meta = BlockMetadata(num_rows=len(clips), size_bytes=size, exec_stats=None,
                                 input_files=tuple(p.video.filename for p in planned.values()))
            out.append(ReadTask(_clip_task(clips, planned), meta, per_task_row_limit=per_task_row_limit))
        return out


def _clip_task(clips: list[tuple[int, int, np.ndarray]], planned: dict[int, _Planned]) -> Any:
    def read() -> Iterator[Any]:
        readers: dict[int, VideoReader] = {}
        try:
            for k, v, idxs in clips:
                plan = planned[v]
                if v not in readers:
                    readers[v] = _open(plan)
                frames = readers[v].read(idxs.tolist(), grayscale=plan.video.grayscale, video=plan.video)
                yield BlockAccessor.batch_to_block({
                    "frames": frames[None],
                    "frame_indices": idxs[None],
                    "pts_seconds": plan.pts_seconds[idxs][None],
                    "video": np.array([plan.given], dtype=object),
                    "clip": np.array([k], dtype=np.int64),
                })
        finally:
            for reader in readers.values():
                reader.close()

    return read


def _open(plan: _Planned) -> VideoReader:
    """A reader of ``plan``'s video with the driver's index, refusing a file changed since."""
    spec = plan.video
    reader = VideoReader(spec.filename, stream=spec.stream, thread_type=None, index=plan.index)
    if reader.signature != plan.identity:  # changed since the driver indexed it
        reader.close()
        raise changed_error(plan.given)
    return reader


def _task(pieces: list[Piece], planned: dict[int, _Planned], frames_per_block: int) -> Any:
    def read() -> Iterator[Any]:
        for piece in pieces:
            yield from _read_piece(piece, planned[piece.video], frames_per_block)

    return read


def _read_piece(piece: Piece, plan: _Planned, frames_per_block: int) -> Iterator[Any]:
    """Blocks of ``piece``'s frames, decoded once each, repeated as asked."""
    spec = plan.video
    reader = _open(plan)
    try:
        frames = np.asarray(piece.frames, dtype=np.int64)
        repeats = np.asarray(piece.repeats, dtype=np.int64)
        for start in range(0, len(frames), frames_per_block):
            batch, times = frames[start : start + frames_per_block], repeats[start : start + frames_per_block]
            decoded = reader.read(batch.tolist(), grayscale=spec.grayscale, video=spec)
            seconds = plan.pts_seconds[batch]
            yield BlockAccessor.batch_to_block({
                "frame": np.repeat(decoded, times, axis=0),
                "frame_index": np.repeat(batch, times),
                "pts_seconds": np.repeat(seconds, times),
                "video": np.array([plan.given] * int(times.sum()), dtype=object),
            })
    finally:
        reader.close()



def read_frames(
    videos: Union[VideoLike, Sequence[VideoLike]],
    frame_idxs: Any = None,
    *,
    clips: Optional[Sequence[tuple[Union[int, str], Sequence[int]]]] = None,
    frames_per_block: int = FRAMES_PER_BLOCK,
    override_num_blocks: Optional[int] = None,
    ray_remote_args: Optional[dict[str, Any]] = None,
    **read_args: Any,
) -> "ray.data.Dataset":
    """A Ray Dataset of exact frames of ``videos``, decoded in read tasks split by GOP.

    Args:
        videos: a path, a :class:`~asyncframes.Video`, or a list of them.
        frame_idxs: None (every frame), one sequence of indices for every video, or one
            sequence (or None) per video.
        clips: instead of ``frame_idxs``, a table of clips: ``(video, frame indices)`` each,
            the video named by its position in ``videos`` or as given there. Each row is
            then one clip: ``frames`` (``(n, h, w, c)``), ``frame_indices``, ``pts_seconds``,
            ``video`` and ``clip`` (its position in the table); a clip is never split.
        frames_per_block: frames per block (one Arrow table) a task yields.
        override_num_blocks: how many read tasks to aim for (default: Ray's choice from
            the cluster's CPUs); a GOP is never split.
        ray_remote_args: passed to the read tasks' ``ray.remote`` (e.g. ``num_cpus``).
        **read_args: passed to :func:`ray.data.read_datasource` (``concurrency``, ...).

    Returns:
        A :class:`ray.data.Dataset` with the columns ``frame`` (``(h, w, c)`` uint8),
        ``frame_index`` (int64), ``pts_seconds`` (float64: the frame's presentation time,
        ``frame.time`` of a sequential decode) and ``video`` (the path as given).

    Raises:
        FrameIndexError: an index that is not a frame of its video (naming it).
        VideoError: a video that cannot be opened.
        ValueError: both ``frame_idxs`` and ``clips``, or a clip naming no video of ``videos``.
    """
    source = FramesDatasource(videos, frame_idxs, frames_per_block=frames_per_block, clips=clips)
    return ray.data.read_datasource(source, override_num_blocks=override_num_blocks, ray_remote_args=ray_remote_args, **read_args)


# -- frame servers as Ray actors ------------------------------------------------------------------


#: The Ray namespace named frame servers live in (so other jobs can find them by name).
NAMESPACE = "asyncframes"


class _FrameServerActor:
    """A frame server inside a Ray actor: it serves on the node's address until the actor ends.

    Ray restarts it if its process dies (``max_restarts``); the new process listens on the
    port the old one had (kept in Ray's key-value store under ``port_key``), so a client
    that was talking to it reconnects to the same endpoint and carries on. If that port is
    taken (or the actor was restarted on another node and the port is taken there), it
    listens on a new one, which :meth:`endpoint` tells.
    """

    def __init__(self, root: Optional[str], options: dict[str, Any], port_key: str) -> None:
        import logging
        import threading

        from ray.experimental import internal_kv
        from ray.util import get_node_ip_address

        from ._config import ServerConfig
        from ._server import FrameServer

        config = ServerConfig(root=None if root is None else os.path.abspath(root), **options)
        host = get_node_ip_address()
        port = internal_kv._internal_kv_get(port_key, namespace=NAMESPACE)
        server = None
        if port:
            try:
                server = FrameServer([f"tcp://{host}:{port.decode()}"], config)
            except Exception as exc:  # noqa: BLE001  (taken: any port will do)
                logging.getLogger(__name__).warning("restarted frame server cannot listen on its port %s again (%s): a new one",
                                                    port.decode(), exc)
        if server is None:
            server = FrameServer([f"tcp://{host}:*"], config)
            internal_kv._internal_kv_put(port_key, server.endpoints[0].rsplit(":", 1)[1], namespace=NAMESPACE)
        self._server = server
        self._thread = threading.Thread(target=self._server.serve_forever, name="asyncframes-server", daemon=True)
        self._thread.start()

    def endpoint(self) -> str:
        return self._server.endpoints[0]

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self._server.stop("stopped by FrameServers.shutdown")
        self._thread.join(10)


class FrameServers:
    """Frame servers running as Ray actors, one per node by default, and ways to read from them.

    Each video goes to one server, chosen by rendezvous hashing of its path over the servers
    (the same video always to the same server while the set is unchanged, so its GOPs stay
    decoded and its seeks forward): :meth:`read`. Or read through all of them at once with
    :meth:`client`, an :class:`~asyncframes.AsyncVideo` that deals each request over the
    servers by their pace and fails over when one is lost.

    Ray restarts a server whose process dies, on the same port when it can: an
    ``AsyncVideo`` talking to it reconnects by itself, and :meth:`read` asks for the frames
    it had not received yet. Servers given a ``name`` can be found from any process of the
    cluster with :meth:`connect` (discovery through Ray: no endpoints to copy by hand).

    Args:
        num_servers: how many servers (default: one per node chosen, see ``labels``).
        root: the folder the servers serve (every node must see the videos there); None
            serves any path the actor's user can read (a cluster you trust).
        max_restarts: how often Ray restarts a server whose process died (-1: always).
        name: name the servers (``name-0``, ``name-1``, ... in the Ray namespace
            ``"asyncframes"``) so :meth:`connect` finds them.
        detached: with a ``name``: the servers outlive this Ray job (stop them with
            :meth:`shutdown` from any job that connected).
        labels: place the servers only on nodes with these Ray node labels (e.g.
            ``{"storage": "nvme"}``: nodes started with ``ray start --labels``); each
            server is placed on its node softly: Ray may put it elsewhere if the node is full.
        **server_options: :class:`~asyncframes._config.ServerConfig` fields (``workers``,
            ``max_open_files``, ``total_cache_bytes``, ...).

    Raises:
        RuntimeError: Ray is not initialised (call ``ray.init()`` first).
        ValueError: ``num_servers`` < 1; no alive node has ``labels`` (the error names the
            labels the nodes have); ``detached`` without a ``name``.
    """

    def __init__(self, num_servers: Optional[int] = None, *, root: Optional[str] = None, max_restarts: int = -1,
                 name: Optional[str] = None, detached: bool = False, labels: Optional[dict[str, str]] = None,
                 **server_options: Any) -> None:
        import uuid

        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not ray.is_initialized():
            raise RuntimeError("FrameServers needs a Ray runtime: call ray.init() first")
        if detached and name is None:
            raise ValueError("detached servers need a name (to be found again with FrameServers.connect)")
        nodes = _nodes_with(labels)
        count = num_servers if num_servers is not None else len(nodes)
        if count < 1:
            raise ValueError(f"num_servers must be >= 1, got {count}")
        prefix = name if name is not None else f"unnamed-{uuid.uuid4().hex}"
        actor = ray.remote(num_cpus=0, max_restarts=max_restarts, max_task_retries=-1)(_FrameServerActor)
        actors = []
        for k in range(count):
            options: dict[str, Any] = {
                "scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[k % len(nodes)], soft=True),
            }
            if name is not None:
                options.update(name=f"{name}-{k}", namespace=NAMESPACE, lifetime="detached" if detached else None)
            actors.append(actor.options(**options).remote(root, server_options, _port_key(prefix, k)))
        self._attach(name, prefix, actors, owner=True, timeout=None)

    def _attach(self, name: Optional[str], prefix: str, actors: list[Any], owner: bool, timeout: Optional[float]) -> None:
        """Read from ``actors`` (named ``prefix-k``); ``owner``: :meth:`shutdown` on leaving."""
        import ray

        self.name = name
        self._names = [f"server-{k}" for k in range(len(actors))]
        self._port_keys = [_port_key(prefix, k) for k in range(len(actors))]
        self._actors = actors
        self._owner = owner
        self._clients: dict[str, Any] = {}
        self.endpoints = ray.get([a.endpoint.remote() for a in actors], timeout=timeout)

    @classmethod
    def connect(cls, name: str, timeout: float = 60.0) -> "FrameServers":
        """The servers started elsewhere in the cluster as ``FrameServers(..., name=name)``.

        Args:
            name: the name they were given.
            timeout: seconds to wait for their endpoints (a server being restarted answers late).

        Returns:
            A :class:`FrameServers` that reads from them; leaving it (or :meth:`close`) closes
            its clients and leaves the servers running (:meth:`shutdown` stops them).

        Raises:
            RuntimeError: Ray is not initialised.
            ValueError: no servers of that name.
        """
        import ray

        if not ray.is_initialized():
            raise RuntimeError("FrameServers.connect needs a Ray runtime: call ray.init() first")
        actors = []
        while True:
            try:
                actors.append(ray.get_actor(f"{name}-{len(actors)}", namespace=NAMESPACE))
            except ValueError:
                break
        if not actors:
            raise ValueError(f"no frame servers named {name!r} in the Ray namespace {NAMESPACE!r}")
        self = cls.__new__(cls)
        self._attach(name, name, actors, owner=False, timeout=timeout)
        return self

    def client(self, **options: Any) -> Any:
        """An :class:`~asyncframes.AsyncVideo` over every server: each request is dealt over
        them by their pace, a server that dies is failed over, and one that Ray restarts
        (on its port) rejoins. ``options``: :class:`~asyncframes.AsyncVideo`'s (``timeout``,
        ``window``, ...). The caller closes it."""
        from ._client import AsyncVideo

        return AsyncVideo(list(self.endpoints), **options)

    def server_for(self, video: VideoLike) -> int:
        """Which server reads ``video`` (rendezvous hashing of its path over the servers)."""
        import hashlib

        name = as_video(video).filename
        scores = [hashlib.blake2b(f"{server}\0{name}".encode(), digest_size=8).digest() for server in self._names]
        return max(range(len(scores)), key=scores.__getitem__)

    def endpoint_for(self, video: VideoLike) -> str:
        """The endpoint of the server that reads ``video`` (for an ``AsyncVideo`` of your own)."""
        return self.endpoints[self.server_for(video)]

    def read(self, video: VideoLike, frame_idxs: Any = None, frames_per_chunk: int = 64, *, restarts: int = 3,
             timeout: float = 60.0) -> Iterator[Any]:
        """The frames of ``video``, chunk by chunk, from its server, in order, exact.

        If the server's process dies mid-stream, Ray restarts it; this waits for it (at most
        ``timeout`` seconds), connects to its new endpoint and asks for the frames not yet
        received, at most ``restarts`` times; then the last error is raised.

        Args:
            video: a path or :class:`~asyncframes.Video`.
            frame_idxs: the frames (None: every frame).
            frames_per_chunk: frames per chunk.
            restarts: server restarts to survive within this read.
            timeout: seconds to wait for a chunk, and for a restarted server.

        Returns:
            An iterator of :class:`~asyncframes.FrameChunk` ``(frame_idxs, frames)``.

        Raises:
            ServerDiedError, RequestTimeoutError: the server was lost more than ``restarts``
                times, or did not come back within ``timeout``.
            FrameIndexError, VideoError, ServerError: what the server reported.
        """
        import ray

        from ._client import AsyncVideo
        from .errors import RequestCancelledError, RequestTimeoutError, ServerDiedError

        k = self.server_for(video)
        remaining: Optional[list[int]] = None if frame_idxs is None else [int(i) for i in frame_idxs]
        lost = 0
        while True:
            endpoint = self.endpoints[k]
            client = self._clients.get(endpoint)
            if client is None:
                client = self._clients[endpoint] = AsyncVideo(endpoint, timeout=timeout)
            try:
                if remaining is None:
                    remaining = list(range(client.info(video).frame_count))
                client.load_by_chunk(video, remaining, frames_per_chunk)
                for chunk in client.chunks:
                    remaining = remaining[len(chunk.frame_idxs):]
                    yield chunk
                return
            except (ServerDiedError, RequestCancelledError, RequestTimeoutError):
                lost += 1
                if lost > restarts:
                    raise
                self._clients.pop(endpoint).close()
                self.endpoints[k] = ray.get(self._actors[k].endpoint.remote(), timeout=timeout)  # restarted by Ray

    def pids(self) -> list[int]:
        """The servers' process ids (for tests and monitoring)."""
        import ray

        return ray.get([a.pid.remote() for a in self._actors])

    def kill(self, server: int, timeout: float = 60.0) -> None:
        """Kill server ``server``'s process as a crash would, and return once Ray has restarted it.

        Raises:
            TimeoutError: it was not back within ``timeout`` seconds.
        """
        import time

        import ray

        actor = self._actors[server]
        before = ray.get(actor.pid.remote(), timeout=timeout)
        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ray.get(actor.pid.remote(), timeout=max(0.1, deadline - time.monotonic())) != before:
                    return
            except ray.exceptions.RayActorError:
                pass  # being restarted
            time.sleep(0.05)
        raise TimeoutError(f"frame server {server} was not restarted within {timeout:g} s")

    def close(self) -> None:
        """Close the clients :meth:`read` made (the servers keep running)."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def shutdown(self) -> None:
        """Close the clients and stop the servers."""
        import ray
        from ray.experimental import internal_kv

        self.close()
        for key in self._port_keys:
            internal_kv._internal_kv_del(key, namespace=NAMESPACE)
        for actor in self._actors:
            try:
                ray.get(actor.stop.remote(), timeout=15)
            except Exception:  # noqa: BLE001  (already gone)
                pass
            ray.kill(actor, no_restart=True)
        self._actors = []

    def __enter__(self) -> "FrameServers":
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the servers if this object started them; only close its clients if it connected."""
        if self._owner:
            self.shutdown()
        else:
            self.close()


def _port_key(prefix: str, k: int) -> str:
    """Where server ``k`` of the servers named ``prefix`` keeps its port in Ray's key-value store."""
    return f"{prefix}-{k}:port"


def _nodes_with(labels: Optional[dict[str, str]]) -> list[str]:
    """The ids of the alive nodes that have every label of ``labels`` (None: every alive node)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    chosen = [n["NodeID"] for n in alive if all(n.get("Labels", {}).get(k) == v for k, v in (labels or {}).items())]
    if not chosen:
        seen = sorted({f"{k}={v}" for n in alive for k, v in n.get("Labels", {}).items() if not k.startswith("ray.io/")})
        raise ValueError(f"no alive Ray node has the labels {labels}; the nodes have: {', '.join(seen) or 'no labels'}")
    return chosen
