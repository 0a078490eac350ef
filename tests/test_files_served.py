"""User stories of which file a real server reads: confinement of image sequences and URLs,
files that change while (or between) requests, and a server out of file descriptors."""

from __future__ import annotations

import os
import resource
import shutil
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from asyncframes import AsyncVideo, ServerError, VideoAccessError, VideoError, VideoOpenError
from asyncframes._reader import VideoReader

from .conftest import shared_video
from .test_standalone_server import Server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX links, rlimits and loopback tcp")

W, H = 64, 48


def y4m_bytes(n: int, seed: int, size: tuple[int, int] = (W, H)) -> bytes:
    """An uncompressed Y4M clip: same ``n`` and ``size`` give the same byte count, ``seed`` the content."""
    w, h = size
    header = f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode()
    ramp = np.add.outer(np.arange(h), np.arange(w)).astype(np.int64)
    frames = []
    for i in range(n):
        y = ((ramp + 7 * i + 91 * seed) % 200 + 16).astype(np.uint8)
        chroma = np.full((h // 2) * (w // 2), (64 + 40 * seed) % 256, np.uint8)
        frames.append(b"FRAME\n" + y.tobytes() + chroma.tobytes() + chroma.tobytes())
    return header + b"".join(frames)


def decode_all(path: Path) -> list[np.ndarray]:
    """Ground truth, read afresh (the shared reference cache is keyed by path, and these files change)."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def rewrite_in_place(path: Path, data: bytes) -> None:
    """New content at the same inode, same size, and the old mtime put back."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


def replace(path: Path, data: bytes) -> None:
    """Another file renamed over it (a different video size, too)."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (outside / "dir").mkdir(parents=True)
    frames = shared_video("robot_frames")
    for n in range(3):
        shutil.copy(frames / f"robot{n}.jpg", root / f"robot{n}.jpg")
    shutil.copy(frames / "robot1.jpg", outside / "secret.jpg")
    shutil.copy(frames / "robot2.jpg", outside / "dir" / "img0.jpg")
    (root / "leak0.jpg").symlink_to(outside / "secret.jpg")
    (root / "dlink0").symlink_to(outside / "dir", target_is_directory=True)
    (root / "v.y4m").write_bytes(y4m_bytes(60, seed=1))
    return root


@pytest.fixture
def server(tmp_path, root):
    srv = Server(tmp_path, "--root", str(root))
    yield srv
    srv.stop()


def frames_of(av_client: AsyncVideo, name: str, idxs, fpc: int = 64) -> np.ndarray:
    av_client.load_by_chunk(name, idxs, frames_per_chunk=fpc)
    return np.concatenate([np.array(frames) for _, frames in av_client.chunks])


# -- confinement ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["leak%d.jpg", "dlink%d/img0.jpg"])
def test_an_image_sequence_cannot_reach_outside_the_root(server, name):
    with AsyncVideo(server.endpoint) as client:
        with pytest.raises(VideoAccessError, match="outside this server's video folder"):
            client.info(name)
        client.load_by_chunk(name, [0])
        with pytest.raises(VideoAccessError, match="outside this server's video folder"):
            list(client.chunks)
        assert client.info("v.y4m").frame_count == 60  # and the server keeps serving


def test_a_sequence_under_the_root_is_served_exactly(server, root):
    truth = decode_all(shared_video("robot_frames") / "robot%d.jpg")
    assert len(truth) == 3
    with AsyncVideo(server.endpoint) as client:
        info = client.info("robot%d.jpg")
        assert (info.frame_count, info.container) == (3, "image2")
        got = frames_of(client, "robot%d.jpg", [2, 0, 1, 2], fpc=3)
    for frame, i in zip(got, [2, 0, 1, 2]):
        assert np.array_equal(frame, truth[i])


def test_globs_and_lists_under_the_root_are_served_and_none_reaches_out(server, root):
    truth = decode_all(shared_video("robot_frames") / "robot%d.jpg")
    with AsyncVideo(server.endpoint) as client:
        for spec in ("robot*.jpg", ["robot0.jpg", "robot1.jpg", "robot2.jpg"]):
            assert client.info(spec).frame_count == 3
            for frame, i in zip(frames_of(client, spec, [2, 0, 1], fpc=2), [2, 0, 1]):
                assert np.array_equal(frame, truth[i])
        # the root's folder and "*.jpg" hold leak0.jpg, a link out; a list may not name outside files
        for spec in (".", "*.jpg", "../outside/*.jpg", ["robot0.jpg", "../outside/secret.jpg"]):
            with pytest.raises(VideoAccessError, match="outside this server's video folder"):
                client.info(spec)
        assert client.info("v.y4m").frame_count == 60  # and the server keeps serving


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/a.mp4", "rtsp://cam/live", "file:v.y4m", "concat:v.y4m|v.y4m", "pipe:0"])
def test_a_url_sent_to_a_confined_server_is_refused_by_name(server, url):
    with AsyncVideo(server.endpoint) as client:
        with pytest.raises(VideoAccessError, match="serves only files under its root") as caught:
            client.info(url)
        assert url in str(caught.value)


def test_proc_1_root_is_an_access_error(server):
    with AsyncVideo(server.endpoint) as client:
        with pytest.raises(VideoAccessError):
            client.info("/proc/1/root/etc/passwd")


def test_errors_name_files_as_the_client_did_never_the_roots_place_on_disk(server, root):
    with AsyncVideo(server.endpoint) as client:
        for name, error in (("missing.mp4", VideoError), ("sub/missing.mp4", VideoError), ("../x.mp4", VideoAccessError)):
            with pytest.raises(error) as caught:
                client.info(name)
            assert str(root.resolve()) not in str(caught.value) and str(root) not in str(caught.value), caught.value


# -- files that change ----------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("change", ["replace", "rewrite_in_place"])
def test_a_file_changed_mid_request_fails_it_and_never_mixes_frames(tmp_path, root, change, workers):
    old = decode_all(root / "v.y4m")
    srv = Server(tmp_path, "--root", str(root), "--workers", workers)
    try:
        with AsyncVideo(srv.endpoint, window=1) as client:
            client.load_by_chunk("v.y4m", range(60), frames_per_chunk=2)
            chunks = client.chunks
            idxs, frames = next(chunks)
            assert np.array_equal(np.array(frames), np.stack([old[i] for i in idxs]))
            if change == "replace":
                replace(root / "v.y4m", y4m_bytes(60, seed=2, size=(W + 16, H + 16)))
            else:
                rewrite_in_place(root / "v.y4m", y4m_bytes(60, seed=2))
            served = 1
            with pytest.raises(VideoError, match="changed while being read"):
                for idxs, frames in chunks:  # chunks decoded before the change are the old file's, whole
                    assert np.array_equal(np.array(frames), np.stack([old[i] for i in idxs])), f"chunk {idxs} is not the old file's"
                    served += 1
            assert served < 30
            new = decode_all(root / "v.y4m")
            got = frames_of(client, "v.y4m", range(60), fpc=8)  # a new request reads the new file
            assert np.array_equal(got, np.stack(new))
    finally:
        srv.stop()


def test_new_requests_after_an_in_place_rewrite_with_the_old_mtime_get_the_new_frames(server, root):
    old = decode_all(root / "v.y4m")
    with AsyncVideo(server.endpoint) as client:
        assert np.array_equal(frames_of(client, "v.y4m", [0, 1, 2]), np.stack(old[:3]))  # kept as recent frames
        assert np.array_equal(frames_of(client, "v.y4m", range(60), fpc=16), np.stack(old))
        rewrite_in_place(root / "v.y4m", y4m_bytes(60, seed=3))
        new = decode_all(root / "v.y4m")
        assert not np.array_equal(new[0], old[0])
        assert np.array_equal(frames_of(client, "v.y4m", [0, 1, 2]), np.stack(new[:3]))
        assert np.array_equal(frames_of(client, "v.y4m", range(60), fpc=16), np.stack(new))


# -- resources ------------------------------------------------------------------------


def test_a_served_request_when_the_server_is_out_of_file_descriptors_is_a_server_error(tmp_path, root):
    for n in range(12):
        os.link(root / "v.y4m", root / f"v{n}.y4m")
    srv = Server(tmp_path, "--root", str(root), "--max-open-files", "64")
    try:
        with AsyncVideo(srv.endpoint) as client:
            assert client.info("v.y4m").frame_count == 60
            used = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
            resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (used + 4, used + 4))
            with pytest.raises(ServerError, match="out of file descriptors.*EMFILE") as caught:
                for n in range(12):  # each open video holds a descriptor
                    client.info(f"v{n}.y4m")
            assert not isinstance(caught.value, VideoOpenError)
            assert client.info("v.y4m").frame_count == 60  # what is open still serves
    finally:
        srv.stop()


def test_a_server_out_of_file_descriptors_says_so_and_does_not_blame_the_file(tmp_path):
    path = tmp_path / "v.y4m"
    path.write_bytes(y4m_bytes(4, seed=1))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 16, hard))
    held: list[int] = []
    try:
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        with pytest.raises(ServerError, match="EMFILE") as caught:
            VideoReader(str(path))
        assert not isinstance(caught.value, VideoOpenError)
        assert "out of file descriptors" in str(caught.value)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with VideoReader(str(path)) as reader:  # the file was fine all along
        assert reader.frame_count == 4
