"""The asyncframes command, run the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
