"""swscale's RGB conversion written straight into a caller's array (no intermediate frame).

PyAV's ``frame.to_ndarray(format="rgb24", threads=1)`` makes a new frame, converts into it
with ``sws_scale_frame`` and copies that into a new array; the reader then copies the array
into its output (often a shared-memory slot). :class:`DirectRGB` runs the same swscale
conversion, with the settings ``sws_scale_frame`` gives its single pass, through the legacy
``sws_scale`` call of the very library PyAV uses (the one bundled in ``av.libs``), writing
into the destination row by row. Nothing here is trusted blindly: :class:`._convert.Converter`
checks it against PyAV's conversion on its first frames.

What ``sws_scale_frame`` does for a plain conversion to ``rgb24`` (FFmpeg 8, ``graph.c``,
``add_legacy_sws_pass``; PyAV resets the transfer and primaries so no colour mapping runs):
one legacy context with PyAV's flags (bilinear) and threads, the source range full for
``yuvj*``, gray and RGB formats or a frame tagged full range, the destination full range, the
source chroma siting from the frame (PyAV does not show it: only conversions that do not
depend on it are allowed, see :data:`FORMATS_ANY_SIZE` and :data:`FORMATS_EVEN_SIZE`), and
the colour matrix from the frame's colour space. Interlaced frames are converted field by field there; they are left
to PyAV here.

Loading is lazy (the client never imports this) and any failure (no bundled library, a
missing symbol, an unexpected layout) leaves :func:`library` returning None, logged at DEBUG.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import threading
from typing import Optional

import av
import numpy as np

log = logging.getLogger(__name__)

#: PyAV's default interpolation for a reformat (``SWS_BILINEAR``).
SWS_BILINEAR = 2
#: Colour spaces swscale's frame API accepts (``sws_test_colorspace``): AVColorSpace numbers.
_CSP_OK = frozenset({0, 1, 2, 4, 5, 6, 7, 9})
#: ``yuvj*``: full range whatever the frame says.
_JPEG_FORMATS = frozenset({"yuvj420p", "yuvj411p", "yuvj422p", "yuvj444p", "yuvj440p"})
#: Gray formats: full range and unspecified colour space whatever the frame says.
_GRAY_FORMATS = frozenset({"gray", "gray10le", "gray12le", "gray16le"})
#: RGB formats: full range, RGB colour space.
_RGB_FORMATS = frozenset({"gbrp", "gbrp10le", "gbrp12le", "gbrp16le", "bgr24", "bgr0", "rgb0", "rgba", "bgra"})
#: Formats served directly, each checked bit for bit in tests/test_convert_direct.py.
#: Without chroma subsampling, at any size (chroma siting plays no part):
FORMATS_ANY_SIZE = frozenset(
    {"yuv444p", "yuvj444p", "yuv444p10le", "gray", "gray10le", "gbrp10le", "bgr0", "bgra"}
)
#: Subsampled, which swscale converts with its special unscaled converter (blind to chroma
#: siting) when the height is even. Its x86 SIMD version converts whole groups of pixels (16
#: with AVX2, 8 before) and leaves a row's last ``width % 16`` pixels unwritten when the
#: destination rows have no padding (ours have none), so the width must be a multiple of 16.
FORMATS_EVEN_SIZE = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p"})
#: sws_scale_frame's source chroma position options for an untagged frame (the centre) of
#: each subsampled format we convert; -513 where a direction is not subsampled.
_CHROMA_POS = {"yuv420p": (128, 128), "yuvj420p": (128, 128), "yuv422p": (128, -513), "yuvj422p": (128, -513)}

#: Each format's planes: (horizontal, vertical chroma shift, bytes per pixel of the plane).
_PLANES = {
    **{name: ((0, 0, 1),) * 3 for name in ("yuv444p", "yuvj444p")},
    **{name: ((0, 0, 1), (1, 1, 1), (1, 1, 1)) for name in ("yuv420p", "yuvj420p")},
    **{name: ((0, 0, 1), (1, 0, 1), (1, 0, 1)) for name in ("yuv422p", "yuvj422p")},
    "yuv444p10le": ((0, 0, 2),) * 3,
    "gbrp10le": ((0, 0, 2),) * 3,
    "gray": ((0, 0, 1),),
    "gray10le": ((0, 0, 2),),
    "bgr0": ((0, 0, 4),),
    "bgra": ((0, 0, 4),),
}

_lock = threading.Lock()
_lib: "Optional[_Lib] | bool" = None  # None: not tried yet; False: unavailable


class _Lib:
    def __init__(self, sws: ctypes.CDLL, avutil: ctypes.CDLL) -> None:
        p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        ip = ctypes.POINTER(ctypes.c_int)
        self.get_pix_fmt = _fn(avutil, "av_get_pix_fmt", i, [ctypes.c_char_p])
        self.opt_set_int = _fn(avutil, "av_opt_set_int", i, [p, ctypes.c_char_p, i64, i])
        self.alloc = _fn(sws, "sws_alloc_context", p, [])
        self.init = _fn(sws, "sws_init_context", i, [p, p, p])
        self.free = _fn(sws, "sws_free_context", None, [ctypes.POINTER(p)])
        self.coefficients = _fn(sws, "sws_getCoefficients", ip, [i])
        self.get_details = _fn(
            sws, "sws_getColorspaceDetails", i, [p, ctypes.POINTER(ip), ip, ctypes.POINTER(ip), ip, ip, ip, ip]
        )
        self.set_details = _fn(sws, "sws_setColorspaceDetails", i, [p, ip, i, ip, i, i, i, i])
        self.scale = _fn(
            sws,
            "sws_scale",
            i,
            [p, ctypes.POINTER(p), ctypes.POINTER(i), i, i, ctypes.POINTER(p), ctypes.POINTER(i)],
        )
        self.rgb24 = self.get_pix_fmt(b"rgb24")
        if self.rgb24 < 0:
            raise OSError("av_get_pix_fmt does not know rgb24")
        self._pix_fmts: dict[str, int] = {}

    def pix_fmt(self, name: str) -> int:
        found = self._pix_fmts.get(name)
        if found is None:
            found = self._pix_fmts[name] = int(self.get_pix_fmt(name.encode()))
        return found


def _fn(lib: ctypes.CDLL, name: str, restype: object, argtypes: list[object]) -> "ctypes._CFuncPtr":
    f = getattr(lib, name)  # AttributeError: missing symbol
    f.restype = restype
    f.argtypes = argtypes
    return f


def _bundled(pattern: str) -> Optional[str]:
    """The one library in PyAV's ``av.libs`` matching ``pattern`` that this process has mapped."""
    libs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(av.__file__))), "av.libs")
    found = glob.glob(os.path.join(libs, pattern))
    if len(found) != 1:
        return None
    path = os.path.realpath(found[0])
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split(None, 5)[-1].strip() for line in maps if "/" in line}
    except OSError:
        return None
    # PyAV loaded it (its extension modules link it): it must be the file mapped, and the only one of its kind.
    kind = os.path.basename(path).split("-")[0]
    mapped_kind = {m for m in mapped if os.path.basename(m).startswith(kind + "-") or os.path.basename(m).startswith(kind + ".")}
    if mapped_kind != {path}:
        return None
    return path


def library() -> Optional[_Lib]:
    """The bundled libswscale and libavutil PyAV uses, or None (then nothing here is used)."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = _load()
    return _lib or None


def _load() -> "_Lib | bool":
    try:
        import av.video.reformatter  # noqa: F401  (makes sure PyAV's swscale is mapped)

        sws_path, avutil_path = _bundled("libswscale-*.so*"), _bundled("libavutil-*.so*")
        if sws_path is None or avutil_path is None:
            log.debug("PyAV's bundled libswscale/libavutil not found (or not the ones mapped); no direct RGB conversion")
            return False
        return _Lib(ctypes.CDLL(sws_path), ctypes.CDLL(avutil_path))
    except (OSError, AttributeError, ValueError) as exc:
        log.debug("no direct RGB conversion: %s", exc)
        return False


def _settings(frame: av.VideoFrame) -> Optional[tuple[str, int, int, int, int]]:
    """(format, width, height, source full range, source colour space) for a frame we may convert, else None."""
    name = frame.format.name
    h = frame.height
    if name not in FORMATS_ANY_SIZE and (name not in FORMATS_EVEN_SIZE or h & 1 or frame.width & 15):
        return None
    if frame.interlaced_frame:
        return None  # swscale's frame API converts each field on its own
    csp = int(frame.colorspace)
    if name in _RGB_FORMATS:
        full, csp = 1, 0
    elif name in _GRAY_FORMATS:
        full, csp = 1, 2
    else:
        if csp not in _CSP_OK:
            return None  # PyAV's conversion fails on these: let it say so
        if csp == 5:
            csp = 6  # PyAV tags BT470BG as SMPTE170M (the same matrix)
        full = 1 if (name in _JPEG_FORMATS or int(frame.color_range) == 2) else 0
    return name, frame.width, h, full, csp


class DirectRGB:
    """One SwsContext, remade when the frames' format, size, range or colour space change.

    Not thread-safe (each :class:`._convert.Converter` has its own). Freed when dropped.
    """

    def __init__(self, lib: _Lib) -> None:
        self._lib = lib
        self._ctx = ctypes.c_void_p()
        self._key: Optional[tuple[str, int, int, int, int]] = None

    def key(self, frame: av.VideoFrame) -> Optional[tuple[str, int, int, int, int]]:
        """What a context for ``frame`` is made of, or None: ``frame`` is not for us."""
        return _settings(frame)

    def _context(self, key: tuple[str, int, int, int, int]) -> bool:
        if key == self._key and self._ctx:
            return True
        self.close()
        lib = self._lib
        name, w, h, full, csp = key
        fmt = lib.pix_fmt(name)
        if fmt < 0:
            return False
        ctx = ctypes.c_void_p(lib.alloc())
        if not ctx:
            return False
        self._ctx = ctx
        h_pos, v_pos = _CHROMA_POS.get(name, (-513, -513))
        options = [
            (b"sws_flags", SWS_BILINEAR),
            (b"threads", 1),
            (b"srcw", w),
            (b"srch", h),
            (b"src_format", fmt),
            (b"src_range", full),
            (b"dstw", w),
            (b"dsth", h),
            (b"dst_format", lib.rgb24),
            (b"dst_range", 1),
            # sws_scale_frame's chroma siting for an untagged frame (the centre); -513 where
            # nothing is subsampled. Only formats whose conversion ignores it get here.
            (b"src_h_chr_pos", h_pos),
            (b"src_v_chr_pos", v_pos),
            (b"dst_h_chr_pos", -513),
            (b"dst_v_chr_pos", -513),
        ]
        for option, value in options:
            if lib.opt_set_int(ctx, option, value, 0) < 0:
                log.debug("swscale refused option %s=%s", option, value)
                self.close()
                return False
        if lib.init(ctx, None, None) < 0:
            self.close()
            return False
        inv, table = ctypes.POINTER(ctypes.c_int)(), ctypes.POINTER(ctypes.c_int)()
        in_full, out_full, bright, contrast, sat = (ctypes.c_int() for _ in range(5))
        if (
            lib.get_details(
                ctx,
                ctypes.byref(inv),
                ctypes.byref(in_full),
                ctypes.byref(table),
                ctypes.byref(out_full),
                ctypes.byref(bright),
                ctypes.byref(contrast),
                ctypes.byref(sat),
            )
            < 0
        ):
            self.close()
            return False
        ret = lib.set_details(
            ctx,
            lib.coefficients(csp),
            in_full.value,
            lib.coefficients(0),  # the destination is RGB
            out_full.value,
            bright.value,
            contrast.value,
            sat.value,
        )
        if ret < 0:
            self.close()
            return False
        self._key = key
        return True

    def convert(self, frame: av.VideoFrame, out: np.ndarray, key: tuple[str, int, int, int, int]) -> bool:
        """Write ``frame`` as rgb24 into ``out``; False if it could not (then ``out`` may be partly
        written: the caller converts the usual way)."""
        _, w, h, _, _ = key
        if not (
            out.dtype == np.uint8
            and out.shape == (h, w, 3)
            and out.flags.c_contiguous
            and out.flags.writeable
            and frame.width == w
            and frame.height == h
        ):
            return False
        if not self._context(key):
            return False
        planes = frame.planes
        expected = _PLANES.get(key[0])
        if expected is None or len(planes) != len(expected):
            return False
        src = (ctypes.c_void_p * 4)()
        strides = (ctypes.c_int * 4)()
        for k, (plane, (x_shift, y_shift, sample)) in enumerate(zip(planes, expected)):
            ptr, size, line = plane.buffer_ptr, plane.buffer_size, plane.line_size
            rows = -(-h >> y_shift)
            if not ptr or line < (-(-w >> x_shift)) * sample or plane.height < rows or size < line * rows:
                return False
            src[k], strides[k] = ptr, line
        dst = (ctypes.c_void_p * 4)(out.ctypes.data, None, None, None)
        dst_strides = (ctypes.c_int * 4)(w * 3, 0, 0, 0)
        done = self._lib.scale(self._ctx, src, strides, 0, h, dst, dst_strides)
        return done == h

    def close(self) -> None:
        if self._ctx:
            self._lib.free(ctypes.byref(self._ctx))
        self._ctx = ctypes.c_void_p()
        self._key = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing to do about it
            pass
