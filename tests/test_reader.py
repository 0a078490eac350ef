"""The reader returns exactly the frames a sequential decode presents, whatever the request order."""

from __future__ import annotations

import av
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncframes import FrameIndexError, VideoNotFoundError, VideoOpenError
from asyncframes import _index_store as index_store
from asyncframes._convert import luma
from asyncframes._index import FrameIndex, index_from_packets
from asyncframes._reader import FrameCache, VideoReader
from asyncframes._sample import write_clip

from .conftest import CLIPS, ZOO, assert_frames_exact, corrupt_frames, reference_frames, shuffled_with_duplicates

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_shuffled_batch_with_duplicates_matches_sequential_decode(make_clip, name):
    path = make_clip(name)
    n = len(reference_frames(path))
    idxs = shuffled_with_duplicates(n, 60, seed=len(name))
    with VideoReader(str(path)) as reader:
        assert reader.frame_count == n
        assert_frames_exact(path, idxs, reader.read(idxs, grayscale=False))
        # The same reader again, backwards: the decoder state left by the first read must not leak.
        backwards = list(range(n))[::-1]
        assert_frames_exact(path, backwards, reader.read(backwards, grayscale=False))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_codec_zoo_random_access_is_exact(make_clip, name):
    """Open GOPs, edit lists that hide frames, offsets, raw streams, many codecs and containers."""
    path = make_clip(name)
    stream = ZOO[name].get("streams", 1) - 1  # the last video stream, when there are several
    n = len(reference_frames(path, stream))
    idxs = shuffled_with_duplicates(n, 20, seed=n)
    with VideoReader(str(path), stream=stream) as reader:
        assert reader.frame_count == n
        assert_frames_exact(path, idxs, reader.read(idxs, grayscale=False), stream)


#: Clips whose seeks went wrong: MPEG-TS/PS seeks by any packet's dts (a keyframe's pts
#: landed after it, and at the last GOP on nothing, so the reader counted frames and
#: restarted from frame 0 for every seek); MP4 maps a pts to dts by a fixed offset, so with
#: a variable frame rate a keyframe's own pts landed a GOP early.
SEEK_CLIPS = ["h264_gops.ts", "mpeg2.ts", "h264_vfr.ts", "h264_opengop.ts", "h264_offset_start.ts",
              "h264_vfr.mp4", "h264_vfr.mkv", "h264_gops.mp4", "hevc.mp4"]


@pytest.mark.parametrize("name", SEEK_CLIPS)
def test_random_single_frame_reads_decode_one_gop_at_most_and_never_count(make_clip, name):
    """Each read decodes from the target's own keyframe (not one a GOP early, not from frame 0)."""
    path = make_clip(name)
    n = len(reference_frames(path))
    rng = np.random.default_rng(len(name))
    with VideoReader(str(path)) as reader:
        index = reader.index
        assert not index.sequential and reader.frame_count == n
        for i in [n - 1, *(int(i) for i in rng.integers(0, n, 60))]:
            before = reader.stats.frames_decoded
            assert_frames_exact(path, [i], reader.read([i], grayscale=False))
            # From the keyframe to the target, plus open-GOP leftovers and the frames a
            # read may decode on rather than seek (SEEK_COST_FRAMES).
            from_key = i - index.first_at_or_after(index.keyframe_for(i)) + 1
            assert reader.stats.frames_decoded - before <= from_key + 5, f"frame {i}"
        assert reader.stats.counting_fallbacks == 0 and not reader.index.sequential
        assert reader.stats.late_landings <= 1  # MPEG-TS: once, then seeks go by keyframe dts
        if not name.endswith(".ts"):
            assert reader.stats.late_landings == 0 and reader.stats.packets_skipped == 0, "the seek landed on its keyframe"


@pytest.mark.parametrize("off", [1, -1])
def test_a_seek_that_lands_off_its_keyframe_still_decodes_from_it(make_clip, monkeypatch, off):
    """A demuxer that takes a seek one keyframe too far (``off=1``: seen on the packets, before
    decoding) is pointed earlier; one that lands a keyframe early (``off=-1``) has the packets
    up to ours dropped undecoded. Either way decoding starts at the target's keyframe."""
    path = make_clip("h264_gops.mp4")

    def one_keyframe_off(index, key, by_dts=False):
        k = list(index.seek_pts).index(key) + off
        return index.seek_pts[min(max(k, 0), len(index.seek_pts) - 1)]

    with VideoReader(str(path)) as reader:
        monkeypatch.setattr(FrameIndex, "seek_timestamp", one_keyframe_off)
        for i in [140, 60, 110, 30, 149]:
            before = reader.stats.frames_decoded
            assert_frames_exact(path, [i], reader.read([i], grayscale=False))
            assert reader.stats.frames_decoded - before <= i % 25 + 1 + 5, f"frame {i}"
        if off > 0:
            assert reader.stats.late_landings >= 4
        else:
            assert reader.stats.packets_skipped >= 4 * 25
        assert reader.stats.counting_fallbacks == 0


def test_edit_list_hides_frames_from_the_count(make_clip):
    path = make_clip("h264_edit_list_discards.mp4")
    assert len(reference_frames(path)) == 53  # 60 encoded, 7 before the edit
    with VideoReader(str(path)) as reader:
        assert reader.frame_count == 53 and not reader.index.sequential


@pytest.mark.parametrize("name", ["centered_pair_small.mp4", "small_robot.mp4"])
def test_shared_videos_random_access_is_exact(name):
    from .conftest import shared_video

    path = shared_video(name)
    n = len(reference_frames(path))
    with VideoReader(str(path)) as reader:
        assert reader.frame_count == n
        for seed in range(3):
            idxs = shuffled_with_duplicates(n, 40, seed)[:150]
            assert_frames_exact(path, idxs, reader.read(idxs, grayscale=False))


def test_frame_count_comes_from_packets_not_the_container_header(make_clip):
    path = make_clip("vp9.webm")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # webm does not say
    with VideoReader(str(path)) as reader:
        assert reader.frame_count == CLIPS["vp9.webm"]["frames"]


def test_consecutive_reads_continue_the_open_decoder_without_seeking(make_clip, monkeypatch):
    path = make_clip("h264_gops.mp4")
    with VideoReader(str(path)) as reader:
        reader.read([0])
        seeks = []
        original = reader._seek_for
        monkeypatch.setattr(reader, "_seek_for", lambda *a: (seeks.append(a), original(*a)))
        for start in range(1, 150, 10):
            reader.read(list(range(start, min(start + 10, 150))))
        assert seeks == []
        reader.read([140, 2])  # going back must seek (or restart) exactly once per target GOP
        assert len(seeks) == 2


@pytest.mark.parametrize("grayscale", [False, True])
def test_a_shuffled_request_decodes_each_gop_about_once_with_a_cache(make_clip, monkeypatch, grayscale):
    """Chunk after chunk of a shuffled request: frames decoded on the way are kept for later chunks."""
    path = make_clip("h264_gops.mp4")
    idxs = shuffled_with_duplicates(150, 30, seed=5)
    decoded = {"plain": 0, "cached": 0}
    for mode in decoded:
        with VideoReader(str(path)) as reader:
            original = reader._next

            def counting_next(original=original, mode=mode):
                decoded[mode] += 1
                return original()

            monkeypatch.setattr(reader, "_next", counting_next)
            cache = FrameCache(64 << 20) if mode == "cached" else None
            for k in range(0, len(idxs), 12):
                if cache is not None:
                    cache.want(later=idxs[k + 12 :], now=idxs[k : k + 12])
                frames = reader.read(idxs[k : k + 12], grayscale=grayscale, cache=cache)
                ref = reference_frames(path)
                expected = [luma(ref[i])[..., None] if grayscale else ref[i] for i in idxs[k : k + 12]]
                for got, want in zip(frames, expected):
                    np.testing.assert_array_equal(got, want)
    assert decoded["cached"] <= 160  # one pass over the 150 frames, give or take a seek
    assert decoded["plain"] > 3 * decoded["cached"]


def test_the_cache_keeps_to_its_budget_and_only_what_is_wanted(make_clip):
    path = make_clip("h264_gops.mp4")
    frame_bytes = 96 * 128 * 3
    cache = FrameCache(10 * frame_bytes)
    with VideoReader(str(path)) as reader:
        cache.want(range(0, 150))
        reader.read([149], cache=cache)  # decodes 125..149 on the way
        assert len(cache) == 10 and cache.nbytes <= cache.max_bytes
        cache.want([])
        assert len(cache) == 0 and cache.nbytes == 0


def _cut_with_a_corrupt_frame(source, tmp_path):
    """A prefix of ``source`` whose last frame a sequential decode flags as corrupt."""
    data = source.read_bytes()
    for percent in range(50, 95, 3):
        cut = tmp_path / f"cut{percent}{source.suffix}"
        cut.write_bytes(data[: len(data) * percent // 100])
        with av.open(str(cut)) as container:
            if any(frame.is_corrupt for frame in container.decode(video=0)):
                return cut
    pytest.skip("no truncation of this clip gave a frame the decoder flags as corrupt")


def test_a_cut_off_stream_serves_every_intact_frame_exactly(make_clip, tmp_path):
    """A recording cut off mid-frame: every frame but the damaged one is exact, in any order.

    The damaged frame's pixels are the decoder's error concealment, which depends on
    its history (threading, where decoding started); only its identity is promised.
    """
    cut = _cut_with_a_corrupt_frame(make_clip("h264.ts"), tmp_path)
    damaged = corrupt_frames(cut)
    n = len(reference_frames(cut))
    with VideoReader(str(cut)) as reader:
        assert reader.frame_count == n
        for order in (list(range(n))[::-1], shuffled_with_duplicates(n, 10, seed=2)):
            assert_frames_exact(cut, order, reader.read(order, grayscale=False), skip=damaged)


def test_stream_without_timestamps_is_read_by_counting(tmp_path):
    path = write_clip(tmp_path / "raw.h264", frames=40, gop=10, bframes=2)
    with VideoReader(str(path)) as reader:
        assert reader.index.sequential
        assert reader.frame_count == 40
        idxs = [39, 3, 3, 0, 25, 24]
        assert_frames_exact(path, idxs, reader.read(idxs, grayscale=False))


def test_a_lying_index_is_caught_and_corrected(make_clip):
    """If packets promise a frame the decoder never presents, the reader re-counts instead of guessing."""
    path = make_clip("h264_gops.mp4")
    with VideoReader(str(path)) as reader:
        honest = reader.index
        # Pretend a packet announced an extra frame between frames 30 and 31.
        fake = list(honest.pts)
        fake.insert(31, (fake[30] + fake[31]) // 2)
        reader.index = FrameIndex(pts=fake, seek_pts=honest.seek_pts)
        idxs = [60, 31, 32, 5]
        assert_frames_exact(path, idxs, reader.read(idxs, grayscale=False))
        assert reader.index.sequential and reader.frame_count == 150


def test_grayscale_is_detected_and_served_as_one_channel(make_clip):
    path = make_clip("gray.mp4")
    with VideoReader(str(path)) as reader:
        assert reader.detected_grayscale
        assert reader.info().channels == 1
        frames = reader.read([5, 1])
        assert frames.shape == (2, 96, 128, 1)
        assert_frames_exact(path, [5, 1], frames)


@pytest.mark.parametrize("name, gray", [("gray.mp4", True), ("h264_gops.mp4", False)])
def test_opening_decodes_nothing_and_only_grayscale_none_decodes_the_first_frame_once(make_clip, monkeypatch, name, gray):
    monkeypatch.setattr(index_store, "_store", None)  # no stored record that already knows the answer
    monkeypatch.setattr(index_store, "_configured", True)
    path = make_clip(name)
    with VideoReader(str(path)) as reader:
        assert reader.stats.frames_decoded == 0  # opened: metadata and index only
        for given in (False, True):  # a caller's choice is served as given: nothing to find out
            assert reader.info(given).channels == (1 if given else 3)
            assert reader.frame_shape(given) == (96, 128, 1 if given else 3)
        assert reader.stats.frames_decoded == 0
        assert reader.info().grayscale is gray and reader.info().channels == (1 if gray else 3)
        assert reader.stats.frames_decoded == 1  # the first frame, once
        frames = reader.read([5, 0])
        assert frames.shape == (2, 96, 128, 1 if gray else 3)
        if gray:
            assert_frames_exact(path, [5, 0], frames)
        else:
            np.testing.assert_array_equal(frames, np.stack([reference_frames(path)[i] for i in (5, 0)]))
        decoded = reader.stats.frames_decoded + reader.stats.packets_undecoded  # on the way to 5: 0-5, some left undecoded
        assert reader.detected_grayscale is gray and decoded == 1 + 6  # kept: not decoded again


def test_a_siblings_reader_knows_what_the_first_frame_showed(make_clip):
    path = make_clip("gray.mp4")
    with VideoReader(str(path)) as reader:
        assert reader.detected_grayscale
        with reader.sibling() as sibling:
            assert sibling.detected_grayscale and sibling.stats.frames_decoded == 0


def test_forcing_grayscale_on_colour_gives_luma(make_clip):
    path = make_clip("h264_gops.mp4")
    with VideoReader(str(path)) as reader:
        assert not reader.detected_grayscale
        frames = reader.read([7], grayscale=True)
    assert frames.shape == (1, 96, 128, 1)
    np.testing.assert_array_equal(frames[0, ..., 0], luma(reference_frames(path)[7]))


def test_luma_of_gray_pixels_is_the_pixel_value():
    values = np.arange(256, dtype=np.uint8)
    rgb = np.stack([values, values, values], axis=-1)
    np.testing.assert_array_equal(luma(rgb), values)


def test_luma_of_colour_follows_bt601():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    exact = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.abs(luma(rgb).astype(float) - exact).max() <= 1.0


def test_metadata(make_clip):
    path = make_clip("h264_gops.mp4")
    with VideoReader(str(path)) as reader:
        info = reader.info()
    assert (info.frame_count, info.height, info.width, info.channels) == (150, 96, 128, 3)
    assert info.codec == "h264" and info.fps == pytest.approx(30)
    assert info.shape == (150, 96, 128, 3)


def test_indices_outside_the_video_are_refused(make_clip):
    path = make_clip("gray.mp4")
    with VideoReader(str(path)) as reader:
        with pytest.raises(FrameIndexError, match="out of range.*40 frames"):
            reader.read([0, 40])
        with pytest.raises(FrameIndexError, match="negative"):
            reader.read([-1])


def test_opening_failures_name_the_cause(tmp_path):
    with pytest.raises(VideoNotFoundError, match="not found"):
        VideoReader(str(tmp_path / "missing.mp4"))
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    with pytest.raises(VideoOpenError, match="not a readable video"):
        VideoReader(str(text))
    with pytest.raises(VideoOpenError):
        VideoReader(str(tmp_path))


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
    with pytest.raises(VideoOpenError, match="no video stream"):
        VideoReader(str(path))


def test_index_from_packets_rules():
    # Discarded packets (edit lists) decode but are never shown; they still count as seek points.
    index = index_from_packets([(-2, True, True), (2, False, False), (0, False, False), (1, False, False), (4, True, False), (3, False, False)])
    assert list(index.pts) == [0, 1, 2, 3, 4]
    assert list(index.seek_pts) == [-2, 4]
    assert index.keyframe_for(3) == -2 and index.keyframe_for(4) == 4
    assert index.keyframe_for(4, back=1) == -2
    assert index_from_packets([(None, True, False)]).sequential
    assert index_from_packets([(0, True, False), (0, False, False)]).sequential
    assert index_from_packets([(0, False, False), (1, True, False)]).sequential


def test_seek_timestamps_and_landings():
    from asyncframes._index import landing

    # (pts, key, discard, dts): B-frames, a keyframe every 4 frames, a reorder delay of 2.
    packets = [(2, True, False, 0), (5, False, False, 1), (3, False, False, 2), (4, False, False, 3),
               (6, True, False, 4), (9, False, False, 5), (7, False, False, 6), (8, False, False, 7)]
    index = index_from_packets(packets)
    assert list(index.seek_dts) == [0, 4] and index.seek_lead == 2
    assert index.seek_timestamp(6, by_dts=True) == 4  # MPEG-TS: the keyframe's own dts
    assert index.seek_timestamp(6) == 6  # pts and dts + lead agree
    # A variable frame rate: the second keyframe's pts is only 1 after its dts, so MP4's
    # pts - lead would fall before it; dts + lead does not, and stays below the next keyframe.
    vfr = index_from_packets([(2, True, False, 0), (3, False, False, 1), (5, True, False, 4), (9, True, False, 8)])
    assert vfr.seek_timestamp(5) == 6 and vfr.seek_timestamp(9) == 10
    tight = index_from_packets([(10, True, False, 0), (11, True, False, 1)])
    assert tight.seek_timestamp(10) == 10  # never at the next keyframe
    # Without dts (Matroska's first packet, old indexes): the pts.
    assert index_from_packets([(0, True, False), (4, True, False)]).seek_timestamp(4, by_dts=True) == 4
    assert FrameIndex(pts=[0, 1], seek_pts=[0, 1]).seek_timestamp(1) == 1
    assert [landing(p, 6) for p in (5, 6, 7, None)] == ["before", "at", "after", "unknown"]


def test_gray_shortcut_gives_the_red_channel_and_turns_itself_off_when_contradicted(make_clip, monkeypatch):
    import av

    from asyncframes import _convert as convert

    with av.open(str(make_clip("gray.mp4"))) as container:
        frame = next(container.decode(video=0))
    rgb = frame.to_ndarray(format="rgb24")
    conv = convert.Converter("gray.mp4")
    assert np.array_equal(conv.gray(frame), rgb[..., :1])
    assert conv._trials == convert.TRIALS - 1
    tinted = rgb.copy()
    tinted[0, 0, 2] ^= 1  # a channel that disagrees although the chroma planes are neutral
    monkeypatch.setattr(convert, "rgb24", lambda _frame: tinted)
    assert np.array_equal(conv.gray(frame), luma(tinted)[..., None])
    assert conv._trials is None, "the shortcut is off for good"
    assert np.array_equal(conv.gray(frame), luma(tinted)[..., None])


@given(
    start=st.integers(-5, 60),
    stop=st.integers(-5, 60),
    step=st.integers(-7, 7).filter(bool),
    listed=st.lists(st.integers(-5, 60), max_size=30),
)
def test_the_first_index_outside_a_video_is_found_as_a_scan_would(start, stop, step, listed):
    """check_indices is vectorised (ranges at their ends, arrays at once); it must name the
    same index a plain scan in request order would."""
    from asyncframes._index import first_outside

    n = 40
    for idxs in (range(start, stop, step), listed, np.asarray(listed, dtype=np.int64)):
        expected = next((int(i) for i in idxs if not 0 <= i < n), None)
        assert first_outside(idxs, n) == expected
