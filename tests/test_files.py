"""Which file a request names (asyncframes._files): pure rules over paths and stat results."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import pytest

from asyncframes import ServerError, VideoAccessError, VideoNotFoundError
from asyncframes._files import (
    FileIdentity,
    confine,
    container_options,
    files_ffmpeg_may_open,
    frame_filename,
    is_pattern,
    looks_like_url,
    resource_error,
    sequence_files,
    source_identity,
)

from .conftest import shared_video

pytestmark = pytest.mark.pure


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with files, a sequence, and links out; outside/ with what must stay unread."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for name in ("clip.mp4", "sub/clip.mp4", "img0.jpg", "img1.jpg", "img2.jpg", "pad007.jpg", "pad008.jpg", "pct%0.jpg"):
        (root / name).write_bytes(b"x")
    (outside / "secret.jpg").write_bytes(b"secret")
    (outside / "img0.jpg").write_bytes(b"secret")
    (root / "leak0.jpg").symlink_to(outside / "secret.jpg")
    (root / "mixed0.jpg").write_bytes(b"x")
    (root / "mixed1.jpg").symlink_to(outside / "secret.jpg")
    (root / "dlink0").symlink_to(outside, target_is_directory=True)
    return root


# -- confinement ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip.mp4", "sub/clip.mp4", "sub/../clip.mp4", "./clip.mp4", "img%d.jpg", "pad%03d.jpg", "pct%%%d.jpg"])
def test_names_under_the_root_resolve_inside_it(tree, name):
    assert confine(str(tree), name) == os.path.realpath(tree / name)


def test_absolute_names_inside_the_root_and_proc_self_root_are_fine(tree):
    assert confine(str(tree), str(tree / "clip.mp4")) == str(tree / "clip.mp4")
    assert confine(str(tree), f"/proc/self/root{tree}/clip.mp4") == str(tree / "clip.mp4")


@pytest.mark.parametrize("name", ["../outside/secret.jpg", "sub/../../outside/secret.jpg", "leak0.jpg", "dlink0/img0.jpg", "/etc/passwd"])
def test_names_outside_the_root_are_refused(tree, name):
    with pytest.raises(VideoAccessError, match="outside this server's video folder"):
        confine(str(tree), name)


@pytest.mark.parametrize(
    "name, reaches",
    [
        ("leak%d.jpg", "leak0.jpg"),  # the pattern's first file is a link out
        ("mixed%d.jpg", "mixed1.jpg"),  # its second one is
        ("dlink%d/img0.jpg", "dlink0/img0.jpg"),  # a directory link in a pattern component
        ("dlink%01d/img%d.jpg", None),  # two %d: not a pattern, but image2 would fall back to "dlink0"
    ],
)
def test_an_image_sequence_that_reaches_outside_is_refused(tree, name, reaches):
    with pytest.raises(VideoAccessError, match="outside this server's video folder") as caught:
        confine(str(tree), name)
    if reaches is not None:
        assert str(tree / reaches) in str(caught.value)


def test_proc_1_root_is_an_access_error_not_an_internal_one(tree):
    # Unresolvable (permission denied) or resolved outside: either way the caller hears "access".
    with pytest.raises(VideoAccessError):
        confine(str(tree), "/proc/1/root/etc/passwd")


def test_nul_bytes_are_refused(tree):
    with pytest.raises(VideoAccessError, match="NUL"):
        confine(str(tree), "clip.mp4\x00.jpg")


@pytest.mark.parametrize(
    "url",
    ["http://example.com/a.mp4", "rtsp://cam/stream", "file:clip.mp4", "file:///etc/passwd", "concat:a.mp4|b.mp4",
     "pipe:0", "subfile,,0,10,:clip.mp4", "crypto+file:///x", "tcp://127.0.0.1:1"],
)
def test_urls_are_refused_by_name_on_a_confined_server(tree, url):
    assert looks_like_url(url)
    with pytest.raises(VideoAccessError, match="serves only files under its root") as caught:
        confine(str(tree), url)
    assert repr(url) in str(caught.value)


def test_a_file_whose_name_reads_as_a_url_is_served_when_it_exists(tree):
    (tree / "cam1.2024-01-01T10:00.mp4").write_bytes(b"x")
    assert looks_like_url("cam1.2024-01-01T10:00.mp4")
    assert confine(str(tree), "cam1.2024-01-01T10:00.mp4") == str(tree / "cam1.2024-01-01T10:00.mp4")
    assert confine(str(tree), "./cam1.2024-01-01T10:00.mp4") == str(tree / "cam1.2024-01-01T10:00.mp4")


def test_confined_servers_force_sequence_patterns_and_whitelists():
    options = container_options(confined=True)
    assert options is not None
    assert options["pattern_type"] == "sequence"  # never glob
    assert options["protocol_whitelist"] == "file"
    assert "image2" in options["format_whitelist"].split(",")
    for follows_references in ("concat", "hls", "tee", "data", "image2pipe", "mpjpeg", "lavfi"):
        assert follows_references not in options["format_whitelist"].split(",")
    assert container_options(confined=False) is None


# -- patterns -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, number, expected",
    [
        ("img%d.jpg", 7, (True, "img7.jpg")),
        ("img%03d.jpg", 7, (True, "img007.jpg")),
        ("img%%%d.jpg", 7, (True, "img%7.jpg")),
        ("img%5%%d.jpg", 7, (True, "img%7.jpg")),
        ("100%.mp4", 0, (False, "100")),  # what FFmpeg has written when it fails
        ("img%d%d.jpg", 1, (False, "img1")),
        ("img.jpg", 1, (False, "img.jpg")),
        ("%", 1, (False, "")),
    ],
)
def test_frame_filename_follows_ffmpeg(pattern, number, expected):
    assert frame_filename(pattern, number) == expected
    assert is_pattern(pattern) == expected[0]


def test_a_valid_pattern_names_a_different_file_for_each_number():
    for length in range(6):
        for chars in itertools.product("a%d1/", repeat=length):
            pattern = "".join(chars)
            if "%111" in pattern:
                continue  # FFmpeg cuts numbers to 19 characters: with that width every name is alike
            names = {}
            for number in (0, 1, 7, 12, 345):
                ok, name = frame_filename(pattern, number)
                assert ok == is_pattern(pattern)
                names[number] = name
            if is_pattern(pattern):
                assert len(set(names.values())) == len(names), pattern
                assert all(str(n) in name for n, name in names.items())


def test_names_longer_than_ffmpegs_buffer_are_checked_as_ffmpeg_truncates_them():
    path = "/videos/" + "a" * 2000 + ".jpg"
    opened = files_ffmpeg_may_open(path)
    assert opened[0] == path and opened[-1] == path[:1023]


def test_sequence_files_start_within_five_numbers_and_stop_at_the_first_gap(tmp_path):
    for n in (3, 4, 5, 7, 8):
        (tmp_path / f"f{n}.jpg").write_bytes(b"x")
    assert [Path(p).name for p in sequence_files(str(tmp_path / "f%d.jpg"))] == ["f3.jpg", "f4.jpg", "f5.jpg"]
    (tmp_path / "g5.jpg").write_bytes(b"x")
    assert sequence_files(str(tmp_path / "g%d.jpg")) == []  # 5 is past the start range
    assert sequence_files(str(tmp_path / "none%d.jpg")) == []


def test_sequence_files_of_the_shared_robot_frames():
    folder = shared_video("robot_frames")
    assert [Path(p).name for p in sequence_files(str(folder / "robot%d.jpg"))] == ["robot0.jpg", "robot1.jpg", "robot2.jpg"]


# -- identity -------------------------------------------------------------------------


def test_identity_changes_when_a_file_is_rewritten_in_place_with_its_old_mtime(tmp_path):
    path = tmp_path / "v.bin"
    path.write_bytes(b"a" * 100)
    before = source_identity(str(path))
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"b" * 100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = source_identity(str(path))
    assert (after[0].size, after[0].mtime_ns) == (before[0].size, before[0].mtime_ns)
    assert after != before  # ctime tells


def test_identity_changes_when_a_file_is_replaced(tmp_path):
    path, other = tmp_path / "v.bin", tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    other.write_bytes(b"a" * 100)
    before = source_identity(str(path))
    st = os.stat(path)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)
    assert source_identity(str(path)) != before


def test_identity_of_a_sequence_covers_each_file_and_its_length(tmp_path):
    for n in range(3):
        (tmp_path / f"f{n}.jpg").write_bytes(b"x")
    pattern = str(tmp_path / "f%d.jpg")
    before = source_identity(pattern)
    assert len(before) == 3 and all(isinstance(i, FileIdentity) for i in before)
    (tmp_path / "f3.jpg").write_bytes(b"x")
    assert len(source_identity(pattern)) == 4


def test_identity_of_a_missing_file_is_not_found(tmp_path):
    with pytest.raises(VideoNotFoundError):
        source_identity(str(tmp_path / "nope.mp4"))
    assert source_identity("http://example.com/a.mp4") == ()


# -- server faults --------------------------------------------------------------------


@pytest.mark.parametrize("code, name", [(errno.EMFILE, "EMFILE"), (errno.ENFILE, "ENFILE"), (errno.ENOMEM, "ENOMEM")])
def test_running_out_of_resources_is_a_server_error(code, name):
    error = resource_error(OSError(code, os.strerror(code)), "opening a.mp4")
    assert isinstance(error, ServerError) and name in str(error) and "out of" in str(error)
    assert resource_error(OSError(errno.ENOENT, "gone"), "opening a.mp4") is None
    assert resource_error(ValueError("x"), "opening a.mp4") is None


def test_hide_root_takes_the_roots_path_out_of_messages(tmp_path):
    from asyncframes._files import root_spellings
    from asyncframes._server_state import hide_root

    root = tmp_path / "videos"
    root.mkdir()
    link = tmp_path / "link"
    link.symlink_to(root)
    real = os.path.realpath(root)
    spellings = root_spellings(str(link))
    assert set(spellings) == {real, str(link)}
    assert hide_root(f"video not found: {real}/a/b.mp4", spellings) == "video not found: a/b.mp4"
    assert hide_root(f"video not found: {link}/a/b.mp4", spellings) == "video not found: a/b.mp4"
    assert hide_root(f"cannot list {real}", spellings) == "cannot list ."
    assert hide_root(f"outside: /etc/passwd ({real}/x)", spellings) == "outside: /etc/passwd (x)"
    assert hide_root("nothing to hide", root_spellings(None)) == "nothing to hide"
    assert root_spellings("/") == ()


# -- image folders, globs, lists ---------------------------------------------------------


def test_images_are_sorted_naturally():
    from asyncframes._files import natural_key

    assert sorted(["img10.png", "img2.png", "img1.png", "a.png"], key=natural_key) == ["a.png", "img1.png", "img2.png", "img10.png"]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """root/shots: frame_0010..0013.png (numbered from 10), a note; root/empty; outside/secret.png,
    linked from root/links/, which also holds a real image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root / "shots", root / "empty", root / "links", outside):
        folder.mkdir(parents=True)
    for n in range(10, 14):
        (root / "shots" / f"frame_{n:04d}.png").write_bytes(b"x")
    (root / "shots" / "notes.txt").write_bytes(b"x")
    (outside / "secret.png").write_bytes(b"secret")
    (root / "links" / "a1.png").write_bytes(b"x")
    (root / "links" / "a2.png").symlink_to(outside / "secret.png")
    return root


def names(paths):
    return [Path(p).name for p in paths]


def test_a_folder_a_glob_and_a_sequence_numbered_from_10_name_the_same_images(images):
    from asyncframes._files import image_files

    expected = [f"frame_{n:04d}.png" for n in range(10, 14)]
    for spec in ("shots", "shots/*.png", "shots/frame_%04d.png"):
        assert names(image_files(spec, root=str(images))) == expected, spec
        assert names(image_files(str(images / spec))) == expected, spec  # unconfined: as given
    assert image_files("clip.mp4", root=str(images)) is None  # not images: a video file
    assert names(image_files("x", ["shots/frame_0012.png", "shots/frame_0010.png"], root=str(images))) == [
        "frame_0012.png", "frame_0010.png"]  # a list keeps its order


def test_image_specs_naming_nothing_say_so(images):
    from asyncframes._files import image_files

    with pytest.raises(VideoNotFoundError, match="empty: a folder with no images"):
        image_files("empty", root=str(images))
    with pytest.raises(VideoNotFoundError, match=r"shots/\*\.jpg: no file matches"):
        image_files("shots/*.jpg", root=str(images))
    with pytest.raises(VideoNotFoundError, match="no file of this numbered sequence"):
        image_files("shots/take_%03d.png", root=str(images))


@pytest.mark.parametrize("spec, files", [
    ("links", ()),  # a folder holding a link out
    ("links/*.png", ()),  # a glob matching it
    ("../outside/*.png", ()),  # a glob reaching out
    ("x", ("links/a1.png", "../outside/secret.png")),  # a list naming it
])
def test_images_outside_the_root_are_refused_however_they_are_named(images, spec, files):
    from asyncframes._files import image_files

    with pytest.raises(VideoAccessError, match="outside this server's video folder"):
        image_files(spec, files, root=str(images))
