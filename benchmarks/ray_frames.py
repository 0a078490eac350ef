"""asyncframes.ray.read_frames against ray.data.read_videos, side by side on a local Ray cluster.

Both read every frame of the same videos with the same number of CPUs; the rounds
alternate (ours, theirs, ours, ...) so that a noisy machine affects both alike, and each
reports its median frames/s with the spread of its rounds. Exactness is checked for both
against a plain sequential PyAV decode (frame i = the i-th frame it presents), frame by
frame, by hash.

    pip install 'asyncframes-video[ray]' decord
    python benchmarks/ray_frames.py [--cpus 2] [--rounds 3] [VIDEO ...]

Without videos it writes held-out clips in several containers into a temporary folder
(H.264 with B-frames in mp4, mkv and MPEG-TS, MPEG-4 Part 2 with B-frames in avi, a long
one with 30-frame GOPs).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import ray

from asyncframes._sample import write_clip
from asyncframes.ray import read_frames

CLIPS = {
    "long_gop30.mp4": dict(codec="libx264", frames=1800, gop=30, bframes=2, size=(240, 320)),
    "bframes.mkv": dict(codec="libx264", frames=300, gop=60, bframes=3, size=(240, 320)),
    "camera.ts": dict(codec="libx264", frames=300, gop=30, bframes=2, size=(240, 320)),
    "mpeg4_bframes.avi": dict(codec="mpeg4", frames=300, gop=12, bframes=2, size=(240, 320)),
}


def digest(frame: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).digest()


def reference(path: str) -> list[bytes]:
    """Hashes of every frame of a sequential decode, as RGB."""
    with av.open(path) as container:
        return [digest(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def run_ours(paths: list[str], cpus: int) -> dict[tuple[str, int], bytes]:
    got: dict[tuple[str, int], bytes] = {}
    from asyncframes import Video

    ds = read_frames([Video(p, grayscale=False) for p in paths], override_num_blocks=4 * cpus)
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for frame, i, video in zip(batch["frame"], batch["frame_index"], batch["video"]):
            got[(str(video), int(i))] = digest(frame)
    return got


def run_theirs(paths: list[str], cpus: int) -> dict[tuple[str, int], bytes]:
    got: dict[tuple[str, int], bytes] = {}
    ds = ray.data.read_videos(paths, include_paths=True)
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for frame, i, path in zip(batch["frame"], batch["frame_index"], batch["path"]):
            got[(str(path), int(i))] = digest(frame)
    return got


OURS, THEIRS = "asyncframes read_frames", "ray.data.read_videos"


def measure(paths: list[str], refs: dict[str, list[bytes]], args: argparse.Namespace) -> tuple[dict, dict]:
    """Both readers over ``paths``, in alternating rounds: frames/s per round, and frames not exact per video."""
    rates: dict[str, list[float]] = {OURS: [], THEIRS: []}
    wrong: dict[str, dict[str, int]] = {}
    for _ in range(args.rounds):
        for name, run in ((OURS, run_ours), (THEIRS, run_theirs)):
            start = time.perf_counter()
            got = run(paths, args.cpus)
            rates[name].append(len(got) / (time.perf_counter() - start))
            wrong[name] = {
                Path(p).name: sum(got.get((p, i)) != h for i, h in enumerate(refs[p])) + sum(1 for (q, i) in got if q == p and i >= len(refs[p]))
                for p in paths
            }
    return rates, wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="*")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--together-only", action="store_true", help="skip reading each video alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(Path(v).resolve()) for v in args.videos]
        if not paths:
            for name, spec in CLIPS.items():
                paths.append(str(write_clip(Path(tmp) / name, **spec)))
        refs = {p: reference(p) for p in paths}
        total = sum(len(r) for r in refs.values())
        print(f"{len(paths)} videos, {total} frames; Ray with {args.cpus} CPUs")
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Theirs reads through pyarrow's file system: it is handed the same local paths.
        together = measure(paths, refs, args)
        each = {Path(p).name: measure([p], refs, args) for p in paths} if not args.together_only else {}
        ray.shutdown()
    print(f"{'reader':26s} {'frames/s (median)':>18s} {'spread':>16s}  frames not exact (of each video's)")
    rates, wrong = together
    for name, r in rates.items():
        bad = ", ".join(f"{v}: {n}/{len(refs[p])}" for (v, n), p in zip(wrong[name].items(), refs))
        print(f"{name:26s} {statistics.median(r):18.0f} {min(r):7.0f}-{max(r):<8.0f}  {bad}")
    ratio = statistics.median(rates[OURS]) / statistics.median(rates[THEIRS])
    print(f"ratio read_frames / read_videos: {ratio:.2f}x (median of {args.rounds} alternating rounds)")
    if each:
        print("\neach video alone (frames/s, median of alternating rounds; not exact: of the video's frames)")
        print(f"{'video':22s} {'read_frames':>12s} {'read_videos':>12s} {'ratio':>7s}  {'not exact: ours':>16s} {'theirs':>7s}")
        for video, (rates, wrong) in each.items():
            ours, theirs = statistics.median(rates[OURS]), statistics.median(rates[THEIRS])
            print(f"{video:22s} {ours:12.0f} {theirs:12.0f} {ours / theirs:6.2f}x  {wrong[OURS][video]:16d} {wrong[THEIRS][video]:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
