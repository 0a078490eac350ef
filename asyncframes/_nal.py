"""Which H.264 packets no other frame is decoded from: those a reader may leave undecoded.

An H.264 picture whose slices all have ``nal_ref_idc == 0`` is a *non-reference*
picture: no other picture predicts from it (ITU-T H.264, 7.4.1), so decoding it or not
changes no other picture's pixels, nor the frame numbers that order the pictures. A
reader on its way from a keyframe to a frame it wants can leave such packets undecoded
when their frames are not wanted: in x264's default encodes about half the frames (the
unreferenced B-frames) are such, and a random frame costs about a third less to reach.

The packets come length-prefixed (MP4, MKV: the stream's extradata is an ``avcC``
record, which gives the prefix size) or in Annex B byte streams (MPEG-TS, raw ``.h264``:
start codes). Only the one-byte NAL header of each unit is read.
"""

from __future__ import annotations

from typing import Callable, Optional

#: VCL NAL unit types: coded slices (1: non-IDR, 2-4: data partitions, 5: IDR).
_SLICES = range(1, 6)

#: Whether a packet's bytes hold only non-reference slices.
Disposable = Callable[[memoryview], bool]


def disposable_test(codec: str, extradata: Optional[bytes]) -> Optional[Disposable]:
    """The test for packets of a stream of ``codec`` with ``extradata``; None where none is known
    (codecs other than H.264, or an ``avcC`` record that does not say its prefix size)."""
    if codec != "h264":
        return None
    if extradata and extradata[0] == 1:  # avcC: configurationVersion 1
        if len(extradata) < 5:
            return None
        prefix = (extradata[4] & 3) + 1  # lengthSizeMinusOne
        if prefix == 3:
            return None  # not allowed by ISO/IEC 14496-15
        return lambda data: _length_prefixed(data, prefix)
    return _annex_b


def _length_prefixed(data: memoryview, prefix: int) -> bool:
    """Whether ``data`` (NAL units, each after a ``prefix``-byte big-endian length) holds a
    slice and no slice of a reference picture."""
    pos, end, slices = 0, len(data), False
    while pos + prefix < end:
        size = int.from_bytes(data[pos : pos + prefix], "big")
        header = data[pos + prefix]
        if header & 0x80:
            return False  # forbidden_zero_bit set: not a unit we understand
        if header & 0x1F in _SLICES:
            if header & 0x60:
                return False  # nal_ref_idc != 0: a reference picture
            slices = True
        pos += prefix + size
    return slices and pos == end


def _annex_b(data: memoryview) -> bool:
    """Whether ``data`` (NAL units after start codes ``00 00 01``) holds a slice and no slice
    of a reference picture."""
    raw = bytes(data)
    pos, slices = raw.find(b"\x00\x00\x01"), False
    if pos < 0:
        return False
    while pos >= 0:
        at = pos + 3
        if at >= len(raw):
            break
        header = raw[at]
        if header & 0x80:
            return False
        if header & 0x1F in _SLICES:
            if header & 0x60:
                return False
            slices = True
        pos = raw.find(b"\x00\x00\x01", at)
    return slices
