"""Several frame servers, one of them slow: dealing by pace against chunk k from server k mod n.

Starts three standalone servers on this machine, throttles one of them (stopped and
continued in turn, so it runs a fraction of the time), and reads the same request
through one AsyncVideo over all three, dealt two ways in alternating rounds:

* ``by pace``: what the client does (each server's share in proportion to its measured
  pace, the rest dealt again when the slowest share would hold the caller up);
* ``k mod n``: the old dealing, for comparison (dealing again turned off, equal shares).

Reports frames/s (median and spread of the rounds) and each server's chunks, and checks
every frame against a sequential PyAV decode.

    python benchmarks/multi_server.py [--rounds 3] [--duty 0.2] [VIDEO]
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np

from asyncframes import AsyncVideo, _deal
from asyncframes._sample import write_clip


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncframes", "serve", "--bind", "tcp://127.0.0.1:*", "--root", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(60):
            proc.kill()
            raise SystemExit("a server did not start within 60 s")
    return proc, proc.stdout.readline().split()[-1]


def throttle(proc: subprocess.Popen, duty: float, stop: threading.Event, period: float = 0.2) -> None:
    """Let ``proc`` run ``duty`` of each ``period``, stopped the rest."""
    while not stop.is_set():
        proc.send_signal(signal.SIGSTOP)
        stop.wait(period * (1 - duty))
        proc.send_signal(signal.SIGCONT)
        stop.wait(period * duty)


def reference(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", help="a video (default: a generated 1,800-frame 320x240 clip, 30-frame GOPs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duty", type=float, default=0.2, help="the fraction of the time the slow server runs")
    parser.add_argument("--frames-per-chunk", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.video:
            video = root / Path(args.video).name
            os.symlink(os.path.abspath(args.video), video)
        else:
            video = root / "long_gop30.mp4"
            write_clip(video, codec="libx264", frames=1800, gop=30, size=(240, 320))
        ref = reference(video)
        idxs = list(range(len(ref)))
        servers = [start_server(root) for _ in range(3)]
        stop = threading.Event()
        thread = threading.Thread(target=throttle, args=(servers[2][0], args.duty, stop), daemon=True)
        thread.start()
        results: dict[str, list[float]] = {"by pace": [], "k mod n": []}
        shares: dict[str, dict[str, int]] = {}
        wrong = 0
        saved = _deal.REDEAL_RATIO
        try:
            for _ in range(args.rounds):
                for how in results:
                    _deal.REDEAL_RATIO = saved if how == "by pace" else float("inf")
                    with AsyncVideo([endpoint for _, endpoint in servers], timeout=60) as client:  # no paces yet
                        start = time.perf_counter()
                        client.load_by_chunk(video.name, idxs, frames_per_chunk=args.frames_per_chunk)
                        for chunk_idxs, frames in client.chunks:
                            wrong += sum(not np.array_equal(f, ref[i]) for i, f in zip(chunk_idxs, frames))
                        results[how].append(len(idxs) / (time.perf_counter() - start))
                        shares[how] = client.chunks_by_endpoint
        finally:
            _deal.REDEAL_RATIO = saved
            stop.set()
            thread.join()
            for proc, _ in servers:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                proc.wait(10)

    print(f"{len(idxs)} frames, 3 servers on this machine, the third running {args.duty:.0%} of the time; "
          f"{args.rounds} alternating rounds, a fresh AsyncVideo each")
    print(f"{'dealing':<10} {'frames/s median':>16} {'spread':>14}   chunks per server (last round)")
    for how, fps in results.items():
        counts = " / ".join(str(n) for n in shares[how].values())
        print(f"{how:<10} {statistics.median(fps):>16,.0f} {min(fps):>6,.0f}-{max(fps):<7,.0f}   {counts}")
    ratio = statistics.median(results["by pace"]) / statistics.median(results["k mod n"])
    print(f"by pace / k mod n: {ratio:.2f}x; frames not exact: {wrong}")


if __name__ == "__main__":
    main()
