"""Host-side half of docker/smoke.sh: stream frames from the container and compare every pixel.

    python docker/smoke_check.py ENDPOINT HOST_VIDEO_DIR

Each video in HOST_VIDEO_DIR (mounted at /data in the container) is read
through the container, shuffled with duplicates, and compared with a local
sequential PyAV decode of the same file. Also checks that the container
refuses paths outside /data.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import av
import numpy as np

from asyncframes import AsyncVideo, VideoAccessError

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".ts", ".avi", ".mov"}


def reference(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def main() -> int:
    endpoint, folder = sys.argv[1], Path(sys.argv[2])
    videos = sorted(p for p in folder.iterdir() if p.suffix in VIDEO_SUFFIXES)
    assert videos, f"no videos in {folder}"
    with AsyncVideo(endpoint, timeout=60) as client:
        print(f"smoke: connected to asyncframes {client.server_version} at {endpoint} ({client.ping() * 1000:.1f} ms)")
        for path in videos:
            ref = reference(path)
            info = client.info(path.name)
            assert info.frame_count == len(ref), f"{path.name}: {info.frame_count} frames, sequential decode has {len(ref)}"
            rng = np.random.default_rng(0)
            idxs = [int(i) for i in rng.permutation(len(ref))] + [int(i) for i in rng.integers(0, len(ref), 20)]
            start = time.perf_counter()
            client.load_by_chunk(path.name, idxs, frames_per_chunk=32)
            got = []
            for chunk_idxs, frames in client.chunks:
                for i, frame in zip(chunk_idxs, frames):
                    expected = ref[i] if frame.shape[-1] == 3 else ref[i][..., :1]
                    assert np.array_equal(frame, expected), f"{path.name}: frame {i} differs from the sequential decode"
                got += chunk_idxs
            assert got == idxs, f"{path.name}: frames arrived out of order"
            elapsed = time.perf_counter() - start
            print(f"smoke: {path.name}: {len(idxs)} frames ({info.width}x{info.height}x{info.channels}) pixel-exact, "
                  f"{len(idxs) / elapsed:.0f} frames/s through the container")
        try:
            client.info("/etc/passwd")
        except VideoAccessError as exc:
            print(f"smoke: outside paths refused: {exc}")
        else:
            raise AssertionError("the container served a path outside /data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
