"""The per-user server (``AsyncVideo(server="user")``): scripts run warm on one server that
outlives them, started once however many start at the same time, gone after its idle time."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from asyncframes import AsyncVideo
from asyncframes._process import listening, user_server_path
from asyncframes.errors import ServerStartError

from .conftest import reference_frames, wait_until

READ_ONE = """
import sys
from asyncframes import AsyncVideo
with AsyncVideo(server="user") as av:
    av.load_by_chunk(sys.argv[1], [int(sys.argv[2])])
    list(av.chunks)
    print(av.endpoint, flush=True)
"""


@pytest.fixture
def runtime(tmp_path_factory, monkeypatch):
    """This test's own per-user folder (short: unix socket paths are), and its server stopped after."""
    folder = tmp_path_factory.mktemp("rt")
    folder.chmod(0o700)
    monkeypatch.setenv("ASYNCFRAMES_RUNTIME_DIR", str(folder))
    yield folder
    AsyncVideo.stop_user_server()


def started(folder) -> int:
    """How many times a per-user server got ready in ``folder`` (each start logs its readiness)."""
    return sum(log.read_text().count("asyncframes server ready on") for log in folder.glob("*.log"))


def run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", READ_ONE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_script_leaves_its_server_running_for_the_next_one(runtime, make_clip):
    path = make_clip("h264_gops.mp4")
    first = run(str(path), "3")
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    endpoint = out.strip()
    assert listening(endpoint[len("ipc://"):])  # it outlived the script
    with AsyncVideo(server="user") as av:  # the next one connects, and starts nothing
        assert av.endpoint == endpoint and av.server_pid is None
        av.load_by_chunk(path, [140, 3, 77])
        got = [(i, f) for idxs, frames in av.chunks for i, f in zip(idxs, frames)]
    assert [i for i, _ in got] == [140, 3, 77]
    assert all(np.array_equal(f, reference_frames(path)[i]) for i, f in got)
    assert started(runtime) == 1


def test_scripts_starting_at_once_share_one_server(runtime, make_clip):
    path = str(make_clip("gray.mp4"))
    procs = [run(path, str(k)) for k in range(3)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outs.append(out.strip())
    assert len(set(outs)) == 1
    assert started(runtime) == 1


def test_the_server_exits_once_it_has_had_no_client_for_its_idle_time(runtime, make_clip, monkeypatch):
    monkeypatch.setenv("ASYNCFRAMES_USER_SERVER_IDLE", "1")
    with AsyncVideo.from_video(make_clip("gray.mp4"), [0], server="user") as av:
        list(av.chunks)
        path = av.endpoint[len("ipc://"):]
    # Its next ping finds the client gone (every 2 s); then 1 s alone.
    wait_until(lambda: not listening(path), 15, "the idle per-user server to exit")
    assert AsyncVideo.stop_user_server() is False  # nothing left to stop


def test_a_folder_other_users_can_enter_is_refused(runtime):
    runtime.chmod(0o755)
    try:
        with pytest.raises(ServerStartError, match="only this user can enter"):
            AsyncVideo(server="user")
    finally:
        runtime.chmod(0o700)


def test_each_version_and_option_set_has_its_own_server(runtime, monkeypatch):
    import asyncframes._process as process

    base = user_server_path("WARNING", [])
    assert user_server_path("WARNING", ["--workers", "2"]) != base
    monkeypatch.setattr(process, "__version__", "99.0")
    assert user_server_path("WARNING", []) != base and os.path.dirname(user_server_path("WARNING", [])) == str(runtime)


def test_an_unknown_server_kind_is_refused_naming_the_kinds():
    with pytest.raises(ValueError, match="'process', 'own', 'user'"):
        AsyncVideo(server="cluster")
