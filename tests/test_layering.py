"""Imports point down: the pure core never reaches sockets, threads, clocks or daemon.

The check walks each module's syntax tree (every ``import``, at any depth,
including ones inside functions) and follows imports inside the package, so a
core module cannot reach ``socket`` through a helper either.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tftpd"
CORE = ["packets", "options", "netascii", "transfer", "files", "paths", "admission", "config"]
FORBIDDEN = {"socket", "threading", "select", "selectors", "time", "daemon",
             # the same things under other names
             "_socket", "_thread", "asyncio"}


def imports_of(source: str, module: str) -> List[Tuple[str, int]]:
    """(absolute module name, line) of every import in ``source``.

    ``module`` is the dotted name of the importing module (``tftpd.files``);
    relative imports are resolved against its package.  ``from . import x``
    yields ``tftpd.x``.  ``__import__``/``importlib.import_module`` with a
    constant name count as imports too.
    """
    package = module.rsplit(".", 1)[0]
    out: List[Tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.append((prefix, node.lineno))
            out += [(f"{prefix}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Call):
            f = node.func
            name = (f.id if isinstance(f, ast.Name) else
                    f.attr if isinstance(f, ast.Attribute) else "")
            if (name in ("__import__", "import_module") and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                out.append((node.args[0].value, node.lineno))
    return out


def module_path(name: str) -> Optional[Path]:
    """The file of ``tftpd.x`` (or None: not a module of the package)."""
    parts = name.split(".")
    if parts[0] != "tftpd" or len(parts) < 2:
        return None
    path = PACKAGE.joinpath(*parts[1:]).with_suffix(".py")
    return path if path.is_file() else None


def violations(start: str, read=lambda p: p.read_text()) -> List[str]:
    """Forbidden imports reachable from ``tftpd.<start>``, with the chain to each."""
    found: List[str] = []
    seen: Set[str] = set()
    todo: List[Tuple[str, List[str]]] = [(f"tftpd.{start}", [])]
    while todo:
        name, chain = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_path(name)
        if path is None:
            continue
        for imported, line in imports_of(read(path), name):
            top = imported.split(".")[0]
            where = " -> ".join(chain + [f"{name}:{line}"])
            if top in FORBIDDEN:
                found.append(f"{where} imports {imported}")
            elif top == "tftpd" and module_path(imported) is not None:
                todo.append((imported, chain + [f"{name}:{line}"]))
    return found


@pytest.mark.parametrize("module", CORE)
def test_core_module_exists(module: str) -> None:
    assert (PACKAGE / f"{module}.py").is_file()


@pytest.mark.parametrize("module", CORE)
def test_core_does_not_import_io_threads_or_clocks(module: str) -> None:
    assert violations(module) == []


# The checker itself must be able to fail.

@pytest.mark.parametrize("source", [
    "import time",
    "import os, socket",
    "from time import monotonic",
    "import select as s",
    "def f():\n    import threading\n",
    "try:\n    import selectors\nexcept ImportError:\n    pass\n",
    "import daemon.pidfile",
    "__import__('socket')",
    "import importlib\nimportlib.import_module('time')",
])
def test_checker_sees_forbidden_imports(source: str) -> None:
    names = {n.split(".")[0] for n, _ in imports_of(source, "tftpd.fake")}
    assert names & FORBIDDEN


def test_checker_follows_imports_inside_the_package() -> None:
    fake: Dict[str, str] = {
        "packets": "from .worker import drive\n",
        "worker": "import socket\n",
    }

    def read(path: Path) -> str:
        return fake.get(path.stem, "")
    found = violations("packets", read)
    assert found and "tftpd.worker" in found[0] and "socket" in found[0]
    fake["packets"] = "from . import server\n"
    fake["server"] = "import threading\n"
    assert any("threading" in v for v in violations("packets", read))
    fake["packets"] = "from tftpd import log\n"     # log imports only logging/os
    assert violations("packets", read) == []


def test_relative_imports_resolve() -> None:
    got = imports_of("from . import paths\nfrom .packets import decode\n"
                     "from ..x import y\n", "tftpd.admission")
    names = [n for n, _ in got]
    assert "tftpd.paths" in names and "tftpd.packets" in names and "tftpd.packets.decode" in names
