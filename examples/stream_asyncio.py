"""Frames in an asyncio program: async with / async for, the loop free all along.

    python examples/stream_asyncio.py [VIDEO]

Without a video it streams the built-in sample clip, while a ticker task shows that the
loop keeps running (the longest gap between its 1 ms ticks is printed at the end).
"""

from __future__ import annotations

import asyncio
import sys
import time

from asyncframes.asyncio import AsyncVideo


async def ticker(stop: asyncio.Event) -> float:
    longest, last = 0.0, time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    return longest


async def main(video: str) -> None:
    stop = asyncio.Event()
    ticks = asyncio.create_task(ticker(stop))
    async with AsyncVideo() as av:
        info = await av.info(video)
        print(f"{video}: {info.frame_count} frames, {info.width}x{info.height}")
        await av.load_by_chunk(video, None, frames_per_chunk=32)
        frames, last = 0, -1
        async for frame_idxs, chunk in av.chunks:  # chunk: (n, h, w, c) uint8; frame_idxs: their numbers
            frames, last = frames + len(chunk), frame_idxs[-1]
        print(f"streamed {frames} frames, the last frame {last}")
    stop.set()
    print(f"longest gap between 1 ms ticks of the loop: {await ticks * 1000:.1f} ms")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        from asyncframes._sample import sample_video

        path = str(sample_video())
    asyncio.run(main(path))
