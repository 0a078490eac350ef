"""A fresh process's first ``AsyncVideo`` starts its server before it needs NumPy, ZeroMQ
or the protocol, so the server's start and the client's imports overlap.

Each probe runs in a fresh interpreter whose import system holds back the modules under
test (an import hook that waits on an event) until a server process has been started.
Were any of them needed first, the probe would wait forever: it reports that instead,
after a bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from asyncframes import _deferred

#: Installs a finder that holds back running the named modules until ``subprocess.Popen`` is
#: called (the private server's start), and records which of them were not loaded by then.
#: It holds back their execution, not their finding: a finder runs under the import
#: system's global lock, a module's execution under that module's lock only.
HOLD_BACK = """
import importlib.abc, importlib.machinery, json, subprocess, sys, threading
HELD = {"numpy", "zmq", "attrs", "cattrs", "msgpack", "asyncframes._protocol", "asyncframes._client_state"}
started = threading.Event()
report = {"held_back_at_start": None, "waited_out": []}

class Held(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real
    def __getattr__(self, name):
        return getattr(self.real, name)
    def create_module(self, spec):
        return self.real.create_module(spec)
    def exec_module(self, module):
        if not started.wait(5.0):
            report["waited_out"].append(module.__name__)  # needed before the server's start: the bug
        self.real.exec_module(module)

class HoldBack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in HELD or started.is_set():
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = Held(spec.loader)
        return spec

sys.meta_path.insert(0, HoldBack())
real_popen = subprocess.Popen

class Popen(real_popen):
    def __init__(self, *args, **kwargs):
        if report["held_back_at_start"] is None:
            report["held_back_at_start"] = sorted(m for m in HELD if m not in sys.modules)
        started.set()
        super().__init__(*args, **kwargs)

subprocess.Popen = Popen
"""


def _probe(body: str, *args: str) -> dict:
    script = HOLD_BACK + textwrap.dedent(body) + "\nprint(json.dumps(report))\n"
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_asyncframes_and_asyncvideo_needs_none_of_them() -> None:
    report = _probe("""
        import asyncframes
        from asyncframes import AsyncVideo
        subprocess.Popen([sys.executable, "-c", "pass"]).wait()  # lets the held modules through
    """)
    assert report["waited_out"] == [], f"importing asyncframes waited for {report['waited_out']}"


def test_the_first_asyncvideo_starts_its_server_before_loading_them(centered_pair: Path) -> None:
    report = _probe(
        """
        from asyncframes import AsyncVideo
        with AsyncVideo.from_video(sys.argv[1], [0, 1], 2) as client:
            idxs, frames = client.next_chunk()
            assert list(idxs) == [0, 1] and frames.shape[0] == 2
        """,
        str(centered_pair),
    )
    assert report["waited_out"] == [], f"the client needed {report['waited_out']} before starting its server"
    assert report["held_back_at_start"], "nothing was held back: the probe tested nothing"


@pytest.mark.pure
def test_a_module_named_on_first_use_is_imported_then_bound_in_its_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "af_first_use_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "af_first_use_probe", raising=False)
    namespace: dict = {}
    namespace["probe"] = _deferred.on_first_use("af_first_use_probe", namespace, "probe")
    assert "af_first_use_probe" not in sys.modules
    assert namespace["probe"].VALUE == 42
    assert namespace["probe"] is sys.modules["af_first_use_probe"]


def test_a_fork_waits_for_the_background_imports(tmp_path: Path) -> None:
    """A child forked while a module loads in the background gets it whole, never half loaded.

    The module waits, half loaded, until the fork has begun: a hook registered after
    ``load_in_background``'s runs before it and lets the module go on. Without the wait,
    the child would find the module's lock held by a thread it does not have (it then
    stops at its alarm)."""
    (tmp_path / "af_fork_gate.py").write_text("import threading\nLOADING = threading.Event()\nRELEASE = threading.Event()\n")
    (tmp_path / "af_slow_module.py").write_text(
        "import af_fork_gate\naf_fork_gate.LOADING.set()\n"
        "if not af_fork_gate.RELEASE.wait(30):\n    raise RuntimeError('the fork never began')\nDONE = True\n"
    )
    script = textwrap.dedent("""
        import os, signal, sys
        sys.path.insert(0, sys.argv[1])
        import af_fork_gate
        from asyncframes._deferred import load_in_background
        load_in_background(["af_slow_module"])
        assert af_fork_gate.LOADING.wait(30), "the module never began to load"
        os.register_at_fork(before=af_fork_gate.RELEASE.set)  # runs first: hooks run last-registered first
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)
            import af_slow_module
            os._exit(0 if getattr(af_slow_module, "DONE", False) else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "0", f"the child saw the module half loaded (exit {out.stdout.strip()}; -14: stuck on its lock)"


def test_dir_lists_the_names_imported_on_first_use_without_importing_them() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import asyncframes, json, sys; print(json.dumps([dir(asyncframes), 'numpy' in sys.modules]))"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    names, numpy_loaded = json.loads(out.stdout)
    assert {"AsyncVideo", "Video", "VideoInfo", "FrameReader", "open"} <= set(names)
    assert not numpy_loaded
