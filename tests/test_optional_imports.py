"""The optional frameworks are extras: ``import asyncframes`` (and the core's use) never imports them.

Run in a fresh interpreter: the test session itself has them loaded by other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: Frameworks only an integration module may import, and only when it is used.
OPTIONAL = ("torch", "qtpy", "PySide6", "PyQt5", "PyQt6", "sleap_io", "ray", "tqdm")

PROBE = """
import json, sys
import asyncframes
from asyncframes import AsyncVideo, Video, errors  # the public core
getattr(asyncframes, "open", None)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in set(sys.argv[1:]))))
"""


def test_importing_asyncframes_imports_no_optional_framework():
    out = subprocess.run([sys.executable, "-c", PROBE, *OPTIONAL], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == [], f"import asyncframes loaded {out.stdout.strip()}"


def test_the_client_side_never_loads_the_swscale_wrapper():
    """``asyncframes._sws`` (ctypes into PyAV's bundled swscale) is loaded by a server's first RGB frame only."""
    probe = PROBE.replace("print(", "import asyncframes._reader\nprint(")
    out = subprocess.run([sys.executable, "-c", probe, "asyncframes"], capture_output=True, text=True, timeout=60, check=True)
    assert "asyncframes._sws" not in json.loads(out.stdout)
