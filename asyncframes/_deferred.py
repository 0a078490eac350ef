"""Modules imported on first use, and loaded in the background meanwhile.

A client starts its private server before it needs NumPy, ZeroMQ and the protocol
(about 150 ms of imports), so the two overlap: the client's driver names those
modules with :func:`on_first_use` instead of importing them at the top, and loads
them in a background thread (:func:`load_in_background`) from the moment it is
imported. A caller that imports it early (an app at start-up) then finds them loaded
when it makes its first ``AsyncVideo``; one that makes it at once waits only for
what is still loading, while its server starts.

Type checkers and the layers test see the real imports, written under
``if TYPE_CHECKING:`` next to each use of this module.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any, Sequence

#: The longest a fork waits for the background imports to finish (see :func:`load_in_background`).
FORK_WAIT_S = 10.0


class _OnFirstUse:
    """Stands for a module until an attribute of it is first looked up; then the module is
    imported and bound in this placeholder's place, so later lookups cost nothing extra."""

    __slots__ = ("_name", "_namespace", "_alias")

    def __init__(self, name: str, namespace: dict[str, Any], alias: str) -> None:
        self._name = name
        self._namespace = namespace
        self._alias = alias

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)  # thread-safe: the import system locks per module
        self._namespace[self._alias] = module
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def on_first_use(name: str, namespace: dict[str, Any], alias: str) -> Any:
    """A placeholder for module ``name``, bound as ``alias`` in ``namespace`` (a module's
    ``globals()``): it imports the module when an attribute is first looked up, and binds
    the module as ``alias`` in its own place.

    Args:
        name: the module's absolute name (e.g. ``"numpy"``, ``"asyncframes._protocol"``).
        namespace: the globals of the module that uses it.
        alias: the name it has there.

    Returns:
        The placeholder, to be bound as ``alias``.
    """
    return _OnFirstUse(name, namespace, alias)


def load_in_background(names: Sequence[str]) -> threading.Thread:
    """Import the modules ``names`` in a daemon thread, now.

    A thread that needs one of them meanwhile waits for it (the import system locks
    each module while it loads) and sees any error itself; the background thread
    ignores errors. A ``fork`` waits (up to :data:`FORK_WAIT_S`) for it to finish, so no
    child starts with a module half loaded (``subprocess`` starts programs without a
    fork of Python, and does not wait).

    Args:
        names: absolute module names, loaded in this order.

    Returns:
        The thread (started).
    """

    def load() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except BaseException:  # noqa: B036 (whoever imports it next gets the error)
                return

    thread = threading.Thread(target=load, name="asyncframes-imports", daemon=True)
    thread.start()
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=lambda: thread.join(FORK_WAIT_S) if thread is not threading.current_thread() else None)
    return thread
