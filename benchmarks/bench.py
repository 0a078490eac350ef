"""Side-by-side throughput and memory of asyncframes against plain PyAV, measured in one run.

    python benchmarks/bench.py [VIDEO ...] [--rounds 3] [--scale-out]

With no videos it uses ../shared/videos (when present) and the built-in sample.
Each round runs every method once, interleaved, so machine noise hits all of
them alike; the table shows medians and ratios to the plain-PyAV baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

from asyncframes import AsyncVideo
from asyncframes.reader import VideoReader
from asyncframes.sample import sample_video

SHARED = Path(__file__).resolve().parents[2] / "shared" / "videos"


def pyav_sequential(path: str, n: int) -> float:
    """What a user does without us: decode in their own thread, default settings."""
    start = time.perf_counter()
    with av.open(path) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")
    return n / (time.perf_counter() - start)


def reader_in_process(path: str, n: int, chunk: int) -> float:
    start = time.perf_counter()
    with VideoReader(path) as reader:
        for i in range(0, n, chunk):
            reader.read(list(range(i, min(i + chunk, n))))
    return n / (time.perf_counter() - start)


def async_stream(path: str, n: int, chunk: int, warm: bool) -> float:
    """End to end: a private server decodes, frames cross ZeroMQ, the caller receives arrays.

    ``warm``: time a second stream from the same server (buffers and decoder already set up).
    """
    with AsyncVideo() as client:
        client.info(path)  # server up, index built: time the stream itself
        if warm:
            _stream(client, path, None, chunk)
        start = time.perf_counter()
        assert _stream(client, path, None, chunk) == n
        return n / (time.perf_counter() - start)


def _stream(client: AsyncVideo, path: str, idxs, chunk: int) -> int:
    client.load_by_chunk(path, idxs, chunk)
    return sum(len(frame_idxs) for frame_idxs, _ in client.chunks)


def pyav_random_naive(path: str, idxs: list[int]) -> float:
    """Random access the usual way: for each index, seek to the nearest keyframe and decode forward."""
    start = time.perf_counter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        pts = sorted(p.pts for p in container.demux(stream) if p.size)
        for i in idxs:
            container.seek(pts[i], stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts >= pts[i]:
                    frame.to_ndarray(format="rgb24")
                    break
    return len(idxs) / (time.perf_counter() - start)


def async_random(path: str, idxs: list[int], chunk: int) -> float:
    with AsyncVideo() as client:
        client.info(path)
        start = time.perf_counter()
        assert _stream(client, path, idxs, chunk) == len(idxs)
        return len(idxs) / (time.perf_counter() - start)


_MEMORY_PROBE = """
import json, sys
from asyncframes import AsyncVideo
def peak(pid="self"):  # VmHWM: peak resident set, in MB (ru_maxrss is not kept everywhere)
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
path, chunk = sys.argv[1], int(sys.argv[2])
with AsyncVideo() as client:
    client.info(path)
    before = peak()
    client.load_by_chunk(path, None, chunk)
    chunk_bytes = max(frames.nbytes for _, frames in client.chunks)
    after = peak()
    server = peak(client.server_pid)
print(json.dumps([after - before, server, chunk_bytes / 1e6]))
"""


def peak_rss_streaming(path: str, chunk: int) -> tuple[float, float, float]:
    """(client peak RSS growth while streaming, server peak RSS, largest chunk), in MB, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, path, str(chunk)], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout))  # type: ignore[return-value]


def scale_out(rounds: int, chunk: int) -> None:
    """Throughput of one request spread over 1 and 2 standalone servers on loopback.

    Each server is pinned to its own CPU, standing in for a machine of its own;
    unpinned, a single server already keeps a 2-CPU box busy.
    """
    import tempfile

    from asyncframes.process import READY_LINE
    from asyncframes.sample import write_clip

    folder = Path(tempfile.mkdtemp(prefix="asyncframes-bench-"))
    clip = write_clip(folder / "short_gops.mp4", frames=960, size=(480, 640), gop=chunk, bframes=2)
    servers = []
    cpus = sorted(os.sched_getaffinity(0))
    count = min(len(cpus), 3)
    try:
        for k in range(count):
            proc = subprocess.Popen(
                [sys.executable, "-m", "asyncframes", "serve", "--bind", "tcp://127.0.0.1:*", "--root", str(folder), "--log-level", "WARNING"],
                stdout=subprocess.PIPE, text=True, preexec_fn=lambda cpu=cpus[k]: os.sched_setaffinity(0, {cpu}),
            )
            line = proc.stdout.readline()
            assert line.startswith(READY_LINE), line
            servers.append((proc, line.split()[-1]))
        results: dict[int, list[float]] = {}
        for _ in range(rounds):
            for n in range(1, count + 1):
                with AsyncVideo([endpoint for _, endpoint in servers[:n]]) as client:
                    _stream(client, clip.name, list(range(64)), chunk)  # warm every server's reader
                    start = time.perf_counter()
                    got = _stream(client, clip.name, None, chunk)
                    results.setdefault(n, []).append(got / (time.perf_counter() - start))
        print(f"\nscale-out: {clip.name} (960 frames 640x480, GOP {chunk}), {chunk} frames/chunk, {rounds} rounds, "
              f"each server pinned to one of {len(cpus)} CPUs")
        base = statistics.median(results[1])
        for n, values in results.items():
            med = statistics.median(values)
            print(f"  {n} server(s) on loopback  {med:8.0f} frames/s   x{med / base:5.2f} of one server   "
                  f"(min {min(values):.0f}, max {max(values):.0f})")
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="*")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames-per-chunk", type=int, default=64)
    parser.add_argument("--random", type=int, default=200, help="random indices for the random-access comparison")
    parser.add_argument("--scale-out", action="store_true", help="also compare 1, 2 and 3 loopback servers")
    args = parser.parse_args()
    videos = args.videos or [str(p) for p in (SHARED / "centered_pair_small.mp4", SHARED / "small_robot.mp4") if p.exists()]
    videos = videos or [str(sample_video())]
    chunk = args.frames_per_chunk
    for path in videos:
        with VideoReader(path) as reader:
            n, info = reader.frame_count, reader.info()
        rng = np.random.default_rng(0)
        idxs = [int(i) for i in rng.integers(0, n, args.random)]
        shuffled = [int(i) for i in rng.permutation(n)]
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, fn, fn_args in [
                ("pyav sequential decode+rgb (baseline)", pyav_sequential, (path, n)),
                ("VideoReader in-process, chunks", reader_in_process, (path, n, chunk)),
                ("AsyncVideo stream, new server", async_stream, (path, n, chunk, False)),
                ("AsyncVideo stream, warm server", async_stream, (path, n, chunk, True)),
                ("pyav random, seek per frame (baseline)", pyav_random_naive, (path, idxs)),
                ("AsyncVideo random indices", async_random, (path, idxs, chunk)),
                ("AsyncVideo every frame, shuffled (random)", async_random, (path, shuffled, chunk)),
            ]:
                results.setdefault(name, []).append(fn(*fn_args))
        print(f"\n{Path(path).name}: {n} frames {info.width}x{info.height}x{info.channels} {info.codec}, "
              f"{chunk} frames/chunk, {args.rounds} rounds")
        base_seq = statistics.median(results["pyav sequential decode+rgb (baseline)"])
        base_rand = statistics.median(results["pyav random, seek per frame (baseline)"])
        for name, values in results.items():
            med = statistics.median(values)
            base = base_rand if "random" in name else base_seq
            print(f"  {name:42s} {med:8.0f} frames/s   x{med / base:5.2f} of baseline   (min {min(values):.0f}, max {max(values):.0f})")
        client_mb, server_mb, chunk_mb = peak_rss_streaming(path, chunk)
        print(f"  memory: largest chunk {chunk_mb:.1f} MB; client peak RSS grew {client_mb:.1f} MB over the whole stream "
              f"({client_mb / chunk_mb:.1f} chunks); server peak RSS {server_mb:.1f} MB")
    if args.scale_out:
        scale_out(args.rounds, 32)


if __name__ == "__main__":
    main()
