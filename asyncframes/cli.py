"""The ``asyncframes`` command: inspect videos, stream frames end to end, run and probe servers."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import attrs

from . import __version__
from .errors import AsyncFramesError

log = logging.getLogger("asyncframes.cli")

DEFAULT_BIND = "tcp://127.0.0.1:9010"


def _client(args: argparse.Namespace, **options: Any) -> Any:
    """An AsyncVideo for the command's options: a private server, or the given endpoint(s)."""
    from .client import AsyncVideo

    return AsyncVideo(
        getattr(args, "endpoint", None) or None,
        timeout=args.timeout,
        curve_secret=args.curve_secret,
        curve_server_key=args.curve_server_key,
        **options,
    )


def _video_arg(args: argparse.Namespace) -> str:
    if args.video:
        return args.video
    if getattr(args, "endpoint", None):
        raise SystemExit("asyncframes: error: name a VIDEO (a path the server can open) when using --endpoint")
    from .sample import sample_video

    return str(sample_video())


def _cmd_info(args: argparse.Namespace) -> int:
    video = _video_arg(args)
    with _client(args) as client:
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
    video = _video_arg(args)
    started = time.perf_counter()
    with _client(args) as client:
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
        spread = client.chunks_by_endpoint
    elapsed = done - first
    print(f"server  {'connected' if args.endpoint else 'started'} in {ready - started:.2f} s")
    if len(spread) > 1:
        print("        " + ", ".join(f"{endpoint}: {n} chunks" for endpoint, n in spread.items()))
    print(f"stream  {frames} frames in {chunks} chunks, {nbytes / 1e6:.1f} MB in {elapsed:.2f} s")
    print(f"        {frames / elapsed if elapsed else 0:.0f} frames/s, {nbytes / 1e6 / elapsed if elapsed else 0:.0f} MB/s")
    return 0


def _cmd_ping(args: argparse.Namespace) -> int:
    from .errors import AuthenticationError

    try:
        with _client(args, start_timeout=args.timeout) as client:
            rtt = client.ping()
            print(f"pong from {client.endpoint}: asyncframes {client.server_version}, {rtt * 1000:.1f} ms")
    except AuthenticationError as exc:
        if not args.any_answer:
            raise
        print(f"{args.endpoint} is up but will not talk to us: {exc}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from .transport import create_keys

    public, secret = create_keys(args.directory, args.name)
    print(f"public key  {public}   (give this to the other side)")
    print(f"secret key  {secret}   (keep private)")
    return 0


def _is_loopback(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://"):
        return True  # ipc and inproc stay on this machine
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or "*"


def _cmd_serve(args: argparse.Namespace) -> int:
    from .pool import default_workers
    from .process import READY_LINE
    from .server import FrameServer, ServerConfig
    from .transport import ServerCurve

    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s asyncframes-server %(levelname)s %(message)s"
    )
    if args.lifeline:
        # A private server belongs to its client: Ctrl-C goes to the client, which stops us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if bool(args.curve_secret) != bool(args.allow_client_keys):
        raise SystemExit("asyncframes: error: --curve-secret and --allow-client-keys go together")
    root = None if args.unconfined else os.path.abspath(args.root)
    if root is not None and not os.path.isdir(root):
        raise SystemExit(f"asyncframes: error: --root {root} is not a directory")
    binds = args.bind or [DEFAULT_BIND]
    curve = ServerCurve.load(args.curve_secret, args.allow_client_keys) if args.curve_secret else None
    config = ServerConfig(
        root=root,
        max_request_frames=args.max_request_frames,
        max_frames_per_chunk=args.max_frames_per_chunk,
        max_open_files=args.max_open_files,
        max_requests_per_client=args.max_requests_per_client,
        request_cache_bytes=int(args.request_cache_mb * 1024 * 1024),
        total_cache_bytes=int(args.cache_mb * 1024 * 1024),
        max_chunk_bytes=int(args.max_chunk_mb * 1024 * 1024),
        max_inline_bytes=int(args.max_inline_mb * 1024 * 1024),
        client_inline_bytes=int(args.client_inline_mb * 1024 * 1024),
        buffer_pool_bytes=int(args.buffer_pool_mb * 1024 * 1024),
        allow_stop=args.allow_stop,
        workers=args.workers or default_workers(),
        shared_memory=not args.no_shared_memory,
        max_shared_bytes=int(args.max_shared_mb * 1024 * 1024),
    )
    server = FrameServer(binds, config, lifeline_fd=sys.stdin.fileno() if args.lifeline else None, curve=curve)
    signal.signal(signal.SIGTERM, lambda *_: server.stop("terminated"))
    if not args.lifeline:
        signal.signal(signal.SIGINT, lambda *_: server.stop("interrupted"))
    exposed = [e for e in server.endpoints if not _is_loopback(e)]
    if exposed and curve is None:
        log.warning(
            "listening on %s without authentication: anyone who can reach it can read every video %s",
            ", ".join(exposed),
            f"under {root}" if root else "this server can read",
        )
    log.info(
        "serving %s; CURVE %s",
        f"videos under {root}" if root else "any path (unconfined)",
        f"on, clients from {args.allow_client_keys}" if curve else "off",
    )
    print(READY_LINE, " ".join(server.endpoints), flush=True)
    reason = server.serve_forever()
    log.info("bye (%s)", reason)
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="*", metavar="VIDEO", help="videos to measure (default: generated clips and ../shared/videos)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every comparison (default 3)")
    parser.add_argument("--frames-per-chunk", type=int, default=64)
    parser.add_argument("--random", type=int, default=100, help="random indices in the random-access request (default 100)")
    parser.add_argument("--scrub", type=int, default=20, help="random single frames per round for scrubbing (default 20)")
    parser.add_argument("--memory-frames", type=int, default=10_000, help="frames streamed to the slow consumer (0: skip)")
    parser.add_argument("--workers", type=int, nargs="*", default=None, help="worker counts to compare (default 1 2 N; none given: skip)")
    parser.add_argument("--scale-out", action="store_true", help="also spread one request over 1, 2 and 3 loopback servers")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def _add_client_options(parser: argparse.ArgumentParser, *, endpoint: bool = True, timeout: float = 60.0) -> None:
    if endpoint:
        parser.add_argument(
            "--endpoint", action="append", help="use a running server (repeatable: spread over several); default: start a private one"
        )
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds to wait for an answer")
    parser.add_argument("--curve-secret", help="this client's .key_secret file, for a server that requires CURVE")
    parser.add_argument("--curve-server-key", help="the server's public .key file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncframes", description=__doc__)
    parser.add_argument("--version", action="version", version=f"asyncframes {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a video's metadata (default: the built-in sample)")
    info.add_argument("video", nargs="?", help="video file; omitted: the built-in sample clip")
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_client_options(info)
    info.set_defaults(func=_cmd_info)

    stream = sub.add_parser("stream", aliases=["demo"], help="stream frames through a frame server and report throughput")
    stream.add_argument("video", nargs="?", help="video file; omitted: the built-in sample clip")
    stream.add_argument("--frames", help="START:STOP[:STEP] (default: every frame)")
    stream.add_argument("--frames-per-chunk", type=int, default=64)
    stream.add_argument("-v", "--verbose", action="store_true", help="print every chunk")
    _add_client_options(stream)
    stream.set_defaults(func=_cmd_stream)

    ping = sub.add_parser("ping", help="check that a server answers (exit 0) or not (exit 1)")
    ping.add_argument("endpoint", help="e.g. tcp://127.0.0.1:9010")
    ping.add_argument(
        "--any-answer", action="store_true", help="a server that refuses our credentials counts as up (health checks)"
    )
    _add_client_options(ping, endpoint=False, timeout=5.0)
    ping.set_defaults(func=_cmd_ping)

    keygen = sub.add_parser("keygen", help="make a CURVE key pair (NAME.key public, NAME.key_secret private)")
    keygen.add_argument("directory")
    keygen.add_argument("--name", default="asyncframes")
    keygen.set_defaults(func=_cmd_keygen)

    bench = sub.add_parser("bench", help="measure asyncframes side by side with in-process PyAV, in one run")
    _add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    serve = sub.add_parser("serve", help="run a frame server until SIGINT/SIGTERM")
    serve.add_argument("--bind", action="append", help=f"endpoint to listen on, repeatable (default {DEFAULT_BIND})")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--root", default=".", help="serve videos under this folder only (default: the current folder)")
    where.add_argument("--unconfined", action="store_true", help="serve any path the server user can read")
    serve.add_argument("--curve-secret", help="the server's .key_secret file: require CURVE")
    serve.add_argument("--allow-client-keys", help="folder of client public .key files that may connect")
    serve.add_argument("--max-request-frames", type=int, default=10_000_000, help="largest request, in frames")
    serve.add_argument("--max-frames-per-chunk", type=int, default=1024)
    serve.add_argument("--max-open-files", type=int, default=8, help="videos kept open (least recently used are closed)")
    serve.add_argument("--max-requests-per-client", type=int, default=4, help="concurrent requests per client")
    serve.add_argument("--max-chunk-mb", type=float, default=512, help="largest chunk in MiB (frames x frame size)")
    serve.add_argument(
        "--max-inline-mb", type=float, default=2048, help="chunk bytes queued for sending, all clients together (MiB)"
    )
    serve.add_argument(
        "--client-inline-mb", type=float, default=512, help="chunk bytes queued for sending to one client (MiB)"
    )
    serve.add_argument("--buffer-pool-mb", type=float, default=512, help="sent chunk buffers kept for reuse (MiB)")
    serve.add_argument(
        "--request-cache-mb", type=float, default=256, help="decoded frames kept per request for its later chunks (0: off)"
    )
    serve.add_argument("--cache-mb", type=float, default=1024, help="decoded frames kept by all requests together")
    serve.add_argument(
        "--workers", type=int, default=0, help="decoder threads sharing each chunk, split by GOP (default: one per 2 CPUs)"
    )
    serve.add_argument(
        "--no-shared-memory", action="store_true", help="always send frames inline, never in shared memory"
    )
    serve.add_argument(
        "--max-shared-mb", type=float, default=4096, help="shared memory for chunks, all clients together (beyond: inline)"
    )
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO (one line per request), WARNING")
    serve.add_argument("--lifeline", action="store_true", help="exit when stdin closes (private servers)")
    serve.add_argument("--allow-stop", action="store_true", help="let clients stop the server (private servers)")
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
    except BrokenPipeError:  # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
