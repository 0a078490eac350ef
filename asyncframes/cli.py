"""The ``asyncframes`` command: inspect videos, stream frames end to end, run a server."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Optional, Sequence

import attrs

from . import __version__
from .errors import AsyncFramesError


def _cmd_info(args: argparse.Namespace) -> int:
    from .client import AsyncVideo
    from .sample import sample_video

    video = args.video or str(sample_video())
    with AsyncVideo(timeout=args.timeout) as client:
        info = client.info(video)
    if args.json:
        print(json.dumps(attrs.asdict(info)))
    else:
        for key, value in attrs.asdict(info).items():
            print(f"{key:12s} {value}")
    return 0


def _parse_frames(text: Optional[str]) -> Optional[range]:
    """``START:STOP[:STEP]`` → a range; None means every frame."""
    if not text:
        return None
    parts = [int(p) if p else None for p in text.split(":")]
    if len(parts) == 1:
        return range(parts[0] or 0, (parts[0] or 0) + 1)
    return range(*(slice(*parts).indices(sys.maxsize)))


def _cmd_stream(args: argparse.Namespace) -> int:
    from .client import AsyncVideo
    from .sample import sample_video

    video = args.video or str(sample_video())
    started = time.perf_counter()
    with AsyncVideo(timeout=args.timeout) as client:
        ready = time.perf_counter()
        info = client.info(video)
        print(f"video   {info.filename}")
        print(f"        {info.frame_count} frames, {info.width}x{info.height}x{info.channels}, {info.fps:g} fps, {info.codec}")
        client.load_by_chunk(video, _parse_frames(args.frames), args.frames_per_chunk)
        first = time.perf_counter()
        frames = chunks = nbytes = 0
        for frame_idxs, array in client.chunks:
            chunks += 1
            frames += len(frame_idxs)
            nbytes += array.nbytes
            if args.verbose:
                print(f"chunk {chunks - 1:5d}  frames {frame_idxs[0]}..{frame_idxs[-1]}  shape {array.shape}")
        done = time.perf_counter()
    elapsed = done - first
    print(f"server  started in {ready - started:.2f} s")
    print(f"stream  {frames} frames in {chunks} chunks, {nbytes / 1e6:.1f} MB in {elapsed:.2f} s")
    print(f"        {frames / elapsed if elapsed else 0:.0f} frames/s, {nbytes / 1e6 / elapsed if elapsed else 0:.0f} MB/s")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import READY_LINE, FrameServer, ServerConfig

    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s asyncframes-server %(levelname)s %(message)s"
    )
    if args.lifeline:
        # A private server belongs to its client: Ctrl-C goes to the client, which stops us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = FrameServer(
        args.bind or ["tcp://127.0.0.1:9010"],
        ServerConfig(allow_stop=args.allow_stop),
        lifeline_fd=sys.stdin.fileno() if args.lifeline else None,
    )
    signal.signal(signal.SIGTERM, lambda *_: server.stop("terminated"))
    if not args.lifeline:
        signal.signal(signal.SIGINT, lambda *_: server.stop("interrupted"))
    print(READY_LINE, " ".join(server.endpoints), flush=True)
    server.serve_forever()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncframes", description=__doc__)
    parser.add_argument("--version", action="version", version=f"asyncframes {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a video's metadata (default: the built-in sample)")
    info.add_argument("video", nargs="?", help="video file; omitted: the built-in sample clip")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    info.set_defaults(func=_cmd_info)

    stream = sub.add_parser(
        "stream", aliases=["demo"], help="stream frames through a frame server and report throughput"
    )
    stream.add_argument("video", nargs="?", help="video file; omitted: the built-in sample clip")
    stream.add_argument("--frames", help="START:STOP[:STEP] (default: every frame)")
    stream.add_argument("--frames-per-chunk", type=int, default=64)
    stream.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each chunk")
    stream.add_argument("-v", "--verbose", action="store_true", help="print every chunk")
    stream.set_defaults(func=_cmd_stream)

    serve = sub.add_parser("serve", help="run a frame server")
    serve.add_argument("--bind", action="append", help="endpoint to bind, repeatable (default tcp://127.0.0.1:9010)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--lifeline", action="store_true", help="exit when stdin closes (used by private servers)")
    serve.add_argument("--allow-stop", action="store_true", help="let clients stop the server")
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AsyncFramesError as exc:
        print(f"asyncframes: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
