"""The project's own machinery, run as CI and a new contributor run it: .ci/run and docker/smoke.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FAIL_ON_SKIP

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="runs bash scripts")


def fresh_copy(dest: Path) -> Path:
    """The project as a fresh clone has it: no virtualenv, no build products."""
    shutil.copytree(
        REPO,
        dest,
        ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", ".build", "wheels", ".pytest_cache"),
    )
    return dest


@pytest.fixture
def no_docker(tmp_path) -> tuple[dict, Path]:
    """An environment whose docker, dockerd, apt-get, sudo and debootstrap only note that they were called, and fail."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("docker", "dockerd", "apt-get", "sudo", "debootstrap"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env, calls


def called(calls: Path) -> str:
    return calls.read_text() if calls.exists() else ""


@pytest.mark.slow
def test_smoke_sh_sets_up_the_readme_venv_before_it_touches_docker(tmp_path, no_docker):
    """Issue 8, item 14: on a fresh clone it used to install Docker, then fail on a missing .venv/bin/python."""
    env, calls = no_docker
    repo = fresh_copy(tmp_path / "repo")
    result = subprocess.run(["bash", repo / "docker" / "smoke.sh", "--preflight"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "preflight passed" in result.stdout
    assert called(calls) == "", "nothing about Docker happens before the host side is ready"
    check = subprocess.run([repo / ".venv" / "bin" / "python", "-I", "-c", "import asyncframes; print(asyncframes.__file__)"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert str(repo) in check.stdout, "the project itself is installed (editable), as the README does"


def test_smoke_sh_says_what_it_needs_before_it_touches_docker(tmp_path, no_docker):
    env, calls = no_docker
    repo = fresh_copy(tmp_path / "repo")
    missing = tmp_path / "no" / "python"
    result = subprocess.run(["bash", repo / "docker" / "smoke.sh"], env={**env, "PYTHON": str(missing)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"smoke: cannot run: PYTHON={missing} is not an executable" in result.stderr
    assert called(calls) == ""


SKIPPING_TESTS = """
import pytest

def test_runs():
    pass

def test_needs_a_video():
    pytest.skip("no video here")

@pytest.mark.xfail(reason="known")
def test_known_bug():
    assert False
"""


def run_pytest_with_our_conftest(folder: Path, **env: str) -> subprocess.CompletedProcess:
    (folder / "test_demo.py").write_text(SKIPPING_TESTS)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", "--rootdir", str(folder), str(folder)],
        cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if k != FAIL_ON_SKIP}, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_skipped_test_fails_the_run_when_ci_says_so(tmp_path):
    result = run_pytest_with_our_conftest(tmp_path, **{FAIL_ON_SKIP: "1"})
    assert result.returncode == 1, result.stdout
    assert f"{FAIL_ON_SKIP} is set: a skipped test fails the run" in result.stdout
    assert "SKIPPED test_demo.py::test_needs_a_video: no video here" in result.stdout
    assert "test_known_bug" not in result.stdout.split("short test summary")[0], "an expected failure is not a skip"


def test_a_skipped_test_is_only_reported_otherwise(tmp_path):
    result = run_pytest_with_our_conftest(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout


def test_ci_runs_the_readme_test_command_with_skips_failing():
    script = (REPO / ".ci" / "run").read_text()
    assert f"export {FAIL_ON_SKIP}=1" in script
    export_at, run_at = script.index(f"export {FAIL_ON_SKIP}=1"), script.index('bash -euo pipefail -c "$TEST_COMMAND"')
    assert export_at < run_at, "the variable is set before the tests run"
