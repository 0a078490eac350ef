"""Which H.264 and HEVC packets no other frame is decoded from: those a reader may leave undecoded.

An H.264 picture whose slices all have ``nal_ref_idc == 0`` is a *non-reference*
picture: no other picture predicts from it (ITU-T H.264, 7.4.1), so decoding it or not
changes no other picture's pixels, nor the frame numbers that order the pictures. In
HEVC, a slice of type TRAIL_N, TSA_N, STSA_N, RADL_N, RASL_N (or the reserved even types
below 16) belongs to a *sub-layer non-reference* picture, which no picture of its
temporal sub-layer predicts from, and which the order count of later pictures ignores
(ITU-T H.265, 3.132 and 8.3.1); in a stream of one temporal sub-layer (what the record
says, checked here) no picture at all predicts from it. A reader on its way from a
keyframe to a frame it wants can leave such packets undecoded when their frames are not
wanted: in x264's and x265's default encodes about half the frames (the unreferenced
B-frames) are such, and a random frame costs about a third less to reach.

The packets come length-prefixed (MP4, MKV: the stream's extradata is an ``avcC`` or
``hvcC`` record, which gives the prefix size) or in Annex B byte streams (MPEG-TS, raw
``.h264``: start codes). Only the NAL header of each unit is read.
"""

from __future__ import annotations

from typing import Callable, Optional

#: H.264 VCL NAL unit types: coded slices (1: non-IDR, 2-4: data partitions, 5: IDR).
_SLICES = range(1, 6)
#: HEVC VCL NAL unit types (0-31) of sub-layer non-reference pictures.
_HEVC_NON_REFERENCE = frozenset({0, 2, 4, 6, 8, 10, 12, 14})

#: Whether a packet's bytes hold only non-reference slices.
Disposable = Callable[[memoryview], bool]


def disposable_test(codec: str, extradata: Optional[bytes]) -> Optional[Disposable]:
    """The test for packets of a stream of ``codec`` with ``extradata``; None where none is known
    (codecs other than H.264 and HEVC, a record that does not say its prefix size, HEVC with
    more than one temporal sub-layer or no ``hvcC`` record to say how many)."""
    if codec == "hevc":
        return _hevc_test(extradata)
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


def _hevc_test(extradata: Optional[bytes]) -> Optional[Disposable]:
    if not extradata or extradata[0] != 1 or len(extradata) < 23:
        return None  # no hvcC record: how many temporal sub-layers is not known here
    layers, prefix = (extradata[21] >> 3) & 7, (extradata[21] & 3) + 1  # numTemporalLayers, lengthSizeMinusOne
    if layers != 1 or prefix == 3:
        return None
    return lambda data: _hevc_length_prefixed(data, prefix)


def _hevc_length_prefixed(data: memoryview, prefix: int) -> bool:
    """Whether ``data`` (HEVC NAL units, each after a ``prefix``-byte length) holds a slice and
    only slices of sub-layer non-reference pictures, of the base layer."""
    pos, end, slices = 0, len(data), False
    while pos + prefix + 1 < end:
        size = int.from_bytes(data[pos : pos + prefix], "big")
        first, second = data[pos + prefix], data[pos + prefix + 1]
        if first & 0x80 or (first & 1) or (second >> 3):
            return False  # the forbidden bit, or a layer other than the base layer
        kind = (first >> 1) & 0x3F
        if kind < 32:  # a slice
            if kind not in _HEVC_NON_REFERENCE:
                return False
            slices = True
        pos += prefix + size
    return slices and pos == end
