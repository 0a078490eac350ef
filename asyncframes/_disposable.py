"""Which packets no other frame is decoded from: those a reader may leave undecoded.

A reader on its way from a keyframe to a frame it wants can leave such packets undecoded
when their frames are not wanted: decoding them or not changes no other frame's pixels, nor
the order the decoder presents frames in. In x264's and x265's default encodes about half the
frames are such (the unreferenced B-frames), in MPEG-4 Part 2 and MPEG-1/2 encodes with
B-frames every B-frame; a random frame costs about a third less to reach.

* **H.264**: a picture whose slices all have ``nal_ref_idc == 0`` is a *non-reference*
  picture: no other picture predicts from it (ITU-T H.264, 7.4.1).
* **HEVC**: a slice of type TRAIL_N, TSA_N, STSA_N, RADL_N, RASL_N (or the reserved even
  types below 16) belongs to a *sub-layer non-reference* picture, which no picture of its
  temporal sub-layer predicts from, and which the order count of later pictures ignores
  (ITU-T H.265, 3.132 and 8.3.1); in a stream of one temporal sub-layer (what the ``hvcC``
  record or the parameter sets say, checked here) no picture at all predicts from it.
* **MPEG-4 Part 2** and **MPEG-1/2 video**: a B-VOP (ISO/IEC 14496-2, 6.3.5) or B-picture
  (ISO/IEC 13818-2, 6.3.9) is never a reference; S-VOPs and D-pictures are not B.

H.264 and HEVC packets come length-prefixed (MP4, MKV: the stream's extradata is an ``avcC``
or ``hvcC`` record, which gives the prefix size) or in Annex B byte streams (MPEG-TS, raw
``.h264``: start codes); only the header of each NAL unit is read. MPEG-4 Part 2 and
MPEG-1/2 packets are start-code streams; only the coding type after each VOP or picture
start code is read. A packet qualifies only when everything read says so: a unit or header
not understood makes its frame one to decode.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional

#: H.264 VCL NAL unit types: coded slices (1: non-IDR, 2-4: data partitions, 5: IDR).
_SLICES = range(1, 6)
#: HEVC VCL NAL unit types (0-31) of sub-layer non-reference pictures.
_HEVC_NON_REFERENCE = frozenset({0, 2, 4, 6, 8, 10, 12, 14})
#: HEVC parameter sets that say how many temporal sub-layers a stream has: VPS and SPS.
_HEVC_VPS, _HEVC_SPS = 32, 33
_START = b"\x00\x00\x01"
#: MPEG-4 Part 2: a VOP's start code; ``vop_coding_type`` is the top two bits of the next byte.
_VOP_START, _B_VOP = b"\x00\x00\x01\xb6", 2
#: MPEG-1/2: a picture's start code; ``temporal_reference`` (10 bits), then ``picture_coding_type`` (3).
_PICTURE_START, _B_PICTURE = b"\x00\x00\x01\x00", 3

#: Whether a packet's bytes hold only frames no other frame is decoded from.
Disposable = Callable[[memoryview], bool]
#: What one NAL unit's header (at ``data[at]``) says: None, no slice; True, a slice of a
#: picture no other picture predicts from; False, anything else (a reference picture's
#: slice, or a unit not understood), which makes the packet's frame one to decode.
Unit = Callable[[memoryview, int], Optional[bool]]


def disposable_test(codec: str, extradata: Optional[bytes]) -> Optional[Disposable]:
    """The test for packets of a stream of ``codec`` (FFmpeg's decoder name) with ``extradata``.

    Returns:
        The test; None where none is known: codecs other than H.264, HEVC, MPEG-4 Part 2 and
        MPEG-1/2; a record that does not say its prefix size; HEVC with more than one temporal
        sub-layer, or with nothing to say how many (no ``hvcC`` record or parameter sets).
    """
    if codec == "mpeg4":
        return partial(_all_b, _VOP_START, _vop_coding_type, _B_VOP)
    if codec in ("mpeg1video", "mpeg2video"):
        return partial(_all_b, _PICTURE_START, _picture_coding_type, _B_PICTURE)
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
        return partial(_length_prefixed, prefix=prefix, unit=_h264_unit, header=1)
    return partial(_annex_b, unit=_h264_unit, header=1)


def _hevc_test(extradata: Optional[bytes]) -> Optional[Disposable]:
    if not extradata:
        return None
    if extradata[0] == 1:  # hvcC: configurationVersion 1
        if len(extradata) < 23:
            return None
        layers, prefix = (extradata[21] >> 3) & 7, (extradata[21] & 3) + 1  # numTemporalLayers, lengthSizeMinusOne
        if layers != 1 or prefix == 3:
            return None
        return partial(_length_prefixed, prefix=prefix, unit=_hevc_unit, header=2)
    if _hevc_sub_layers(extradata) != 1:
        return None
    return partial(_annex_b, unit=_hevc_unit, header=2)


def _hevc_sub_layers(parameter_sets: bytes) -> Optional[int]:
    """How many temporal sub-layers the VPS and SPS of Annex B ``parameter_sets`` allow (the
    most either says); None when neither is there, or one cannot be read."""
    most: Optional[int] = None
    for at in _after_start_codes(parameter_sets, _START):
        body = parameter_sets[at + 2 : at + 4]
        kind = (parameter_sets[at] >> 1) & 0x3F if at < len(parameter_sets) else -1
        if kind in (_HEVC_VPS, _HEVC_SPS):
            if len(body) < 2:
                return None  # cut short (the two bytes read never hold an emulation prevention byte)
            # VPS: id (4 bits), two flags, max_layers_minus1 (6), max_sub_layers_minus1 (3);
            # SPS: vps id (4 bits), max_sub_layers_minus1 (3).
            minus1 = (body[1] >> 1) & 7 if kind == _HEVC_VPS else (body[0] >> 1) & 7
            most = max(most or 0, minus1 + 1)
    return most


def _after_start_codes(raw: bytes, start: bytes) -> Iterator[int]:
    """Where the bytes after each occurrence of the start code ``start`` in ``raw`` begin, in order."""
    pos = raw.find(start)
    while pos >= 0:
        at = pos + len(start)
        yield at
        pos = raw.find(start, at)


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


def _annex_b(data: memoryview, unit: Unit, header: int) -> bool:
    """Whether ``data`` (NAL units with ``header``-byte headers after start codes ``00 00 01``)
    holds a slice and only slices ``unit`` calls disposable."""
    raw = bytes(data)  # (bytes.find looks for the start codes)
    slices = False
    for at in _after_start_codes(raw, _START):
        if at + header > len(raw):
            break  # a start code at the very end: nothing after it to read
        verdict = unit(data, at)
        if verdict is False:
            return False
        slices = slices or verdict is True
    return slices


def _vop_coding_type(raw: bytes, at: int) -> int:
    return raw[at] >> 6


def _picture_coding_type(raw: bytes, at: int) -> int:
    return (raw[at + 1] >> 3) & 7


def _all_b(start: bytes, coding_type: Callable[[bytes, int], int], b: int, data: memoryview) -> bool:
    """Whether ``data`` holds a picture (``start``, then its header) and only B pictures, as
    ``coding_type`` reads their headers: B-frames no other frame predicts from. A header cut
    short makes the packet one to decode."""
    raw = bytes(data)
    pictures = False
    for at in _after_start_codes(raw, start):
        if at + 2 > len(raw) or coding_type(raw, at) != b:
            return False
        pictures = True
    return pictures
