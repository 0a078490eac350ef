"""Leaving unwanted frames no other frame is decoded from undecoded (H.264 and HEVC non-reference
pictures, MPEG-4 Part 2 and MPEG-1/2 B-frames): which packets qualify (pure), and that a reader
doing so still returns exactly the frames of a sequential decode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncframes._disposable import disposable_test
from asyncframes._reader import ReadInterrupted, VideoReader

from .conftest import assert_frames_exact, reference_frames, shared_video

#: NAL headers: (forbidden bit 0) nal_ref_idc (2 bits) nal_unit_type (5 bits).
units = st.tuples(st.integers(0, 3), st.integers(0, 31), st.binary(min_size=0, max_size=12))


def header(ref_idc: int, kind: int) -> int:
    return (ref_idc << 5) | kind


def expected(nals: list[tuple[int, int, bytes]]) -> bool:
    """The definition: a coded slice (types 1-5) and no slice of a reference picture."""
    slices = [ref for ref, kind, _ in nals if 1 <= kind <= 5]
    return bool(slices) and not any(slices)


def avcc(prefix: int) -> bytes:
    return bytes([1, 0x64, 0, 0x1F, 0xFC | (prefix - 1)])


def length_prefixed(nals: list[tuple[int, int, bytes]], prefix: int) -> bytes:
    return b"".join((1 + len(body)).to_bytes(prefix, "big") + bytes([header(ref, kind)]) + body for ref, kind, body in nals)


def annex_b(nals: list[tuple[int, int, bytes]]) -> bytes:
    # Payload bytes never hold a start code (emulation prevention): keep them free of zeros.
    return b"".join(b"\x00\x00\x00\x01" + bytes([header(ref, kind)]) + body.replace(b"\x00", b"\x07") for ref, kind, body in nals)


@pytest.mark.pure
@given(st.lists(units, max_size=6), st.sampled_from([1, 2, 4]))
def test_a_packet_is_disposable_when_it_holds_slices_and_none_of_a_reference_picture(nals, prefix):
    assert disposable_test("h264", avcc(prefix))(memoryview(length_prefixed(nals, prefix))) is expected(nals)
    assert disposable_test("h264", None)(memoryview(annex_b(nals))) is expected(nals)


@pytest.mark.pure
@pytest.mark.parametrize(
    "data",
    [
        length_prefixed([(0, 1, b"\x88\x84")], 4)[:-1] + b"\x00\x00\x00\x09\x01",  # a length past the end
        bytes([0, 0, 0, 2, 0x81, 0]),  # the forbidden bit
        b"",
    ],
)
def test_what_cannot_be_read_is_never_disposable(data):
    assert disposable_test("h264", avcc(4))(memoryview(data)) is False


def hevc_header(kind: int, layer: int = 0, temporal_id: int = 0) -> bytes:
    return bytes([(kind << 1) | (layer >> 5), ((layer & 31) << 3) | (temporal_id + 1)])


#: HEVC NAL units: (nal_unit_type, nuh_layer_id, body).
hevc_units = st.tuples(st.integers(0, 63), st.sampled_from([0, 0, 0, 1]), st.binary(min_size=0, max_size=12))


def hvcc(prefix: int, temporal_layers: int = 1) -> bytes:
    record = bytearray(23)
    record[0] = 1
    record[21] = (temporal_layers << 3) | (prefix - 1)
    return bytes(record)


def hevc_expected(nals: list[tuple[int, int, bytes]]) -> bool:
    """The definition: a slice (types 0-31), every slice of a sub-layer non-reference picture
    (the even types below 16), every unit of the base layer."""
    slices = [kind for kind, _, _ in nals if kind < 32]
    return bool(slices) and all(k < 16 and k % 2 == 0 for k in slices) and all(layer == 0 for _, layer, _ in nals)


@pytest.mark.pure
@given(st.lists(hevc_units, max_size=6), st.sampled_from([1, 2, 4]), st.integers(0, 6))
def test_an_hevc_packet_is_disposable_when_it_holds_only_slices_of_non_reference_pictures(nals, prefix, temporal_id):
    data = b"".join(
        (2 + len(body)).to_bytes(prefix, "big") + hevc_header(kind, layer, temporal_id) + body
        for kind, layer, body in nals
    )
    assert disposable_test("hevc", hvcc(prefix))(memoryview(data)) is hevc_expected(nals)


def parameter_sets(vps_sub_layers: int = 1, sps_sub_layers: int = 1) -> bytes:
    """Annex B VPS, SPS and PPS (the first bytes of each, as an MPEG-TS stream's extradata has them)."""
    vps = hevc_header(32) + bytes([0x0C, 0x01 | ((vps_sub_layers - 1) << 1), 0xFF, 0xFF])
    sps = hevc_header(33) + bytes([0x01 | ((sps_sub_layers - 1) << 1), 0x60, 0x00])
    return b"\x00\x00\x00\x01" + vps + b"\x00\x00\x00\x01" + sps + b"\x00\x00\x00\x01" + hevc_header(34) + b"\xc1\x72"


@pytest.mark.pure
@given(st.lists(hevc_units, max_size=6), st.integers(0, 6))
def test_an_hevc_packet_in_annex_b_is_disposable_when_it_holds_only_slices_of_non_reference_pictures(nals, temporal_id):
    data = b"".join(b"\x00\x00\x01" + hevc_header(kind, layer, temporal_id) + body.replace(b"\x00", b"\x07") for kind, layer, body in nals)
    assert disposable_test("hevc", parameter_sets())(memoryview(data)) is hevc_expected(nals)


#: Pictures of MPEG-4 Part 2 and MPEG-1/2: their coding types (MPEG-4: I P B S; MPEG-1/2: I P B D).
mpeg_pictures = st.lists(st.sampled_from("IPBS"), max_size=4)


def mpeg4_packet(types: str) -> bytes:
    """A VOL header (as keyframes carry), then a VOP of each type, with bytes between that hold no start code."""
    vops = b"".join(b"\x00\x00\x01\xb6" + bytes(["IPBS".index(t) << 6 | 0x15, 0x42, 0x99]) for t in types)
    return b"\x00\x00\x01\x20\x08\xc8" + vops if "I" in types else vops


def mpeg2_packet(types: str) -> bytes:
    """A sequence header before an I picture, then each picture's header and a slice."""
    pictures = b"".join(
        b"\x00\x00\x01\x00" + bytes([0x12, ("?IPBD".index(t.replace("S", "D"))) << 3 | 0x07, 0xFF]) + b"\x00\x00\x01\x01\x33\x44"
        for t in types
    )
    return b"\x00\x00\x01\xb3\x14\x00\xf0" + pictures if "I" in types else pictures


@pytest.mark.pure
@given(mpeg_pictures)
def test_an_mpeg_packet_is_disposable_when_it_holds_pictures_and_only_b_pictures(types):
    expected = bool(types) and set(types) == {"B"}
    assert disposable_test("mpeg4", None)(memoryview(mpeg4_packet("".join(types)))) is expected
    for codec in ("mpeg1video", "mpeg2video"):
        assert disposable_test(codec, None)(memoryview(mpeg2_packet("".join(types)))) is expected


@pytest.mark.pure
def test_an_mpeg_picture_header_cut_short_is_never_disposable():
    assert disposable_test("mpeg4", None)(memoryview(b"\x00\x00\x01\xb6")) is False
    assert disposable_test("mpeg2video", None)(memoryview(b"\x00\x00\x01\x00\x12")) is False


@pytest.mark.pure
def test_only_codecs_whose_streams_say_enough_have_a_test():
    assert disposable_test("vp9", b"") is None and disposable_test("av1", None) is None and disposable_test("mjpeg", None) is None
    assert disposable_test("h264", bytes([1, 0x64, 0, 0x1F, 0xFE])) is None  # a 3-byte prefix is not allowed
    assert disposable_test("h264", bytes([1, 0x64])) is None  # a record cut short
    assert disposable_test("hevc", None) is None  # nothing says how many temporal sub-layers
    assert disposable_test("hevc", hvcc(4, temporal_layers=2)) is None  # a higher sub-layer may predict from one
    assert disposable_test("hevc", hvcc(4, temporal_layers=0)) is None  # "unknown"
    assert disposable_test("hevc", hvcc(4)) is not None
    assert disposable_test("hevc", parameter_sets()) is not None
    assert disposable_test("hevc", parameter_sets(vps_sub_layers=3)) is None
    assert disposable_test("hevc", parameter_sets(sps_sub_layers=2)) is None
    assert disposable_test("hevc", b"\x00\x00\x01" + hevc_header(34) + b"\xc1") is None  # a PPS alone
    assert disposable_test("hevc", b"\x00\x00\x01" + hevc_header(32) + b"\x0c") is None  # a VPS cut short


def _reads(n: int, seed: int) -> list[list[int]]:
    """Single frames, then batches, at random (one frame twice; one batch repeats a frame)."""
    rng = np.random.default_rng(seed)
    singles = [[int(i)] for i in rng.integers(0, n, 12)]
    batches = [sorted(int(i) for i in rng.integers(0, n, 6)) for _ in range(4)]
    return singles + [singles[0]] + batches + [[n - 1, 0, n - 1]]


@pytest.mark.parametrize(
    "name, leaves",
    [("h264_gops.mp4", True), ("h264_bframes_longgop.mp4", True), ("h264.ts", True), ("h264.mkv", True),
     ("h264_vfr.mp4", True), ("h264_opengop.ts", True), ("h264_gops.ts", True), ("hevc.mp4", True),
     ("hevc_opengop.mkv", True), ("hevc_gops.ts", True), ("mpeg4_bframes.avi", True), ("mpeg4_bframes.mp4", True),
     ("mpeg2.ts", True), ("vp9.webm", False), ("mjpeg.avi", False)],
)
def test_reading_at_random_leaves_unwanted_non_reference_frames_undecoded_and_stays_exact(make_clip, name, leaves):
    path = make_clip(name)
    n = len(reference_frames(path))
    with VideoReader(str(path)) as reader:
        for idxs in _reads(n, seed=len(name)):
            assert_frames_exact(path, idxs, reader.read(idxs, grayscale=False))
        assert (reader.stats.packets_undecoded > 0) is leaves
        assert reader.stats.counting_fallbacks == 0 and reader._leave_undecoded


def test_the_shared_recording_with_b_frames_is_read_exactly_with_about_half_its_frames_left_undecoded():
    path = shared_video("centered_pair_small.mp4")
    n = len(reference_frames(path))
    with VideoReader(str(path)) as reader:
        for idxs in _reads(n, seed=3):
            assert_frames_exact(path, idxs, reader.read(idxs, grayscale=False))
        decoded, left = reader.stats.frames_decoded, reader.stats.packets_undecoded
        assert left > 0.3 * (decoded + left), (decoded, left)


def _after(checks: int):
    """An interrupt that says stop once it has been asked ``checks`` times."""
    asked = iter(range(1 << 20))
    return lambda: next(asked) >= checks


def test_a_frame_left_undecoded_by_a_read_that_stopped_early_is_decoded_when_asked_for(make_clip):
    """A read interrupted (a cancel) after the decoder went past frames it left undecoded: the
    next read of such a frame seeks back for it, and the index is never doubted."""
    path = make_clip("h264_bframes_longgop.mp4")  # one keyframe, B-frames: most frames lie ahead of a seek
    with VideoReader(str(path)) as reader:
        for stop in range(5, 100, 5):  # where the decoder has gone past a frame it left undecoded
            reader.close()
            with pytest.raises(ReadInterrupted):
                reader.read([2, 140], grayscale=False, interrupt=_after(stop))
            if reader._undecoded:
                break
        passed = sorted(reader._undecoded)
        assert passed, "no read stopped with a frame left undecoded ahead of it"
        for i in passed:
            assert_frames_exact(path, [i], reader.read([i], grayscale=False))
        assert reader.stats.counting_fallbacks == 0 and reader._leave_undecoded
