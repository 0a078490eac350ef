"""Opening a video on a running server against opening it in-process.

For each video, every round times (in an order that alternates between rounds, each on a
fresh copy of the file, so the server has not opened it before):

* ``in-process``: ``av.open(path)`` and reading the stream's metadata (the baseline);
* ``server, grayscale=False|True|None, indexed``: ``AsyncVideo.info()`` on a running
  private server of a file it has to index (demux), the grayscale option as given;
* ``server, grayscale=False|None, record``: the same for a file whose index record another
  process wrote (a second server opening it), grayscale detected by that process;
* ``server, open already``: ``info()`` again of a file the server has open (the round trip).

Index records go to a temporary folder. Prints the median and the range (ms) per line.

    python benchmarks/open_latency.py [--rounds 9] [VIDEO ...]

Without videos it writes a 1024x1024 and a 1280x720 H.264 clip (300 frames) into a
temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional


def in_process_open(path: Path) -> None:
    """``av.open`` and the metadata a caller reads (what ``info()`` answers with)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        _ = (ctx.width, ctx.height, ctx.name, ctx.pix_fmt, stream.average_rate, stream.guessed_rate,
             stream.duration, stream.time_base, stream.frames, container.format.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("videos", nargs="*", type=Path)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="asyncframes-open-"))
    os.environ["ASYNCFRAMES_INDEX_CACHE"] = str(work / "indexes")  # before asyncframes reads it
    from asyncframes import AsyncVideo, Video
    from asyncframes._reader import VideoReader
    from asyncframes._sample import write_clip

    try:
        videos = list(args.videos)
        if not videos:
            for name, size in (("1024x1024.mp4", (1024, 1024)), ("1280x720.mp4", (720, 1280))):
                write_clip(work / name, frames=300, size=size, gop=30, bframes=2)
                videos.append(work / name)
        copies = 0

        def fresh(video: Path) -> Path:
            nonlocal copies
            copies += 1
            path = work / f"{copies}-{video.name}"
            shutil.copyfile(video, path)  # a new inode: a new file to the server and the store
            path.read_bytes()  # in the page cache, as the original is
            return path

        def server_info(client: AsyncVideo, grayscale: Optional[bool], recorded: bool) -> Callable[[Path], None]:
            def run(path: Path) -> None:
                if recorded:  # another process indexed it (and found out whether it is gray)
                    with VideoReader(str(path)) as reader:
                        _ = reader.detected_grayscale
                start = time.perf_counter()
                client.info(Video(str(path), grayscale=grayscale))
                run.elapsed = time.perf_counter() - start  # type: ignore[attr-defined]

            return run

        results: dict[tuple[str, str], list[float]] = {}
        with AsyncVideo(server="own", wait=True) as client:
            client.info(Video(str(fresh(videos[0])), grayscale=False))  # the server is up and warm
            lines: dict[str, Callable[[Path], None]] = {
                "server, grayscale=False, indexed": server_info(client, False, False),
                "server, grayscale=True, indexed": server_info(client, True, False),
                "server, grayscale=None, indexed": server_info(client, None, False),
                "server, grayscale=False, record": server_info(client, False, True),
                "server, grayscale=None, record": server_info(client, None, True),
            }

            def again(path: Path) -> None:
                client.info(Video(str(path), grayscale=False))
                start = time.perf_counter()
                client.info(Video(str(path), grayscale=False))
                again.elapsed = time.perf_counter() - start  # type: ignore[attr-defined]

            def baseline(path: Path) -> None:
                start = time.perf_counter()
                in_process_open(path)
                baseline.elapsed = time.perf_counter() - start  # type: ignore[attr-defined]

            lines = {"in-process av.open + metadata": baseline, **lines, "server, open already": again}
            for k in range(args.rounds):
                for video in videos:
                    order = list(lines.items())
                    for name, run in order if k % 2 == 0 else order[::-1]:
                        path = fresh(video)
                        run(path)
                        results.setdefault((video.name, name), []).append(run.elapsed * 1e3)  # type: ignore[attr-defined]
                        path.unlink()
        for video in videos:
            print(video.name)
            for name in lines:
                ms = results[(video.name, name)]
                print(f"  {name:34s} median {statistics.median(ms):7.2f} ms  (min {min(ms):6.2f}, max {max(ms):7.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
