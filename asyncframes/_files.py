"""Which file a request names: confinement under a root, the demuxers and options a
confined server gives FFmpeg, image-sequence patterns, and a file's identity.

Everything here is a function of paths and ``os.stat`` results, so the rules can be
tested without opening a video.

*Confinement.* A confined server (``--root``) opens only what lies under its root after
``..`` and symlinks are resolved. FFmpeg's image2 demuxer expands printf patterns
(``img%03d.jpg``) itself, after our check, so for a pattern every file the demuxer could
open is resolved and checked too (:func:`files_ffmpeg_may_open`). URLs and FFmpeg
protocol prefixes (``http://``, ``concat:``, ``pipe:``...) are refused by name.

*Identity.* A file is identified by device, inode, size and nanosecond mtime and ctime
(:class:`FileIdentity`): replacing it (a new inode) or rewriting it in place (a new ctime,
even when size and mtime are restored) changes its identity. An image sequence is
identified by the identities of its files, in order.
"""

from __future__ import annotations

import errno
import functools
import glob
import os
import re
from typing import Callable, Optional, Sequence

import attrs

from .errors import ServerError, VideoAccessError, VideoNotFoundError

#: Demuxers a confined server will open: video containers and image formats, nothing that
#: follows references to other files or URLs (playlists such as HLS, concat lists).
#: (mov's external data references stay off: its ``enable_drefs`` option defaults to off and
#: clients cannot set demuxer options.)
VIDEO_DEMUXERS = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,asf,ogg,ivf,obu,m4v,h264,hevc,"
    "mjpeg,mpegvideo,yuv4mpegpipe,nut,mxf,image2,gif,apng,png_pipe,jpeg_pipe,bmp_pipe,tiff_pipe,webp_pipe"
)

#: image2 looks for the first file of a sequence among this many start numbers (from 0).
START_NUMBER_RANGE = 5
#: image2 keeps the path in a buffer of this many bytes and builds file names in another.
FFMPEG_PATH_BYTES = 1024

#: ``scheme:`` as FFmpeg's protocol lookup sees it, plus its ``subfile,`` special case.
_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*:|subfile,)")

#: errno values that mean the server, not the file, is out of something.
_RESOURCE_ERRNOS = {
    errno.EMFILE: "file descriptors",
    errno.ENFILE: "file descriptors (system-wide)",
    errno.ENOMEM: "memory",
}


def container_options(confined: bool) -> Optional[dict[str, str]]:
    """The FFmpeg options a server opens files with; None (FFmpeg's defaults) when unconfined.

    Confined: only :data:`VIDEO_DEMUXERS`, only the ``file`` protocol, and image2 reads
    printf-numbered sequences exactly as :func:`sequence_files` predicts (no glob).
    """
    if not confined:
        return None
    return {
        "format_whitelist": VIDEO_DEMUXERS,
        "protocol_whitelist": "file",
        "pattern_type": "sequence",
        "start_number": "0",
        "start_number_range": str(START_NUMBER_RANGE),
    }


# -- identity ---------------------------------------------------------------------------


@attrs.frozen(cache_hash=True)
class FileIdentity:
    """What tells one version of a file from another (hashable: caches key frames by it)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdentity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


#: A source's identity: one :class:`FileIdentity` per file FFmpeg reads (several for an
#: image sequence); empty when there is nothing to compare (a URL, an unreadable name).
SourceIdentity = tuple[FileIdentity, ...]


def source_identity(path: str) -> SourceIdentity:
    """The identity of what FFmpeg reads for ``path``; :class:`VideoNotFoundError` if it is gone."""
    if is_pattern(path):
        return tuple(_identity_or_none(p) or _GONE for p in sequence_files(path))
    try:
        return (FileIdentity.of(os.stat(path)),)
    except FileNotFoundError as exc:
        if looks_like_url(path):
            return ()
        raise VideoNotFoundError(f"video not found: {path}") from exc
    except (OSError, ValueError):
        return ()  # unreadable or not a path: FFmpeg will say what is wrong


_GONE = FileIdentity(-1, -1, -1, -1, -1)


def _identity_or_none(path: str) -> Optional[FileIdentity]:
    try:
        return FileIdentity.of(os.stat(path))
    except (OSError, ValueError):
        return None


# -- image-sequence patterns ----------------------------------------------------------


def frame_filename(pattern: str, number: int, buf_size: int = FFMPEG_PATH_BYTES) -> tuple[bool, str]:
    """FFmpeg's ``av_get_frame_filename``: ``pattern`` with its ``%d``/``%0Nd`` replaced by ``number``.

    Returns ``(ok, name)``. ``%%`` is a literal ``%``; any other ``%`` sequence, a second
    ``%d``, or no ``%d`` at all fails, and then ``name`` is what FFmpeg had written so far
    (image2 may still open that). Names are truncated to ``buf_size - 1`` bytes as FFmpeg's are.
    """
    parts = _split(pattern, buf_size) if number >= 0 else None
    if parts is not None:  # the common case, without walking the pattern again
        before, width, after = parts
        return True, before + _digits(width, number) + after
    ok, name, _where = _expand(pattern, number, buf_size)
    return ok, name


def _digits(width: int, number: int) -> str:
    """``%0*d`` printed into FFmpeg's 20-byte buffer."""
    return ("%0*d" % (min(width + (1 if number < 0 else 0), 40), number))[:19]


@functools.lru_cache(maxsize=256)
def _split(pattern: str, buf_size: int) -> Optional[tuple[str, int, str]]:
    """``(before, width, after)`` of a valid pattern whose names always fit FFmpeg's buffer, else None."""
    ok, name, where = _expand(pattern, 0, buf_size)
    if not ok or where is None:
        return None
    start, width = where
    before, after = name[:start], name[start + len(_digits(width, 0)) :]
    if len(os.fsencode(before + after)) + 20 >= buf_size:
        return None  # names may be cut short: leave it to the exact walk
    return before, width, after


def _expand(pattern: str, number: int, buf_size: int) -> tuple[bool, str, Optional[tuple[int, int]]]:
    """The exact walk of ``av_get_frame_filename``; also where the number went (character offset, width)."""
    src = os.fsencode(pattern)
    out = bytearray()
    where: Optional[tuple[int, int]] = None
    limit = buf_size - 1
    p = 0
    while p < len(src):
        c = src[p]
        p += 1
        if c != ord("%"):
            if len(out) < limit:
                out.append(c)
            continue
        nd = 0
        while True:  # FFmpeg: do { digits; c = next } while (isdigit(c))
            while p < len(src) and 0x30 <= src[p] <= 0x39:
                nd = nd * 10 + src[p] - 0x30
                p += 1
            c = src[p] if p < len(src) else 0
            p += 1
            if not 0x30 <= c <= 0x39:
                break
        if c == ord("%"):
            if len(out) < limit:
                out.append(c)
        elif c == ord("d") and where is None:
            digits = _digits(nd, number).encode()
            if len(out) + len(digits) > limit:
                return False, os.fsdecode(bytes(out)), None
            where = (len(os.fsdecode(bytes(out))), nd)
            out += digits
        else:
            return False, os.fsdecode(bytes(out)), None
    return where is not None, os.fsdecode(bytes(out)), where


def is_pattern(path: str) -> bool:
    """Whether image2 would read ``path`` as a numbered sequence (it has one valid ``%d``)."""
    return "%" in path and frame_filename(path, 0)[0]


def _readable(path: str) -> bool:
    """FFmpeg's ``avio_check`` for the file protocol: ``access(R_OK)``."""
    try:
        return os.access(path, os.R_OK)
    except (OSError, ValueError):
        return False


def sequence_files(pattern: str, readable: Callable[[str], bool] = _readable) -> list[str]:
    """Every file image2 reads for ``pattern``, in order (empty if it finds none).

    As FFmpeg does: the first start number in ``0..START_NUMBER_RANGE-1`` whose file
    exists, then the last one by doubling steps; frames are read from the first file on
    and reading stops at the first missing file, so the files are the consecutive ones.
    """
    first = next((n for n in range(START_NUMBER_RANGE) if readable(frame_filename(pattern, n)[1])), None)
    if first is None:
        return []
    last = _last_index(pattern, first, readable)
    files = []
    for n in range(first, last + 1):
        ok, name = frame_filename(pattern, n)
        if not ok or not readable(name):
            break
        files.append(name)
    return files


def _last_index(pattern: str, first: int, readable: Callable[[str], bool]) -> int:
    """FFmpeg's ``find_image_range`` search for the last number (galloping)."""
    last = first
    while True:
        step = 0
        while True:
            probe = 1 if step == 0 else 2 * step
            ok, name = frame_filename(pattern, last + probe)
            if not ok or not readable(name):
                break
            step = probe
            if step >= 1 << 30:
                return last
        if step == 0:
            return last
        last += step


def files_ffmpeg_may_open(path: str) -> list[str]:
    """Every name FFmpeg's demuxers might open when asked for ``path`` (``path`` first).

    Besides ``path``: for a pattern, the files of its sequence; for a name with a stray
    ``%`` or too long for image2's buffer, the truncated name image2 falls back to.
    """
    names = [path]
    if is_pattern(path):
        names += sequence_files(path)
    else:
        truncated = frame_filename(path, 0)[1]
        if truncated and truncated != path:
            names.append(truncated)
    return names


# -- image folders, globs, lists ---------------------------------------------------------

#: What a folder or a glob is taken to hold when it names images (by extension, any case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".gif")
_GLOB = re.compile(r"[*?[]")
_NUMBERS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key in which ``img2`` comes before ``img10`` (digit runs compare as numbers)."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in _NUMBERS.split(name) if part)


def image_files(filename: str, files: Sequence[str] = (), root: Optional[str] = None) -> Optional[list[str]]:
    """The image files a video spec names, in frame order; None when it names a video file
    (or an image2 sequence that FFmpeg starts by itself).

    * ``files`` given: those files, in that order.
    * a folder: its image files (:data:`IMAGE_EXTENSIONS`), sorted naturally (img2 before img10).
    * a glob (``frames/*.png``) that is not itself a file: its matches, sorted naturally.
    * a printf pattern (``frame_%04d.png``) whose first number lies beyond where image2 looks
      (0 to 4): its files from the lowest number found in the folder, while they continue.

    On a confined server (``root``), every file must lie under the root, as :func:`confine` says.

    Raises:
        VideoNotFoundError: a folder, glob or pattern with no images (naming it).
        VideoAccessError: a file outside the root.
    """
    shown = filename
    base = (lambda name: confine(root, name)) if root is not None else (lambda name: name)
    if files:
        return [base(f) for f in files]
    path = base(filename) if root is None or not _GLOB.search(filename) else os.path.join(os.path.realpath(root), filename)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise VideoNotFoundError(f"{shown}: a folder with no images ({', '.join(IMAGE_EXTENSIONS)})")
        return [base(f) if root is not None else f for f in sorted(found, key=natural_key)]
    if _GLOB.search(filename) and not os.path.lexists(path):
        found = [f for f in glob.glob(path) if os.path.isfile(f)]
        if not found:
            raise VideoNotFoundError(f"{shown}: no file matches this pattern")
        return [base(f) if root is not None else f for f in sorted(found, key=natural_key)]
    if is_pattern(path) and not sequence_files(path):
        numbered = _numbered_from_listing(path)
        if not numbered:
            raise VideoNotFoundError(f"{shown}: no file of this numbered sequence exists")
        return [base(f) if root is not None else f for f in numbered]
    return None


def _numbered_from_listing(pattern: str) -> list[str]:
    """The files of ``pattern``'s sequence from the lowest number present in its folder, while
    consecutive numbers exist (what image2 reads from a start number it was told)."""
    folder = os.path.dirname(pattern) or "."
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    present = {}
    for name in names:
        for n in _numbers_in(name):
            ok, candidate = frame_filename(pattern, n)
            if ok and os.path.basename(candidate) == name:
                present[n] = os.path.join(folder, name)
    if not present:
        return []
    out, n = [], min(present)
    while n in present:
        out.append(present[n])
        n += 1
    return out


def _numbers_in(name: str) -> list[int]:
    return [int(run) for run in _NUMBERS.findall(name)]


# -- confinement ----------------------------------------------------------------------


def looks_like_url(name: str) -> bool:
    """Whether FFmpeg would read ``name`` as a URL or protocol (``http://``, ``file:``, ``concat:``)."""
    return bool(_URL.match(name))


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or os.path.commonpath([real, real_root]) == real_root


def _realpath(name: str, shown: str) -> str:
    try:
        return os.path.realpath(name)
    except OSError as exc:
        raise VideoAccessError(
            f"{shown}: cannot be resolved inside this server's video folder "
            f"({exc.strerror or exc}); name a file under it"
        ) from exc


def confine(root: str, filename: str) -> str:
    """The path to open for ``filename`` on a server confined to ``root``.

    Relative names resolve under the root; absolute names must lie inside it; ``..`` and
    symlinks are resolved first, so neither can lead out; for an image-sequence pattern
    every file FFmpeg would read must lie inside too. A name that reads as a URL is refused
    unless a file of that name exists under the root (FFmpeg gets the absolute path, which
    it never reads as a URL). Raises :class:`VideoAccessError`.
    """
    if "\x00" in filename:
        raise VideoAccessError("file names may not contain NUL bytes")
    real_root = os.path.realpath(root)
    joined = os.path.join(real_root, filename)
    if looks_like_url(filename) and not os.path.lexists(joined):
        raise VideoAccessError(
            f"{filename!r} is a URL or FFmpeg protocol, not a file under the root; a confined server serves "
            "only files under its root (name a file relative to the root)"
        )
    real = _realpath(joined, filename)
    if not _inside(real, real_root):
        raise VideoAccessError(f"{filename}: outside this server's video folder; name a file under it")
    for name in files_ffmpeg_may_open(real)[1:]:
        if not _inside(_realpath(name, filename), real_root):
            raise VideoAccessError(
                f"{filename}: FFmpeg would also read {name}, which lies outside this server's video folder; "
                "name a file under it"
            )
    return real


def root_spellings(root: Optional[str]) -> tuple[str, ...]:
    """The ways a path under ``root`` may be spelt in a message (its real and its absolute path),
    longest first; error messages name files relative to them (see ``_server_state.hide_root``)."""
    if not root:
        return ()
    spellings = {os.path.realpath(root).rstrip(os.sep), os.path.abspath(root).rstrip(os.sep)} - {""}  # a root of / hides nothing
    return tuple(sorted(spellings, key=len, reverse=True))


# -- errors ---------------------------------------------------------------------------


def resource_error(exc: BaseException, what: str) -> Optional[ServerError]:
    """A :class:`ServerError` when ``exc`` means the server ran out of something (EMFILE,
    ENFILE, ENOMEM) while doing ``what``; None when the error is about the file."""
    code = getattr(exc, "errno", None)
    if not isinstance(exc, OSError) or code not in _RESOURCE_ERRNOS:
        return None
    return ServerError(
        f"the server is out of {_RESOURCE_ERRNOS[code]} ({errno.errorcode[code]}: {os.strerror(code)}) "
        f"while {what}; the file may be fine: retry later, or raise the server's limits (ulimit -n)"
    )
