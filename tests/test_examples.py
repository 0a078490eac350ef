"""The examples run as a user runs them (a fresh interpreter, a real video), and say what they did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_stream_asyncio_streams_every_frame(make_clip):
    out = run("stream_asyncio.py", str(make_clip("h264_gops.mp4")))
    assert "150 frames" in out and "streamed 150 frames" in out and "longest gap" in out


def test_train_loader_runs_epochs_through_workers(make_clip):
    pytest.importorskip("torch", reason="the torch extra")
    out = run("train_loader.py", str(make_clip("h264.mkv")), "--workers", "2", "--epochs", "2", "--batch-size", "16")
    assert out.count("80 frames in") == 2 and ", 3, 96, 128)" in out  # CHW batches
