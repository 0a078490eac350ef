"""The rules of opening videos and decoding them, driven directly: no sockets, no processes.

:class:`VideoOpener` (which file, confinement, the LRU of open readers, a changed file
reopened, workers' own readers) and :class:`DecoderPool` (the recent-frames cache keyed
by the file's identity, reading around, frames split over workers), on real files.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from asyncframes import ServerError, VideoAccessError, VideoChangedError
from asyncframes import _index_store as index_store
from asyncframes._opener import VideoOpener
from asyncframes._pool import DecoderPool, RecentFrames
from asyncframes._reader import FrameCache, ReadInterrupted, VideoReader
from asyncframes._sample import write_clip
from asyncframes._video import Video

from .conftest import assert_frames_exact, shared_video, shuffled_with_duplicates
from .test_files_served import H, W, decode_all, replace, rewrite_in_place, y4m_bytes

pytestmark = pytest.mark.pure

posix_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX links")


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    """Three small Y4M clips, a.y4m b.y4m c.y4m, with different content."""
    for seed, name in enumerate("abc"):
        (tmp_path / f"{name}.y4m").write_bytes(y4m_bytes(12, seed=seed + 1))
    return tmp_path


@pytest.fixture
def opener():
    opener = VideoOpener(max_open_files=2)
    yield opener
    opener.close()


def video(folder: Path, name: str, **options) -> Video:
    return Video(str(folder / name), **options)


def is_closed(reader) -> bool:
    return reader._container is None


def open_and_read(opener: VideoOpener, v: Video):
    """The opener's reader of ``v``, with its decoder running (an open may leave the file
    closed until the first read, when it only demuxed it)."""
    reader = opener.open(v)
    reader.read([0], grayscale=False)
    return reader


# -- the opener -----------------------------------------------------------------------


def test_the_same_video_is_opened_once_and_grayscale_does_not_matter(clips, opener):
    reader = opener.open(video(clips, "a.y4m"))
    assert opener.open(video(clips, "a.y4m", grayscale=True)) is reader
    assert opener.opened(video(clips, "a.y4m")) is reader
    assert len(opener) == 1


def test_at_most_max_open_files_stay_open_and_the_least_recently_used_goes(clips, opener):
    a = open_and_read(opener, video(clips, "a.y4m"))
    b = open_and_read(opener, video(clips, "b.y4m"))
    opener.open(video(clips, "a.y4m"))  # a is now the most recently used
    c = open_and_read(opener, video(clips, "c.y4m"))
    assert len(opener) == 2
    assert is_closed(b) and not is_closed(a) and not is_closed(c)
    assert opener.opened(video(clips, "b.y4m")) is None  # never opens
    assert len(opener) == 2


@pytest.mark.parametrize("change", ["replace", "rewrite_in_place"])
def test_a_file_that_changed_on_disk_is_closed_and_reopened(clips, opener, change):
    v = video(clips, "a.y4m")
    old = open_and_read(opener, v)
    if change == "replace":
        replace(clips / "a.y4m", y4m_bytes(12, seed=9, size=(W + 16, H + 16)))
    else:
        rewrite_in_place(clips / "a.y4m", y4m_bytes(12, seed=9))
    assert opener.opened(v) is None  # stale: not offered for reading around
    new = opener.open(v)
    assert new is not old and is_closed(old)
    assert new.signature != old.signature
    assert np.array_equal(new.read([5])[0], decode_all(clips / "a.y4m")[5])


def test_forget_closes_the_reader_so_the_next_open_is_afresh(clips, opener):
    v = video(clips, "a.y4m")
    old = open_and_read(opener, v)
    worker = opener.worker_reader(0, v)
    opener.forget(v)
    assert is_closed(old) and is_closed(worker) and len(opener) == 0
    assert opener.open(v) is not old


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "v.y4m").write_bytes(y4m_bytes(6, seed=1))
    (outside / "secret.y4m").write_bytes(y4m_bytes(6, seed=2))
    (root / "link.y4m").symlink_to(outside / "secret.y4m")
    return root


@posix_only
@pytest.mark.parametrize("name", ["../outside/secret.y4m", "link.y4m", "http://127.0.0.1:1/v.y4m", "concat:v.y4m|v.y4m"])
def test_a_confined_opener_refuses_what_lies_outside_its_root(root, name):
    opener = VideoOpener(str(root))
    try:
        with pytest.raises(VideoAccessError):
            opener.open(Video(name))
        assert len(opener) == 0
        assert opener.open(Video("v.y4m")).filename == str((root / "v.y4m").resolve())
        assert opener.resolve("v.y4m") == str((root / "v.y4m").resolve())
        assert opener.container_options is not None and opener.container_options["protocol_whitelist"] == "file"
    finally:
        opener.close()


def test_an_unconfined_opener_opens_names_as_given_with_ffmpegs_defaults(clips, opener):
    assert opener.resolve("../any/where.mp4") == "../any/where.mp4"
    assert opener.container_options is None
    assert opener.open(video(clips, "a.y4m")).container_options == {}


@posix_only
def test_a_file_added_to_a_sequence_while_it_opens_cannot_slip_past_the_check(tmp_path, monkeypatch):
    """The race the README's 'which files' promise must survive: the check passes on three files,
    then a fourth (a link out) appears before FFmpeg lists the sequence."""
    from asyncframes import _reader as reader_module

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    frames = shared_video("robot_frames")
    for n in range(3):
        shutil.copy(frames / f"robot{n}.jpg", root / f"seq{n}.jpg")
    shutil.copy(frames / "robot1.jpg", outside / "secret.jpg")
    real_identity = reader_module.source_identity

    def identity_after_the_race(path):
        if not (root / "seq3.jpg").is_symlink():
            (root / "seq3.jpg").symlink_to(outside / "secret.jpg")
        return real_identity(path)

    monkeypatch.setattr(reader_module, "source_identity", identity_after_the_race)
    opener = VideoOpener(str(root))
    try:
        with pytest.raises(VideoAccessError, match="outside this server's video folder"):
            opener.open(Video("seq%d.jpg"))
        assert len(opener) == 0
    finally:
        opener.close()


# -- workers' readers -------------------------------------------------------------------


def test_each_worker_has_its_own_reader_sharing_the_index(clips, opener, monkeypatch):
    v = video(clips, "a.y4m")
    main = opener.open(v)
    from asyncframes import _reader as reader_module

    def no_demuxing(self):
        raise AssertionError("a worker's reader demuxed the file again")

    monkeypatch.setattr(reader_module.VideoReader, "_build_index", no_demuxing)
    w0, w1 = opener.worker_reader(0, v), opener.worker_reader(1, v)
    assert len({id(main), id(w0), id(w1)}) == 3
    assert w0.index is main.index and w1.index is main.index
    assert opener.worker_reader(0, v) is w0  # kept open
    assert np.array_equal(w1.read([7])[0], main.read([7])[0])


def test_each_worker_keeps_at_most_max_open_files(clips, opener):
    readers = []
    for name in "abc":
        v = video(clips, name + ".y4m")
        opener.open(v)
        readers.append(opener.worker_reader(0, v))
    assert is_closed(readers[0]) and not is_closed(readers[1]) and not is_closed(readers[2])


@pytest.mark.parametrize("change", ["replace", "rewrite_in_place"])
def test_a_workers_reader_of_a_file_changed_since_it_was_indexed_is_refused(clips, opener, change):
    v = video(clips, "a.y4m")
    main = open_and_read(opener, v)
    if change == "replace":
        replace(clips / "a.y4m", y4m_bytes(12, seed=9))  # same size, new content
    else:
        rewrite_in_place(clips / "a.y4m", y4m_bytes(12, seed=9))
    with pytest.raises(VideoChangedError, match="changed while being read"):
        opener.worker_reader(0, v)
    assert not is_closed(main)  # the opening thread's reader is never closed from a worker


def test_a_workers_reader_that_opened_a_newer_file_than_was_indexed_is_refused(clips, opener, monkeypatch):
    """The file changes between the staleness check and the worker's open (the race)."""
    v = video(clips, "a.y4m")
    main = opener.open(v)
    rewrite_in_place(clips / "a.y4m", y4m_bytes(12, seed=9))
    monkeypatch.setattr(main, "is_stale", lambda: False)
    with pytest.raises(VideoChangedError, match="changed while being read"):
        opener.worker_reader(0, v)


def test_a_worker_reader_replaced_when_its_file_was_reopened(clips, opener):
    v = video(clips, "a.y4m")
    opener.open(v)
    old = opener.worker_reader(0, v)
    rewrite_in_place(clips / "a.y4m", y4m_bytes(12, seed=9))
    main = opener.open(v)  # reopened: a new index
    new = opener.worker_reader(0, v)
    assert new is not old and is_closed(old) and new.index is main.index
    assert np.array_equal(new.read([3])[0], decode_all(clips / "a.y4m")[3])


def test_a_worker_may_only_read_what_is_open(clips, opener):
    with pytest.raises(ServerError, match="not open"):
        opener.worker_reader(0, video(clips, "a.y4m"))


# -- the pool ---------------------------------------------------------------------------


def pool_read(pool: DecoderPool, v: Video, idxs, *, recent: bool, cache=None, identity=None) -> np.ndarray:
    main = pool.opener.open(v)
    out = np.zeros((len(idxs), *main.frame_shape(False)), np.uint8)
    pool.read(v, list(idxs), False, out, identity=main.signature if identity is None else identity, cache=cache, recent=recent)
    return out


@pytest.fixture
def pool(opener):
    pool = DecoderPool(opener, workers=1, recent_cache_bytes=64 << 20)
    yield pool
    pool.close()


def test_a_small_request_is_exact_and_served_again_from_recent_frames(make_clip, pool, monkeypatch):
    clip = make_clip("h264_gops.mp4")
    v = Video(str(clip))
    idxs = [60, 3, 60, 149]
    assert_frames_exact(clip, idxs, pool_read(pool, v, idxs, recent=True))
    assert len(pool.recent) == 3
    reader = pool.opener.open(v)
    monkeypatch.setattr(reader, "read", lambda *a, **k: pytest.fail("a recent frame was decoded again"))
    assert_frames_exact(clip, [149, 3], pool_read(pool, v, [149, 3], recent=True))


def test_a_large_request_never_fills_the_recent_frames(make_clip, pool):
    clip = make_clip("h264_gops.mp4")
    assert_frames_exact(clip, range(40), pool_read(pool, Video(str(clip)), range(40), recent=False))
    assert len(pool.recent) == 0


@pytest.mark.parametrize("change", ["replace", "rewrite_in_place"])
def test_recent_frames_of_a_file_that_changed_are_never_served(clips, pool, change):
    v = video(clips, "a.y4m")
    old = decode_all(clips / "a.y4m")
    assert np.array_equal(pool_read(pool, v, [4], recent=True)[0], old[4])
    assert pool.read_around(v, False, range(12), interrupt=lambda: False) == 11
    if change == "replace":
        replace(clips / "a.y4m", y4m_bytes(12, seed=9))
    else:
        rewrite_in_place(clips / "a.y4m", y4m_bytes(12, seed=9))
    new = decode_all(clips / "a.y4m")
    for i in (4, 5):
        got = pool_read(pool, v, [i], recent=True)[0]  # nobody told the pool the file changed
        assert np.array_equal(got, new[i]) and not np.array_equal(got, old[i])


def test_a_request_started_on_another_version_of_the_file_fails(clips, pool):
    v = video(clips, "a.y4m")
    before = pool.opener.open(v).signature
    rewrite_in_place(clips / "a.y4m", y4m_bytes(12, seed=9))
    for recent in (True, False):
        with pytest.raises(VideoChangedError, match="changed while being read"):
            pool_read(pool, v, [1, 2], recent=recent, identity=before)


def change_while_reading(reader, path, monkeypatch) -> None:
    """Make ``reader`` rewrite its file in place (new pictures) right after each read."""
    real_read = reader.read

    def read_then_change(*args, **kwargs):
        frames = real_read(*args, **kwargs)
        rewrite_in_place(path, y4m_bytes(12, seed=9))
        return frames

    monkeypatch.setattr(reader, "read", read_then_change)


@pytest.mark.parametrize("recent", [True, False])
def test_a_file_changed_while_decoding_fails_the_read(clips, pool, monkeypatch, recent):
    v = video(clips, "a.y4m")
    change_while_reading(pool.opener.open(v), clips / "a.y4m", monkeypatch)
    with pytest.raises(VideoChangedError):
        pool_read(pool, v, [1, 2], recent=recent)
    assert len(pool.recent) == 0


def test_frames_read_around_while_the_file_changed_are_not_kept(clips, pool, monkeypatch):
    v = video(clips, "a.y4m")
    change_while_reading(pool.opener.open(v), clips / "a.y4m", monkeypatch)
    assert pool.read_around(v, False, range(12), interrupt=lambda: False) == 0
    assert len(pool.recent) == 0


def test_reading_around_fills_recent_frames_from_an_open_reader_only(make_clip, pool):
    clip = make_clip("h264_gops.mp4")
    v = Video(str(clip))
    assert pool.read_around(v, False, range(50, 70), interrupt=lambda: False) == 0  # not open: nothing opened
    assert len(pool.opener) == 0
    pool_read(pool, v, [60], recent=True)
    assert pool.read_around(v, False, range(50, 70), interrupt=lambda: False) == 19  # 60 was kept already
    assert pool.read_around(v, False, range(50, 70), interrupt=lambda: False) == 0
    assert pool.read_around(v, False, range(145, 160), interrupt=lambda: False) == 5  # clipped to the video
    pool.opener.open(v).read = lambda *a, **k: pytest.fail("decoded again")
    assert_frames_exact(clip, [51, 69, 149], pool_read(pool, v, [51, 69, 149], recent=True))


def test_reading_around_stops_quietly_and_never_raises(make_clip, pool, monkeypatch):
    clip = make_clip("h264_gops.mp4")
    v = Video(str(clip))
    reader = pool.opener.open(v)
    asked = []
    assert pool.read_around(v, False, range(0, 20), interrupt=lambda: asked.append(1) or True) == 0
    assert asked and len(pool.recent) == 0

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(reader, "read", broken)
    assert pool.read_around(v, False, range(0, 20), interrupt=lambda: False) == 0


def test_reading_around_interrupted_keeps_every_frame_it_decoded_and_the_decoder_in_line(make_clip, pool):
    """A person stepping forward interrupts reading ahead: the frames decoded by then are all
    kept, and the decoder has not gone past one it threw away, so the next frame costs one
    decode, never a seek back to its keyframe."""
    clip = make_clip("h264_gops.mp4")  # GOPs of 25 frames
    v = Video(str(clip))
    pool_read(pool, v, [30], recent=True)
    reader = pool.opener.open(v)
    for quiet in (3, 4, 5):  # the interruption comes at various points of reading
        answers = iter([False] * quiet + [True] * 100)
        pool.read_around(v, False, range(31, 45), interrupt=answers.__next__)
    key = next(iter(pool.recent._frames))[0]
    kept = [i for i in range(31, 45) if pool.recent.has(key, i)]
    assert kept == list(range(31, 31 + len(kept))) and len(kept) >= 3
    decoded, seeks = reader.stats.frames_decoded, reader.stats.seeks
    following = kept[-1] + 1
    assert_frames_exact(clip, [following], pool_read(pool, v, [following], recent=True))
    assert reader.stats.seeks == seeks and reader.stats.frames_decoded - decoded == 1


def test_frames_of_the_span_kept_from_before_are_not_the_first_to_go_while_it_is_read(make_clip, opener):
    """A frame kept long ago that lies just ahead must still be there when the person steps
    to it: reading the span around counts it as used."""
    clip = make_clip("h264_gops.mp4")  # 96x128: 36,864 bytes a frame
    v = Video(str(clip))
    pool = DecoderPool(opener, workers=1, recent_cache_bytes=6 * 96 * 128 * 3)  # six frames
    try:
        pool_read(pool, v, [33], recent=True)  # kept first: the oldest
        for i in (60, 70, 80, 90):
            pool_read(pool, v, [i], recent=True)
        pool_read(pool, v, [30], recent=True)  # six kept now; 33 is the oldest
        assert pool.read_around(v, False, range(31, 35), interrupt=lambda: False) == 3  # 31, 32, 34
        key = next(iter(pool.recent._frames))[0]
        assert all(pool.recent.has(key, i) for i in (30, 31, 32, 33, 34))
    finally:
        pool.close()


def test_an_interrupted_read_raises_read_interrupted(make_clip, pool):
    clip = make_clip("h264_gops.mp4")
    v = Video(str(clip))
    main = pool.opener.open(v)
    out = np.zeros((30, *main.frame_shape(False)), np.uint8)
    with pytest.raises(ReadInterrupted):
        pool.read(v, list(range(30)), False, out, identity=main.signature, interrupt=lambda: True)


@pytest.mark.parametrize("clip_name", ["h264_gops.mp4", "h264_vfr.mp4", "vp9.webm"])
def test_two_workers_split_by_gop_are_exact(make_clip, clip_name, monkeypatch):
    clip = make_clip(clip_name)
    opener = VideoOpener()
    pool = DecoderPool(opener, workers=2, recent_cache_bytes=0)
    used: set[int] = set()
    real = opener.worker_reader
    monkeypatch.setattr(opener, "worker_reader", lambda worker, v: used.add(worker) or real(worker, v))
    try:
        v = Video(str(clip))
        n = opener.open(v).frame_count
        idxs = shuffled_with_duplicates(n, 40, seed=9)
        cache = FrameCache(64 << 20)
        for start in range(0, len(idxs), 48):
            chunk = idxs[start : start + 48]
            cache.want(later=idxs[start + 48 :], now=chunk)
            assert_frames_exact(clip, chunk, pool_read(pool, v, chunk, recent=False, cache=cache))
        assert used == {0, 1}
    finally:
        pool.close()
        opener.close()


def test_recent_frames_keep_to_their_budget():
    frame = np.zeros((10, 10, 3), np.uint8)
    recent = RecentFrames(max_bytes=3 * frame.nbytes)
    for i in range(5):
        recent.put("k", i, frame)
    assert len(recent) == 3 and recent.nbytes == 3 * frame.nbytes
    assert not recent.has("k", 0) and recent.has("k", 4)


def test_a_full_recent_cache_copies_a_new_frame_over_the_one_it_lets_go():
    frames = [np.full((10, 10, 3), i, np.uint8) for i in range(3)]
    recent = RecentFrames(max_bytes=2 * frames[0].nbytes)
    recent.put("k", 0, frames[0])
    recent.put("k", 1, frames[1])
    oldest = recent.get("k", 0)
    recent.get("k", 1)  # frame 1 used since: frame 0 goes first
    recent.put("k", 2, frames[2])
    assert not recent.has("k", 0)
    kept = recent.get("k", 2)
    assert kept is oldest and np.array_equal(kept, frames[2])  # the same memory, the new pixels
    assert not np.shares_memory(kept, frames[2])  # a copy: the caller's buffer serves other chunks
    recent.put("k", 3, np.zeros((5, 5, 3), np.uint8))  # another shape takes memory of its own
    assert recent.get("k", 3).shape == (5, 5, 3)


def test_a_small_request_decodes_straight_into_the_chunk(make_clip, pool, monkeypatch):
    clip = make_clip("h264_gops.mp4")
    v = Video(str(clip))
    main = pool.opener.open(v)
    real_read, outs = main.read, []

    def read(*args, **kwargs):
        outs.append(kwargs.get("out"))
        return real_read(*args, **kwargs)

    monkeypatch.setattr(main, "read", read)
    out = np.zeros((3, *main.frame_shape(False)), np.uint8)
    pool.read(v, [7, 90, 7], False, out, identity=main.signature, recent=True)
    assert_frames_exact(clip, [7, 90, 7], out)
    assert len(outs) == 1 and outs[0] is out  # no array of its own, copied into the chunk after
    assert len(pool.recent) == 2


# -- index records ----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> index_store.IndexStore:
    """This test's own index store (the process-wide one restored after)."""
    monkeypatch.setattr(index_store, "_store", index_store.IndexStore(tmp_path / "indexes"))
    monkeypatch.setattr(index_store, "_configured", True)
    kept = index_store.store()
    assert kept is not None
    return kept


def test_an_opener_that_writes_records_later_writes_them_when_told_or_when_a_reader_goes(store, tmp_path):
    paths = [tmp_path / "gray.mp4", tmp_path / "colour.mp4"]
    write_clip(paths[0], frames=90, gop=30, grayscale=True)
    write_clip(paths[1], frames=90, gop=30)
    opener = VideoOpener(write_records_later=True)
    try:
        reader = opener.open(Video(str(paths[0]), grayscale=False))
        assert not list(store.folder.glob("*" + index_store.SUFFIX)) and reader.stats.frames_decoded == 0
        opener.write_records()
        key = store.key(reader.signature, 0)
        assert key is not None
        stored = store.load(key)
        assert stored is not None and stored.index == reader.index and stored.grayscale is None
        assert reader.detected_grayscale  # grayscale=None asked for: found out now, written when told
        assert store.load(key).grayscale is None
        opener.write_records()
        assert store.load(key).grayscale is True
        other = opener.open(Video(str(paths[1])))
        assert not other.detected_grayscale
    finally:
        opener.close()  # the readers go: what they learnt is written
    with VideoReader(str(paths[1])) as again:
        assert again.index_source == "stored" and again.detected_grayscale is False
        assert again.stats.opens == 0 and again.stats.frames_decoded == 0
