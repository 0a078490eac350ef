"""The asyncframes command, run the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import attrs
import pytest


def run(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "asyncframes", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache, so the built-in sample clip is generated as on a new machine."""
    return {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


def test_stream_without_arguments_runs_the_main_job_on_the_built_in_sample(cache):
    result = run("stream", env=cache)
    assert result.returncode == 0, result.stderr
    assert "300 frames in 5 chunks" in result.stdout
    assert "frames/s" in result.stdout
    assert os.path.exists(os.path.join(cache["XDG_CACHE_HOME"], "asyncframes", "sample-v1.mp4"))


def test_stream_a_range_in_small_chunks_verbosely(cache):
    result = run("demo", "--frames", "10:40:3", "--frames-per-chunk", "4", "-v", env=cache)
    assert result.returncode == 0, result.stderr
    assert "10 frames in 3 chunks" in result.stdout
    assert "frames 10..19" in result.stdout


def test_info_prints_metadata_as_json(cache):
    result = run("info", "--json", env=cache)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["frame_count"], info["height"], info["width"], info["channels"]) == (300, 240, 320, 3)


def test_info_on_a_missing_file_fails_with_a_clear_message(tmp_path):
    result = run("info", tmp_path / "nope.mp4")
    assert result.returncode == 1
    assert "VideoNotFoundError: video not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_info_on_a_shared_video(centered_pair):
    result = run("info", centered_pair)
    assert result.returncode == 0, result.stderr
    assert "frame_count  1100" in result.stdout


# -- bad arguments: one line naming the value and what is allowed, exit 2, never a traceback --

BAD_ARGUMENTS = [
    # (argv, what the one line must name)
    (["stream", "--frames", "abc"], ["--frames", "'abc'", "START:STOP[:STEP]"]),
    (["stream", "--frames", "::0"], ["--frames", "'::0'", "STEP 0"]),
    (["stream", "--frames", "1:2:3:4"], ["--frames", "'1:2:3:4'", "START:STOP[:STEP]"]),
    (["stream", "--frames=-5:"], ["--frames", "'-5:'", "negative"]),
    (["stream", "--frames-per-chunk", "0"], ["--frames-per-chunk", "0", "1 or more"]),
    (["stream", "--frames-per-chunk", "many"], ["--frames-per-chunk", "'many'", "1 or more"]),
    (["stream", "--timeout", "nan"], ["--timeout", "'nan'", "greater than 0"]),
    (["info", "--timeout", "-1"], ["--timeout", "'-1'", "greater than 0"]),
    (["info", "--endpoint", "localhost:9010", "x.mp4"], ["--endpoint", "'localhost:9010'", "tcp://HOST:PORT"]),
    (["info", "--endpoint", "tcp://127.0.0.1:0"], ["--endpoint", "'tcp://127.0.0.1:0'", "1-65535"]),
    (["info", "--endpoint", "tcp://127.0.0.1:9010"], ["VIDEO", "--endpoint"]),
    (["ping", "foo"], ["endpoint", "'foo'", "tcp://HOST:PORT"]),
    (["ping", "tcp://127.0.0.1:9010", "--timeout", "0"], ["--timeout", "'0'", "greater than 0"]),
    (["keygen", "keys", "--name", "../escape"], ["--name", "'../escape'", "without '/'"]),
    (["serve", "--bind", "foo"], ["--bind", "'foo'", "tcp://HOST:PORT"]),
    (["serve", "--bind", "tcp://127.0.0.1:99999"], ["--bind", "99999", "1-65535"]),
    (["serve", "--log-level", "LOUD"], ["--log-level", "'LOUD'", "DEBUG, INFO, WARNING"]),
    (["serve", "--workers", "-1"], ["--workers", "-1", "0 or more"]),
    (["serve", "--max-open-files", "0"], ["--max-open-files", "0", "1 or more"]),
    (["serve", "--max-requests-per-client", "x"], ["--max-requests-per-client", "'x'", "1 or more"]),
    (["serve", "--cache-mb", "-2"], ["--cache-mb", "'-2'", "0 or more"]),
    (["serve", "--max-chunk-mb", "inf"], ["--max-chunk-mb", "'inf'", "greater than 0"]),
    (["serve", "--root", "/nonexistent/videos"], ["--root", "/nonexistent/videos", "existing folder"]),
    (["serve", "--curve-secret", "s.key_secret"], ["--curve-secret", "--allow-client-keys"]),
    (["serve", "--curve-secret", "s.key_secret", "--allow-client-keys", "/nonexistent/keys"], ["--allow-client-keys", "/nonexistent/keys", "folder"]),
    (["serve", "--private-dir", "/"], ["--private-dir", "'/'", "asyncframes-*"]),
    (["bench", "/nonexistent/video.mp4"], ["VIDEO", "/nonexistent/video.mp4", "existing video files"]),
    (["bench", "--rounds", "0"], ["--rounds", "0", "1 or more"]),
    (["bench", "--json", "/nonexistent/out.json"], ["--json", "/nonexistent/out.json", "writable folder"]),
]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Commands that get past their arguments fail the test at once instead of serving, streaming or measuring."""
    import asyncframes._bench
    import asyncframes._server
    import asyncframes._transport
    from asyncframes import _cli as cli

    def reached(*_args, **_kwargs):
        raise AssertionError("the command ran with a bad argument")

    monkeypatch.setattr(cli, "_client", reached)
    monkeypatch.setattr(asyncframes._server, "FrameServer", reached)
    monkeypatch.setattr(asyncframes._bench, "run", reached)
    monkeypatch.setattr(asyncframes._transport, "create_keys", reached)


@pytest.mark.parametrize("argv, names", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_naming_it_and_exit_2(argv, names, capsys, nothing_runs):
    from asyncframes._cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"asyncframes {argv[0]}: error: "), err
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert "Traceback" not in err


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path):
    import zmq

    taken = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        result = run("serve", "--bind", f"tcp://127.0.0.1:{port}", "--root", tmp_path, timeout=60)
    finally:
        taken.close(linger=0)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "error" in x]
    assert f"--bind: cannot listen on tcp://127.0.0.1:{port}: Address already in use" in line


def test_keygen_into_an_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("keygen", blocker / "keys")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot write keys into {blocker / 'keys'}" in result.stderr.strip().splitlines()[-1]


def test_bench_on_a_file_that_is_not_a_video_is_one_line(tmp_path):
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("not a video")
    result = run("bench", bogus, "--rounds", "1", "--memory-frames", "0", "--workers")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"asyncframes: error: cannot decode {bogus}" in result.stderr


def test_stream_frames_without_stop_run_to_the_end(cache):
    result = run("stream", "--frames", "290:", "--frames-per-chunk", "4", env=cache)
    assert result.returncode == 0, result.stderr
    assert "10 frames in 3 chunks" in result.stdout


def test_frames_spec_is_a_slice_of_the_video():
    from asyncframes._cli import frames_range, frames_spec

    assert frames_range(frames_spec("7"), 300) == range(7, 8)
    assert frames_range(frames_spec("10:40:3"), 300) == range(10, 40, 3)
    assert frames_range(frames_spec(":5"), 300) == range(0, 5)
    assert frames_range(frames_spec("::100"), 300) == range(0, 300, 100)
    assert frames_range(frames_spec("250:400"), 300) == range(250, 400)  # the server names index 300
    assert frames_range(None, 300) is None


@pytest.mark.parametrize("command", [["info", "x.mp4"], ["ping"]])
def test_an_unreadable_key_file_is_one_line_naming_it(tmp_path, command):
    garbage = tmp_path / "me.key_secret"
    garbage.write_text("not a key\n")
    endpoint = ["--endpoint", "tcp://127.0.0.1:9"] if command[0] == "info" else ["tcp://127.0.0.1:9"]
    result = run(*command, *endpoint, "--curve-secret", garbage, "--curve-server-key", tmp_path / "missing.key", "--timeout", "2")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("asyncframes: error: AuthenticationError: cannot read") and str(tmp_path) in line


def test_serve_defaults_are_the_server_configs_own():
    """Each limit's default is written once (config.ServerConfig): the command line takes it from there."""
    from asyncframes._cli import build_parser
    from asyncframes._config import OPTIONS, ServerConfig, config_from

    args = build_parser().parse_args(["serve"])
    assert config_from(args) == ServerConfig()
    assert {option.field for option in OPTIONS} <= set(attrs.fields_dict(ServerConfig))
    changed = config_from(build_parser().parse_args(["serve", "--max-chunk-mb", "3", "--workers", "2"]))
    assert (changed.max_chunk_bytes, changed.workers) == (3 * 2**20, 2)
