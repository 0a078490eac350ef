"""asyncio: async with / async for on a real event loop, frames exact, the loop never held long."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from asyncframes.asyncio import AsyncVideo
from asyncframes.errors import ServerDiedError

from .conftest import reference_frames, shuffled_with_duplicates


async def ticking(until: asyncio.Event) -> float:
    """The longest gap between 1 ms ticks of the loop, in ms, until told to stop."""
    longest, last = 0.0, time.perf_counter()
    while not until.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    return longest * 1000


def test_async_for_gives_exact_frames_and_the_loop_keeps_ticking(make_clip, capsys):
    path = str(make_clip("h264_gops.mp4"))
    idxs = shuffled_with_duplicates(150, 30, seed=4)

    async def main() -> tuple[list[int], list[np.ndarray], float]:
        stop = asyncio.Event()
        ticker = asyncio.create_task(ticking(stop))
        await asyncio.sleep(0.01)
        got, frames = [], []
        async with AsyncVideo() as av:  # the private server starts while the loop runs
            info = await av.info(path)
            assert info.frame_count == 150
            await av.load_by_chunk(path, idxs, frames_per_chunk=16)
            async for chunk_idxs, chunk in av.chunks:
                got += chunk_idxs
                frames += [np.array(f) for f in chunk]
            with pytest.raises(Exception, match="fully consumed|no request"):  # never ends silently
                async for _ in av.chunks:
                    pass
        stop.set()
        return got, frames, await ticker

    got, frames, longest = asyncio.run(main())
    assert got == idxs
    ref = reference_frames(path)
    assert all(np.array_equal(f, ref[i]) for i, f in zip(got, frames))
    with capsys.disabled():
        print(f"\n[asyncio] longest gap between 1 ms ticks: {longest:.1f} ms (goal < 5 ms)")
    assert longest < 1000, "the loop was held (a generous bound: the goal is 5 ms)"


def test_a_server_killed_mid_stream_raises_server_died_within_5_s(make_clip):
    path = str(make_clip("h264_gops.mp4"))

    async def main() -> float:
        async with AsyncVideo() as av:
            await av.load_by_chunk(path, list(range(150)) * 20, frames_per_chunk=4)
            killed = None
            with pytest.raises(ServerDiedError):
                async for _ in av.chunks:
                    if killed is None:
                        os.kill(av._client._conns[0].process.pid, signal.SIGKILL)
                        killed = time.monotonic()
            return time.monotonic() - killed

    assert asyncio.run(main()) < 5


def test_a_standalone_server_restarted_on_its_port_serves_the_next_request(tmp_path, make_clip):
    """The restarted server's connection is a new socket with new descriptors: the driver must
    watch those, and greet the new server, or it would wait for ever."""
    import shutil

    from .test_standalone_server import Server, free_tcp_endpoint

    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(make_clip("h264.mkv"), root / "clip.mkv")
    bind = free_tcp_endpoint()
    server = Server(tmp_path, "--root", str(root), bind=bind)

    async def main() -> list[int]:
        nonlocal server
        async with AsyncVideo(bind, timeout=20) as av:
            assert (await av.info("clip.mkv")).frame_count == 80
            server.stop()
            server = Server(tmp_path, "--root", str(root), bind=bind)
            started = time.monotonic()
            await av.load_by_chunk("clip.mkv", [5, 79], frames_per_chunk=1)
            got = [i for idxs, _ in [c async for c in av.chunks] for i in idxs]
            # not after a timeout (20 s): woken by the new socket, as soon as the frames are there
            assert time.monotonic() - started < 10, "the driver missed the new connection's events"
            return got

    try:
        assert asyncio.run(asyncio.wait_for(main(), 60)) == [5, 79]
    finally:
        server.stop()
