"""The ``asyncframes`` command: inspect videos, stream frames end to end, run and probe servers."""

from __future__ import annotations

import argparse
import faulthandler
import ipaddress
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import attrs

from ._config import add_options, config_from
from ._version import __version__
from .errors import AsyncFramesError

log = logging.getLogger("asyncframes._cli")

DEFAULT_BIND = "tcp://127.0.0.1:9010"

#: Log levels ``serve --log-level`` takes (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

FRAMES_SYNTAX = "FRAME or START:STOP[:STEP] with whole numbers >= 0 (STEP >= 1; no STOP: to the end)"


# -- argument types: each names the bad value and what is allowed (argparse adds the option's name) --


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (allowed: {low} or more)") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is too small (allowed: {low} or more)")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _bounded_float(text, strict=True)


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _bounded_float(text, strict=False)


def _bounded_float(text: str, strict: bool) -> float:
    allowed = "a number greater than 0" if strict else "a number, 0 or more"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (allowed: {allowed})") from None
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (allowed: {allowed})")
    return value


def frames_spec(text: str) -> slice:
    """``FRAME`` or ``START:STOP[:STEP]`` as a slice of non-negative ints (STOP may be omitted: to the end)."""
    parts = text.split(":")
    if len(parts) > 3 or not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not {FRAMES_SYNTAX}")
    try:
        numbers = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {FRAMES_SYNTAX}") from None
    if any(n is not None and n < 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"{text!r} has a negative number; allowed: {FRAMES_SYNTAX}")
    if len(numbers) == 1:
        if numbers[0] is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not {FRAMES_SYNTAX}")
        return slice(numbers[0], numbers[0] + 1, 1)
    start, stop, step = (numbers + [None])[:3]
    if step == 0:
        raise argparse.ArgumentTypeError(f"{text!r} has STEP 0; allowed: {FRAMES_SYNTAX}")
    return slice(start or 0, stop, step or 1)


def endpoint_arg(text: str) -> str:
    """A ZeroMQ endpoint we can use: ``tcp://HOST:PORT`` (PORT 0-65535, or ``*`` to bind any) or ``ipc://PATH``."""
    allowed = "tcp://HOST:PORT (PORT 1-65535, or * when binding) or ipc://PATH"
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("tcp", "ipc") or not rest:
        raise argparse.ArgumentTypeError(f"{text!r} is not an endpoint (allowed: {allowed})")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not (port == "*" or (port.isdigit() and 1 <= int(port) <= 65535)):
            raise argparse.ArgumentTypeError(f"{text!r} is not an endpoint (allowed: {allowed})")
    return text


def key_name(text: str) -> str:
    """A plain file name (no folder), for ``keygen --name``."""
    if not text or text in (".", "..") or "/" in text or os.sep in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain file name (allowed: a name without '/', e.g. 'laptop')")
    return text


def log_level(text: str) -> str:
    """One of :data:`LOG_LEVELS`, any case."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level (allowed: {', '.join(LOG_LEVELS)})")
    return text.upper()


def _client(args: argparse.Namespace, **options: Any) -> Any:
    """An AsyncVideo for the command's options: a private server, or the given endpoint(s)."""
    from ._client import AsyncVideo

    endpoints = getattr(args, "endpoint", None) or None
    if endpoints and "start_timeout" not in options:
        options["start_timeout"] = args.timeout  # how long to try reaching a running server
    return AsyncVideo(
        endpoints,
        timeout=args.timeout,
        curve_secret=args.curve_secret,
        curve_server_key=args.curve_server_key,
        **options,
    )


def _video_arg(args: argparse.Namespace) -> str:
    if args.video:
        return args.video
    if getattr(args, "endpoint", None):
        args.parser.error("name a VIDEO (a path the server can open) when using --endpoint")
    from ._sample import sample_video

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


def frames_range(frames: Optional[slice], frame_count: int) -> Optional[range]:
    """The frames ``--frames`` asks for (see :func:`frames_spec`); None means every frame.

    An omitted STOP means the end of the video; an explicit one past the end is
    kept, so the server reports the first index that does not exist.
    """
    if frames is None:
        return None
    stop = frame_count if frames.stop is None else frames.stop
    return range(frames.start, stop, frames.step)


def _cmd_stream(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    video = _video_arg(args)
    started = time.perf_counter()
    with _client(args) as client:
        ready = time.perf_counter()
        info = client.info(video)
        print(f"video   {info.filename}")
        print(f"        {info.frame_count} frames, {info.width}x{info.height}x{info.channels}, {info.fps:g} fps, {info.codec}")
        selected = frames_range(args.frames, info.frame_count)
        client.load_by_chunk(video, selected, args.frames_per_chunk)
        first = time.perf_counter()
        frames = chunks = nbytes = 0
        # A progress bar on stderr when it is a terminal (disable=None), in frames.
        with tqdm(total=info.frame_count if selected is None else len(selected), unit="frame", disable=None if args.progress else True, leave=False) as bar:
            for frame_idxs, array in client.chunks:
                chunks += 1
                frames += len(frame_idxs)
                nbytes += array.nbytes
                bar.update(len(frame_idxs))
                if args.verbose:
                    bar.write(f"chunk {chunks - 1:5d}  frames {frame_idxs[0]}..{frame_idxs[-1]}  shape {array.shape}")
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
    from ._transport import create_keys

    try:
        public, secret = create_keys(args.directory, args.name)
    except OSError as exc:
        args.parser.error(f"cannot write keys into {args.directory}: {exc.strerror or exc}")
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
    """Serve until stopped; a private server's folder (``--private-dir``) goes however it ends."""
    from ._process import remove_own_private_dir

    try:
        return _serve(args)
    finally:
        if args.private_dir:
            remove_own_private_dir(args.private_dir)


def _private_dir(text: str) -> str:
    """``--private-dir``: the folder a client made for this private server (removed when it exits)."""
    from ._process import is_private_dir

    if not os.path.isdir(text) or not is_private_dir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a private server folder (allowed: an asyncframes-* folder holding at most server.sock)")
    return text


def _serve(args: argparse.Namespace) -> int:
    import zmq

    from ._process import READY_LINE
    from ._server import FrameServer
    from ._transport import ServerCurve

    if bool(args.curve_secret) != bool(args.allow_client_keys):
        args.parser.error("--curve-secret and --allow-client-keys go together (give both, or neither)")
    root = None if args.unconfined else os.path.abspath(args.root)
    if root is not None and not os.path.isdir(root):
        args.parser.error(f"argument --root: {root} is not a directory (allowed: an existing folder)")
    if args.allow_client_keys and not os.path.isdir(args.allow_client_keys):
        args.parser.error(f"argument --allow-client-keys: {args.allow_client_keys} is not a directory (allowed: a folder of client .key files)")
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s asyncframes-server %(levelname)s %(message)s"
    )
    if args.lifeline:
        # A private server belongs to its client: Ctrl-C goes to the client, which stops us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    binds = args.bind or [DEFAULT_BIND]
    curve = ServerCurve.load(args.curve_secret, args.allow_client_keys) if args.curve_secret else None
    config = config_from(
        args, root=root, allow_stop=args.allow_stop, shared_memory=not args.no_shared_memory, index_cache=args.index_cache
    )
    try:
        server = FrameServer(binds, config, lifeline_fd=sys.stdin.fileno() if args.lifeline else None, curve=curve)
    except zmq.ZMQError as exc:
        where = binds[0] if len(binds) == 1 else "one of " + ", ".join(binds)
        args.parser.error(f"argument --bind: cannot listen on {where}: {exc.strerror} (allowed: a free port, or * for any)")
    signal.signal(signal.SIGTERM, lambda *_: server.stop("terminated"))
    # `kill -USR1 <pid>` writes every thread's stack to the log at once, and what the server
    # holds and waits for as soon as its main thread runs Python again (between two bytecodes,
    # or when a wait returns): what a server that seems stuck is doing.
    signal.signal(signal.SIGUSR1, lambda *_: server.log_state())
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=True)
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
    parser.add_argument("--rounds", type=positive_int, default=3, help="rounds of every comparison (default 3)")
    parser.add_argument("--frames-per-chunk", type=positive_int, default=64)
    parser.add_argument("--random", type=positive_int, default=100, help="random indices in the random-access request (default 100)")
    parser.add_argument("--scrub", type=positive_int, default=20, help="random single frames per round for scrubbing (default 20)")
    parser.add_argument("--memory-frames", type=non_negative_int, default=10_000, help="frames streamed to the slow consumer (0: skip)")
    parser.add_argument("--clips", type=non_negative_int, default=200, help="random 8-frame training clips over the videos (0: skip)")
    parser.add_argument("--workers", type=positive_int, nargs="*", default=None, help="worker counts to compare (default 1 2 N; none given: skip)")
    parser.add_argument("--scale-out", action="store_true", help="also spread one request over 1, 2 and 3 loopback servers")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")


def _cmd_bench(args: argparse.Namespace) -> int:
    from ._bench import run

    for video in args.videos:
        if not os.path.isfile(video):
            args.parser.error(f"argument VIDEO: {video} is not a file (allowed: existing video files)")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            args.parser.error(f"argument --json: cannot write {args.json}: {folder} is not a writable folder")
    import av

    try:
        return run(args)
    except av.error.FFmpegError as exc:  # the bench decodes in this process too
        print(f"asyncframes: error: cannot decode {exc.filename or 'a video'}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _add_client_options(parser: argparse.ArgumentParser, *, endpoint: bool = True, timeout: float = 60.0) -> None:
    if endpoint:
        parser.add_argument(
            "--endpoint", action="append", type=endpoint_arg, help="use a running server (repeatable: spread over several); default: start a private one"
        )
    parser.add_argument("--timeout", type=positive_float, default=timeout, help="seconds to wait for an answer")
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
    info.set_defaults(func=_cmd_info, parser=info)

    stream = sub.add_parser("stream", aliases=["demo"], help="stream frames through a frame server and report throughput")
    stream.add_argument("video", nargs="?", help="video file; omitted: the built-in sample clip")
    stream.add_argument("--frames", type=frames_spec, help="FRAME or START:STOP[:STEP] (default: every frame)")
    stream.add_argument("--frames-per-chunk", type=positive_int, default=64)
    stream.add_argument("-v", "--verbose", action="store_true", help="print every chunk")
    stream.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (shown only on a terminal)")
    _add_client_options(stream)
    stream.set_defaults(func=_cmd_stream, parser=stream)

    ping = sub.add_parser("ping", help="check that a server answers (exit 0) or not (exit 1)")
    ping.add_argument("endpoint", type=endpoint_arg, help="e.g. tcp://127.0.0.1:9010")
    ping.add_argument(
        "--any-answer", action="store_true", help="a server that refuses our credentials counts as up (health checks)"
    )
    _add_client_options(ping, endpoint=False, timeout=5.0)
    ping.set_defaults(func=_cmd_ping, parser=ping)

    keygen = sub.add_parser("keygen", help="make a CURVE key pair (NAME.key public, NAME.key_secret private)")
    keygen.add_argument("directory")
    keygen.add_argument("--name", type=key_name, default="asyncframes", help="file name of the pair (default asyncframes)")
    keygen.set_defaults(func=_cmd_keygen, parser=keygen)

    bench = sub.add_parser("bench", help="measure asyncframes side by side with in-process PyAV, in one run")
    _add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench, parser=bench)

    serve = sub.add_parser("serve", help="run a frame server until SIGINT/SIGTERM")
    serve.add_argument("--bind", action="append", type=endpoint_arg, help=f"endpoint to listen on, repeatable (default {DEFAULT_BIND})")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--root", default=".", help="serve videos under this folder only (default: the current folder)")
    where.add_argument("--unconfined", action="store_true", help="serve any path the server user can read")
    serve.add_argument("--curve-secret", help="the server's .key_secret file: require CURVE")
    serve.add_argument("--allow-client-keys", help="folder of client public .key files that may connect")
    add_options(  # every limit, its default written once in config.ServerConfig
        serve,
        {
            ("count", False): positive_int,
            ("count", True): non_negative_int,
            ("mb", False): positive_float,
            ("mb", True): non_negative_float,
            ("seconds", False): positive_float,
            ("seconds", True): non_negative_float,
        },
    )
    serve.add_argument(
        "--no-shared-memory", action="store_true", help="always send frames inline, never in shared memory"
    )
    serve.add_argument(
        "--index-cache",
        metavar="DIR",
        help="keep frame indexes here, so a new server opens long videos at once ('off': never; "
        "default: $ASYNCFRAMES_INDEX_CACHE, else ~/.cache/asyncframes/index)",
    )
    serve.add_argument("--log-level", type=log_level, default="INFO", help="DEBUG, INFO (one line per request), WARNING, ERROR")
    serve.add_argument("--lifeline", action="store_true", help="exit when stdin closes (private servers)")
    serve.add_argument("--allow-stop", action="store_true", help="let clients stop the server (private servers)")
    serve.add_argument("--private-dir", type=_private_dir, help=argparse.SUPPRESS)  # removed on exit (private servers)
    serve.set_defaults(func=_cmd_serve, parser=serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; every failure is one line on stderr and a non-zero exit (2: bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AsyncFramesError as exc:
        print(f"asyncframes: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file the command itself reads or writes (not the server's)
        if isinstance(exc, BrokenPipeError):  # e.g. piped into head
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"asyncframes: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
