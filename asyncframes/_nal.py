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
#: What one NAL unit's header (at ``data[at]``) says: None, no slice; True, a slice of a
#: picture no other picture predicts from; False, anything else (a reference picture's
#: slice, or a unit not understood), which makes the packet's frame one to decode.
Unit = Callable[[memoryview, int], Optional[bool]]


def disposable_test(codec: str, extradata: Optional[bytes]) -> Optional[Disposable]:
    """The test for packets of a stream of ``codec`` with ``extradata``; None where none is known
    (codecs other than H.264 and HEVC, a record that does not say its prefix size, HEVC with
    more than one temporal sub-layer or no ``hvcC`` record to say how many)."""
    if codec == "hevc":
        if not extradata or extradata[0] != 1 or len(extradata) < 23:
            return None  # no hvcC record: how many temporal sub-layers is not known here
        layers, prefix = (extradata[21] >> 3) & 7, (extradata[21] & 3) + 1  # numTemporalLayers, lengthSizeMinusOne
        if layers != 1 or prefix == 3:
            return None
        return lambda data: _length_prefixed(data, prefix, _hevc_unit, 2)
    if codec != "h264":
        return None
    if extradata and extradata[0] == 1:  # avcC: configurationVersion 1
        if len(extradata) < 5:
            return None
        prefix = (extradata[4] & 3) + 1  # lengthSizeMinusOne
        if prefix == 3:
            return None  # not allowed by ISO/IEC 14496-15
        return lambda data: _length_prefixed(data, prefix, _h264_unit, 1)
    return _annex_b


def _h264_unit(data: memoryview, at: int) -> Optional[bool]:
    header = data[at]
    if header & 0x80:
        return False  # forbidden_zero_bit set: not a unit we understand
    if header & 0x1F not in _SLICES:
        return None
    return not header & 0x60  # nal_ref_idc != 0: a reference picture


def _hevc_unit(data: memoryview, at: int) -> Optional[bool]:
    first, second = data[at], data[at + 1]
    if first & 0x80 or (first & 1) or (second >> 3):
        return False  # the forbidden bit, or a layer other than the base layer
    kind = (first >> 1) & 0x3F
    return kind in _HEVC_NON_REFERENCE if kind < 32 else None


def _length_prefixed(data: memoryview, prefix: int, unit: Unit, header: int) -> bool:
    """Whether ``data`` (NAL units with ``header``-byte headers, each after a ``prefix``-byte
    big-endian length) holds a slice and only slices ``unit`` calls disposable."""
    pos, end, slices = 0, len(data), False
    while pos + prefix + header <= end:
        size = int.from_bytes(data[pos : pos + prefix], "big")
        verdict = unit(data, pos + prefix)
        if verdict is False:
            return False
        slices = slices or verdict is True
        pos += prefix + size
    return slices and pos == end


def _annex_b(data: memoryview) -> bool:
    """Whether ``data`` (H.264 NAL units after start codes ``00 00 01``) holds a slice and no
    slice of a reference picture."""
    raw = bytes(data)  # (bytes.find looks for the start codes)
    pos, slices = raw.find(b"\x00\x00\x01"), False
    while pos >= 0 and pos + 3 < len(raw):
        verdict = _h264_unit(data, pos + 3)
        if verdict is False:
            return False
        slices = slices or verdict is True
        pos = raw.find(b"\x00\x00\x01", pos + 3)
    return slices
