"""A server's limits and policies, and the ``asyncframes serve`` options that set them.

Every default is written once, here: :class:`ServerConfig` holds it and :data:`OPTIONS`
turns each field into a command-line option with that default (sizes in MiB on the
command line, bytes in the config). Importing this module costs only ``attrs``, so the
command line can build its parser without loading the server.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

import attrs

MiB = 1024 * 1024


@attrs.frozen
class ServerConfig:
    """Limits and policies of one server."""

    #: Requests name files under this folder; None serves any path the server can read.
    root: Optional[str] = None
    max_request_frames: int = 10_000_000
    max_frames_per_chunk: int = 1024
    max_window: int = 8
    max_open_files: int = 8
    max_requests_per_client: int = 4
    #: Bytes of decoded frames kept per request for its later chunks (0: none) ...
    request_cache_bytes: int = 256 * 1024 * 1024
    #: ... and by all requests together: active requests share it equally (idle ones get
    #: what is left), so a request's share shrinks as others arrive.
    total_cache_bytes: int = 1024 * 1024 * 1024
    #: Largest chunk in bytes (frames_per_chunk x frame size): bounds memory per chunk in flight.
    #: Never more than ``client_inline_bytes``: a chunk must fit a client's share.
    max_chunk_bytes: int = 512 * 1024 * 1024
    #: Inline chunk bytes queued in ZeroMQ but not yet sent, all clients together; a request
    #: whose next chunk would go over waits (others are served) until bytes are sent.
    max_inline_bytes: int = 2 * 1024 * 1024 * 1024
    #: ... and for one client: what a client that stops reading can pin.
    client_inline_bytes: int = 512 * 1024 * 1024
    #: Sent chunk buffers kept for reuse (fresh memory costs page faults); freed when idle.
    buffer_pool_bytes: int = 512 * 1024 * 1024
    #: How many frames ahead a request's cache looks for frames to keep.
    cache_lookahead_frames: int = 8192
    #: Bytes of frames kept from recent small requests (scrubbing: the same frame asked again).
    recent_cache_bytes: int = 128 * 1024 * 1024
    #: Requests of at most this many frames count as small.
    recent_request_frames: int = 8
    #: Frames around the last small request decoded into that cache while the server is idle.
    read_around_frames: int = 24
    #: Honour :class:`Stop` from clients (private servers only).
    allow_stop: bool = False
    #: Seconds between liveness pings of known clients (a client gone silently is found by the failed send).
    ping_interval: float = 2.0
    #: Offer shared-memory chunks to clients on this machine that can reach them.
    shared_memory: bool = True
    #: Shared memory for chunk slots, all clients together; beyond it chunks go inline.
    max_shared_bytes: int = 4 * 1024 * 1024 * 1024
    #: Decoder threads that share each chunk that splits evenly by GOP (0: one per two CPUs,
    #: at least two from two CPUs on; see :func:`asyncframes._pool.default_workers`).
    workers: int = 0
    #: Decoder worker processes that share each chunk going to shared memory, split by GOP
    #: and written straight into the slot (0: off, threads decode everything); see
    #: :mod:`asyncframes._procpool`. Off by default: on a 2-CPU machine it does not pay.
    worker_processes: int = 0
    #: Exit after this many seconds without a client (0: never); a per-user server's way out.
    idle_exit: float = 0.0
    #: Folder of frame indexes kept on disk ("off": none; None: ``$ASYNCFRAMES_INDEX_CACHE``
    #: or the user's cache folder; see :mod:`asyncframes._index_store`).
    index_cache: Optional[str] = None


@attrs.frozen
class Option:
    """One ``asyncframes serve`` option that sets a :class:`ServerConfig` field."""

    flag: str
    field: str
    help: str
    #: "count": an integer as it is; "mb": MiB on the command line, bytes in the config;
    #: "seconds": a number of seconds as it is.
    unit: str = "count"
    #: 0 is allowed (it turns the thing off).
    zero: bool = False

    def default(self) -> Any:
        value = getattr(ServerConfig(), self.field)
        return value / MiB if self.unit == "mb" else value

    def to_config(self, value: Any) -> Any:
        return int(value * MiB) if self.unit == "mb" else value


OPTIONS: tuple[Option, ...] = (
    Option("--max-request-frames", "max_request_frames", "largest request, in frames"),
    Option("--max-frames-per-chunk", "max_frames_per_chunk", "largest chunk, in frames"),
    Option("--max-open-files", "max_open_files", "videos kept open (least recently used are closed)"),
    Option("--max-requests-per-client", "max_requests_per_client", "concurrent requests per client"),
    Option("--max-chunk-mb", "max_chunk_bytes", "largest chunk in MiB (frames x frame size)", "mb"),
    Option("--max-inline-mb", "max_inline_bytes", "chunk bytes queued for sending, all clients together (MiB)", "mb"),
    Option("--client-inline-mb", "client_inline_bytes", "chunk bytes queued for sending to one client (MiB)", "mb"),
    Option("--buffer-pool-mb", "buffer_pool_bytes", "sent chunk buffers kept for reuse (MiB)", "mb", zero=True),
    Option("--request-cache-mb", "request_cache_bytes", "decoded frames kept per request for its later chunks (0: off)", "mb", zero=True),
    Option("--cache-mb", "total_cache_bytes", "decoded frames kept by all requests together (MiB)", "mb", zero=True),
    Option("--recent-cache-mb", "recent_cache_bytes", "frames of recent small requests kept for scrubbing (0: off)", "mb", zero=True),
    Option("--workers", "workers", "decoder threads sharing each chunk that splits evenly by GOP (0: one per 2 CPUs, at least 2)", zero=True),
    Option("--worker-processes", "worker_processes", "decoder processes sharing each shared-memory chunk, split by GOP (0: off, threads)", zero=True),
    Option("--max-shared-mb", "max_shared_bytes", "shared memory for chunks, all clients together (beyond: inline)", "mb", zero=True),
    Option("--ping-interval", "ping_interval", "seconds between liveness pings of clients", "seconds"),
    Option("--idle-exit", "idle_exit", "exit after this many seconds without a client (0: never)", "seconds", zero=True),
)


def add_options(parser: argparse.ArgumentParser, types: "dict[tuple[str, bool], Callable[[str], Any]]") -> None:
    """Add every :data:`OPTIONS` entry to ``parser``; ``types[(unit, zero)]`` parses its value."""
    for option in OPTIONS:
        default = option.default()
        parser.add_argument(
            option.flag,
            dest=option.field,
            type=types[(option.unit, option.zero)],
            default=default,
            metavar={"mb": "MB", "seconds": "S"}.get(option.unit, "N"),
            help=f"{option.help} (default {default:g})",
        )


def config_from(args: argparse.Namespace, **more: Any) -> ServerConfig:
    """The :class:`ServerConfig` that parsed ``args`` (from :func:`add_options`) and ``more`` describe."""
    values = {option.field: option.to_config(getattr(args, option.field)) for option in OPTIONS}
    return ServerConfig(**values, **more)


__all__ = ["MiB", "OPTIONS", "Option", "ServerConfig", "add_options", "config_from"]
