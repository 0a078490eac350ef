"""The layers of the package, checked from its source: what each module may import.

This is the picture in the README's "How it is built", as a test. Data flows one way:
a module imports only modules listed before it in :data:`ORDER`; the two cores (and the
pure modules under them) import no I/O at all; the server side never loads the client
side; the client's driver leaves ZeroMQ to the transport.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

PACKAGE = Path(__file__).resolve().parents[1] / "asyncframes"

#: Every module of the package, lowest layer first: each may import only modules before it.
ORDER = [
    # pure: what the two sides say and decide
    "errors", "_version", "_deferred", "_video", "_config", "_index", "_disposable", "_times", "_protocol",
    "_server_actions", "_server_state", "_deal", "_client_state", "_split", "_shard",
    # decoding (PyAV, and its swscale through ctypes) and opening files; shared memory, which decoder worker processes write into
    "_sws", "_convert", "_arena", "_files", "_index_store", "_reader", "_images", "_opener", "_shm", "_procwire", "_procworker", "_procpool", "_pool",
    # between processes: ZeroMQ
    "_transport",
    # the drivers
    "_server", "_process", "_client",
    # the reader facade and its clip samplers (on the client)
    "_frame_reader", "samplers",
    # tools and the front door
    "_sample", "_bench", "_cli", "__init__", "__main__",
    # integrations (each imports its framework; nothing imports them)
    "asyncio", "qt", "ray", "torch",
]
#: Modules with no I/O at all: no sockets, files, processes, decoders, threads or clock.
PURE = ["errors", "_version", "_video", "_config", "_index", "_disposable", "_times", "_protocol", "_server_actions", "_server_state", "_deal", "_client_state", "_split", "_shard"]
IO_MODULES = {"zmq", "av", "os", "time", "threading", "socket", "subprocess", "select", "mmap", "signal", "ctypes", "shutil", "tempfile", "io", "pathlib"}
#: What a pure module may use of an I/O module: spelling paths (``Video("clip.mp4")`` takes a
#: PathLike), naming signals (how a process ended, in words).
HARMLESS_USES = {"os": {"fspath", "PathLike"}, "signal": {"Signals"}}
#: What a server process loads must not include the client side.
SERVER_SIDE = "_server"
CLIENT_SIDE = {"_client", "_client_state", "_process"}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(package modules, outside top-level modules) that ``module`` imports, at any depth of its code."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    ours, theirs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                ours.add(node.module.split(".")[0])
            else:
                ours.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top == "asyncframes":
                rest = node.module.split(".")[1:]
                ours.update(rest[:1] or [alias.name for alias in node.names])
            else:
                theirs.add(top)
        elif isinstance(node, ast.Import):
            theirs.update(alias.name.split(".")[0] for alias in node.names)
    # "from . import X" may name a function of __init__ rather than a module
    ours = {m if m in ORDER else "__init__" for m in ours}
    return ours, theirs


def test_every_module_has_a_place() -> None:
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_imports_point_down(module: str) -> None:
    ours, _theirs = _imports(module)
    lower = set(ORDER[: ORDER.index(module)])
    assert ours <= lower, f"{module} imports {sorted(ours - lower)}, which are not below it"


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module: str) -> None:
    ours, theirs = _imports(module)
    io = {m for m in theirs & IO_MODULES if not (m in HARMLESS_USES and _uses(module, m) <= HARMLESS_USES[m])}
    assert not io, f"{module} imports {sorted(io)}"
    assert ours <= set(PURE), f"{module} imports {sorted(ours - set(PURE))}, which are not pure"


def _uses(module: str, name: str) -> set[str]:
    """The attributes of ``name`` (an imported module) that ``module`` uses."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == name
    }


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_imports(m)[0])
    return seen


def test_the_server_never_loads_the_client() -> None:
    loaded = _closure(SERVER_SIDE)
    assert not loaded & CLIENT_SIDE, f"the server loads {sorted(loaded & CLIENT_SIDE)}"
    assert "__init__" not in loaded, "the server imports the package __init__ (and so the client's names)"


def test_the_client_driver_leaves_zeromq_to_the_transport() -> None:
    assert "zmq" not in _imports("_client")[1]
