"""Frame indexes kept on disk: a second open reads the index instead of demuxing, a changed
or damaged file is indexed again, writers never leave half a record, the folder stays small."""

from __future__ import annotations

import io
import json
import multiprocessing
import shutil
from fractions import Fraction

import attrs
import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncframes import AsyncVideo
from asyncframes import _index_store as index_store
from asyncframes._index import FrameIndex, StreamFacts, index_from_record, index_record, record_facts, record_grayscale
from asyncframes._reader import VideoReader
from asyncframes._sample import write_clip

from .conftest import assert_frames_exact, reference_frames, wait_until
from .test_standalone_server import Server


@pytest.fixture
def store(tmp_path, monkeypatch):
    """This test's own store (the module's process-wide one restored after)."""
    monkeypatch.setattr(index_store, "_store", index_store.IndexStore(tmp_path / "indexes"))
    monkeypatch.setattr(index_store, "_configured", True)
    return index_store.store()


# -- records (pure) ------------------------------------------------------------------------------


@pytest.mark.pure
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=300, unique=True), st.data())
def test_any_packet_index_comes_back_from_its_record(pts, data):
    pts = sorted(pts)
    seek = sorted(set([pts[0]] + data.draw(st.lists(st.sampled_from(pts), max_size=20))))
    dts = [data.draw(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))) for _ in seek]
    index = FrameIndex(pts=pts, seek_pts=seek, seek_dts=dts, seek_lead=data.draw(st.integers(0, 9)))
    assert index_from_record(index_record(index)) == index


@pytest.mark.pure
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=300, unique=True), st.sampled_from([None, False, True]))
def test_a_record_comes_back_whole_from_its_bytes(pts, gray):
    index = FrameIndex(pts=sorted(pts), seek_pts=[min(pts)], seek_dts=[None], seek_lead=1)
    out = io.BytesIO()
    index_store.write_arrays(out, index_record(index, gray, FACTS))
    arrays = index_store.arrays_from(out.getvalue())
    assert index_from_record(arrays) == index and record_grayscale(arrays) is gray and record_facts(arrays) == FACTS


@pytest.mark.pure
@given(st.binary(max_size=300))
def test_any_bytes_are_a_record_or_a_value_error(data):
    try:
        index_store.arrays_from(data)
    except ValueError:
        pass


@pytest.mark.pure
def test_a_record_holding_anything_but_plain_numbers_and_strings_is_refused():
    for dtype in ("|O", "|V8", "<M8[s]"):
        data = msgpack.packb({"arrays": {"pts": [dtype, [1], bytes(8)]}})
        with pytest.raises(ValueError):
            index_store.arrays_from(data)


@pytest.mark.pure
@pytest.mark.parametrize("gray", [None, False, True])
def test_what_the_first_frame_showed_comes_back_from_the_record(gray):
    record = index_record(FrameIndex(pts=[0, 10], seek_pts=[0]), gray)
    assert record_grayscale(record) is gray


@pytest.mark.pure
def test_a_record_from_before_grayscale_was_kept_is_an_index_that_does_not_know():
    index = FrameIndex(pts=[0, 10, 20], seek_pts=[0], seek_dts=[-10])
    record = index_record(index, True)
    del record["grayscale"]
    assert index_from_record(record) == index and record_grayscale(record) is None


@pytest.mark.pure
@pytest.mark.parametrize("value", [np.array(2, dtype=np.int8), np.array([1], dtype=np.int8), np.array(1.0), np.array("yes")])
def test_a_record_whose_grayscale_is_not_one_we_write_is_refused(value):
    record = index_record(FrameIndex(pts=[0, 10], seek_pts=[0]), True)
    record["grayscale"] = value
    with pytest.raises(ValueError):
        record_grayscale(record)


FACTS = StreamFacts(width=1024, height=768, codec="h264", pix_fmt="yuv420p", container_format="mov,mp4,m4a,3gp,3g2,mj2",
                    fps=29.97002997002997, duration=12.345, time_base=Fraction(1, 15360),
                    average_rate=Fraction(30000, 1001), frames_from_header=370)


@pytest.mark.pure
@pytest.mark.parametrize("facts", [
    FACTS,
    attrs.evolve(FACTS, duration=None, time_base=None, average_rate=None, frames_from_header=None, fps=0.0, pix_fmt=""),
])
def test_a_streams_facts_come_back_from_the_record(facts):
    record = index_record(FrameIndex(pts=[0, 10], seek_pts=[0]), None, facts)
    assert record_facts(record) == facts
    del record["facts"]  # as written before facts were kept
    assert record_facts(record) is None


@pytest.mark.pure
@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("fps"),
        lambda d: d.update(width=0),
        lambda d: d.update(height=True),
        lambda d: d.update(frames=1.5),
        lambda d: d.update(codec=3),
        lambda d: d.update(fps="30"),
        lambda d: d.update(time_base=[1, 0]),
        lambda d: d.update(average_rate=[30000]),
        lambda d: d.update(extra=1),
    ],
)
def test_a_record_whose_facts_are_not_as_we_write_them_is_refused(damage):
    record = index_record(FrameIndex(pts=[0, 10], seek_pts=[0]), None, FACTS)
    facts = json.loads(str(record["facts"]))
    damage(facts)
    record["facts"] = np.array(json.dumps(facts))
    with pytest.raises(ValueError):
        record_facts(record)
    record["facts"] = np.array(["{}"])  # not one string
    with pytest.raises(ValueError):
        record_facts(record)


@pytest.mark.pure
def test_a_counted_index_with_missing_timestamps_comes_back_too():
    index = FrameIndex(pts=[5, None, 3], seek_pts=[], sequential=True, reason="no timestamps", seek_dts=[])
    assert index_from_record(index_record(index)) == index


@pytest.mark.pure
@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.pop("pts"),
        lambda r: r.update(version=np.array(99)),
        lambda r: r.update(pts=r["pts"][::-1].copy()),  # out of order for a packet index
        lambda r: r.update(pts_missing=r["pts_missing"][:-1]),  # lengths differ
        lambda r: r.update(seek_pts=np.array([7, 3])),
        lambda r: r.update(pts=r["pts"].astype(float)),
    ],
)
def test_a_record_that_does_not_make_a_valid_index_is_refused(damage):
    record = index_record(FrameIndex(pts=[0, 10, 20, 30], seek_pts=[0, 20], seek_dts=[-10, 10]))
    damage(record)
    with pytest.raises(ValueError):
        index_from_record(record)


# -- the store, with real files ---------------------------------------------------------------------


def test_a_second_reader_takes_the_index_from_disk_and_reads_exact_frames(store, make_clip):
    path = str(make_clip("h264_gops.ts"))
    with VideoReader(path) as first:
        assert first.index_source == "demuxed"
        built = first.index
    assert len(list(store.folder.glob("*" + index_store.SUFFIX))) == 1
    with VideoReader(path) as second:
        assert second.index_source == "stored" and second.index == built
        idxs = [149, 3, 77, 3, 120]
        assert all(np.array_equal(f, reference_frames(path)[i]) for i, f in zip(idxs, second.read(idxs)))


@pytest.mark.parametrize("gray", [True, False])
def test_a_second_reader_knows_whether_the_first_frame_is_gray_without_decoding_it(store, tmp_path, gray):
    path = tmp_path / "clip.mp4"
    write_clip(path, frames=90, gop=30, grayscale=gray)
    with VideoReader(str(path)) as first:
        assert first.index_source == "demuxed" and first.stats.frames_decoded == 0
        assert first.detected_grayscale is gray and first.stats.frames_decoded == 1  # the record learns it too
    with VideoReader(str(path)) as second:
        assert second.index_source == "stored"
        assert second.detected_grayscale is gray and second.stats.frames_decoded == 0
        frames = second.read([7, 0])
        assert frames.shape[-1] == (1 if gray else 3)
        if gray:
            assert_frames_exact(path, [7, 0], frames)
        else:
            assert all(np.array_equal(f, reference_frames(path)[i]) for i, f in zip([7, 0], frames))


@pytest.mark.parametrize("name", ["h264_gops.mp4", "h264_vfr.mp4", "h264.mkv", "h264.ts", "h264_bframes_longgop.mp4"])
def test_a_second_reader_describes_a_stored_file_without_opening_it(store, make_clip, name):
    path = str(make_clip(name))
    with VideoReader(path) as first:
        opened = (first.info(False), first.frame_times(), first.time_base, first.average_rate, first.frames_from_header)
    with VideoReader(path) as second:
        assert second.index_source == "stored"
        described = (second.info(False), second.frame_times(), second.time_base, second.average_rate, second.frames_from_header)
        assert second.stats.opens == 0 and second.stats.frames_decoded == 0
        assert repr(described) == repr(opened)  # the same values, of the same types
        idxs = [0, len(reference_frames(path)) - 1, 7]
        assert all(np.array_equal(f, reference_frames(path)[i]) for i, f in zip(idxs, second.read(idxs, grayscale=False)))
        assert second.stats.opens == 1


def test_a_record_from_before_facts_were_kept_is_used_and_learns_them(store, make_clip):
    path = str(make_clip("h264_gops.mp4"))
    VideoReader(path).close()
    (kept,) = store.folder.glob("*" + index_store.SUFFIX)
    old = {name: a for name, a in index_store.read_arrays(kept).items() if name != "facts"}
    with open(kept, "wb") as out:
        index_store.write_arrays(out, old)
    with VideoReader(path) as reader:
        assert reader.index_source == "stored" and reader.stats.opens == 1  # opened to read its facts
    with VideoReader(path) as reader:
        assert reader.index_source == "stored" and reader.stats.opens == 0


def test_a_record_from_before_grayscale_was_kept_is_used_and_learns_it(store, tmp_path):
    path = tmp_path / "gray.mp4"
    write_clip(path, frames=90, gop=30, grayscale=True)
    VideoReader(str(path)).close()
    (kept,) = store.folder.glob("*" + index_store.SUFFIX)
    old = {name: a for name, a in index_store.read_arrays(kept).items() if name != "grayscale"}
    with open(kept, "wb") as out:  # as written before records kept grayscale
        index_store.write_arrays(out, old)
    with VideoReader(str(path)) as reader:
        assert reader.index_source == "stored" and reader.stats.frames_decoded == 0
        assert reader.detected_grayscale and reader.stats.frames_decoded == 1  # did not know: decoded
    with VideoReader(str(path)) as reader:
        assert reader.index_source == "stored" and reader.detected_grayscale and reader.stats.frames_decoded == 0


def test_a_file_that_changed_is_indexed_again(store, tmp_path):
    path = tmp_path / "clip.mp4"
    write_clip(path, frames=90, gop=30)
    with VideoReader(str(path)) as reader:
        assert reader.index_source == "demuxed"
    write_clip(path, frames=120, gop=30)  # same name, other content
    with VideoReader(str(path)) as reader:
        assert reader.index_source == "demuxed" and reader.frame_count == 120
    with VideoReader(str(path)) as reader:
        assert reader.index_source == "stored" and reader.frame_count == 120


def test_a_damaged_record_is_a_miss_and_is_replaced(store, make_clip):
    path = str(make_clip("h264_gops.mp4"))
    VideoReader(path).close()
    (record,) = store.folder.glob("*" + index_store.SUFFIX)
    record.write_bytes(record.read_bytes()[:100])  # truncated, as by a crash mid-write elsewhere
    with VideoReader(path) as reader:
        assert reader.index_source == "demuxed" and reader.frame_count == 150
    with VideoReader(path) as reader:
        assert reader.index_source == "stored"


def test_the_folder_is_kept_under_its_cap_least_recently_used_first(store, tmp_path):
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"clip{k}.mp4")
        write_clip(paths[-1], frames=90 + 10 * k, gop=30)
    VideoReader(str(paths[0])).close()
    one = sum(p.stat().st_size for p in store.folder.glob("*" + index_store.SUFFIX))
    store.max_bytes = int(one * 2.5)  # room for two records
    VideoReader(str(paths[1])).close()
    VideoReader(str(paths[0])).close()  # a hit: clip0 becomes the most recently used
    VideoReader(str(paths[2])).close()  # a third record: the least recently used (clip1) goes
    sources = {}
    for k in (0, 2, 1):
        with VideoReader(str(paths[k])) as reader:
            sources[k] = reader.index_source
    assert sources == {0: "stored", 2: "stored", 1: "demuxed"}


def _save_many(folder: str, path: str, rounds: int) -> None:
    store = index_store.IndexStore(folder)
    with VideoReader(path) as reader:
        key = store.key(reader.signature, 0)
        for _ in range(rounds):
            store.save(key, reader.index)


def test_writers_at_the_same_time_never_leave_half_a_record(store, make_clip):
    path = str(make_clip("h264_gops.mp4"))
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_save_many, args=(str(store.folder), path, 30)) for _ in range(3)]
    for w in writers:
        w.start()
    seen = 0
    while any(w.is_alive() for w in writers):  # read while they write: always whole or absent
        for record in store.folder.glob("*" + index_store.SUFFIX):
            try:
                index_from_record(index_store.read_arrays(record))
                seen += 1
            except FileNotFoundError:
                pass  # replaced between listing and opening
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    assert not list(store.folder.glob(".*.tmp"))  # no temporary file left
    with VideoReader(path) as reader:
        assert reader.index_source == "stored"


def test_a_new_server_opens_a_video_an_earlier_one_indexed(tmp_path, make_clip):
    root, indexes = tmp_path / "root", tmp_path / "indexes"
    root.mkdir()
    shutil.copy(make_clip("h264_bframes_longgop.mp4"), root / "long.mp4")
    ref = reference_frames(make_clip("h264_bframes_longgop.mp4"))
    for _ in range(2):
        server = Server(tmp_path, "--root", str(root), "--index-cache", str(indexes))
        try:
            with AsyncVideo(server.endpoint) as av:
                av.load_by_chunk("long.mp4", [149, 0, 75], frames_per_chunk=3)
                ((idxs, frames),) = list(av.chunks)
                assert all(np.array_equal(f, ref[i]) for i, f in zip(idxs, frames))
        finally:
            server.stop()
        assert len(list(indexes.glob("*" + index_store.SUFFIX))) == 1  # written by the first, read by the second


def test_a_running_server_writes_what_opening_learnt_once_it_is_idle(tmp_path):
    root, indexes = tmp_path / "root", tmp_path / "indexes"
    root.mkdir()
    write_clip(root / "gray.mp4", frames=90, gop=30, grayscale=True)

    def record() -> "tuple[object, object] | None":
        for kept in indexes.glob("*" + index_store.SUFFIX):
            arrays = index_store.read_arrays(kept)
            return record_grayscale(arrays), record_facts(arrays)
        return None

    server = Server(tmp_path, "--root", str(root), "--index-cache", str(indexes))
    try:
        with AsyncVideo(server.endpoint) as av:
            info = av.info("gray.mp4")  # grayscale=None: the server finds out
            assert info.grayscale and info.channels == 1
            wait_until(lambda: record() is not None and record()[0] is True, within=30, what="the record, written while idle")
            grayscale, facts = record()
            assert facts is not None and (facts.width, facts.height) == (info.width, info.height)
            server.assert_alive()
    finally:
        server.stop()
