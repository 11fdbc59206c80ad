"""Start-up cost in inetd mode, kept structurally (issue 5: <= 25 ms a request).

Every burst of requests to an inetd service pays a Python start, and most of
what tftpd adds to the interpreter's own start is imports.  These tests run the
inetd front door for real -- ``python -I -S .../tftpd/__main__.py`` with a bound
UDP socket as standard input and an RRQ waiting on it, as inetd starts it -- and
check which modules the process had imported by the time it exited.  A module
that reappears (a ``@dataclass``, a run-time ``typing`` alias, ``logging``, a
preload) fails here, with no timing involved.  bench/inetd_startup.py measures
the time itself.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Set

import pytest

from conftest import ROOT

# What the inetd path used to import and must not any more, with what each
# cost (or pulled in): see the commits that took them out.
ABSENT = {
    "dataclasses": "inspect, ast, dis, tokenize: ~8 ms",
    "inspect": "dataclasses",
    "ast": "inspect",
    "dis": "inspect",
    "tokenize": "inspect, linecache",
    "typing": "~4 ms; annotations and aliases belong under TYPE_CHECKING",
    "logging": "~6 ms with re, traceback, string, weakref: tftpd.log is the logger",
    "traceback": "logging",
    "linecache": "traceback",
    "string": "logging",
    "re": "logging, getopt, typing",
    "getopt": "gettext and re: cli.getopt is the parser",
    "gettext": "getopt",
    "locale": "gettext",
    "warnings": "re, typing",
    "weakref": "logging",
    "tempfile": "~5 ms with random, shutil, re, bz2, lzma: files._create_temporary",
    "random": "tempfile",
    "hashlib": "random",
    "shutil": "tempfile",
    "encodings.idna": "was preloaded for nothing",
    "stringprep": "encodings.idna",
    "unicodedata": "encodings.idna",
    "pkgutil": "was privileges.preload's walk over the package",
    "importlib": "pkgutil",
    "ipaddress": "only with --address",
    "daemon": "only with --daemon",
    "lockfile": "only with --daemon",
    "tftpd.check": "only with --check",
    "tftpd.daemonize": "only with --daemon",
    "socket": "its enums (with enum and selectors ~4 ms with signal): tftpd uses _socket",
    "signal": "its enums: tftpd uses _signal",
    "enum": "~1.3 ms: packets.Opcode, ErrorCode and transfer.Outcome are plain constants",
    "selectors": "socket",
}

# Standard-library modules a run may import beyond the interpreter's own start:
# a new one must be worth its milliseconds (add it here with the reason).
ALLOWED_STDLIB = {
    "__future__",                                   # (annotations; 0.1 ms)
    "types", "operator", "functools", "collections", "keyword", "reprlib", "itertools",
    "_collections", "_functools", "_operator",       # via threading
    "_socket", "select", "math", "errno",
    "collections.abc",
    "threading", "_weakrefset",                      # the worker pool
    "struct", "_struct", "stat", "_stat", "pwd", "time",
    "os", "os.path", "posixpath", "genericpath", "_collections_abc",
    "mmap",     # only before a privilege drop (see the test below), for big blocks
    "heapq", "_heapq", "_bootlocale", "_locale",    # Python 3.9: collections, open()
}


@pytest.fixture
def served_dir() -> Iterator[Path]:
    """A directory any user can read (the server may drop to nobody)."""
    d = Path(tempfile.mkdtemp(prefix="tftpd-startup-"))
    try:
        d.chmod(0o755)
        (d / "one.bin").write_bytes(b"x" * 100)
        (d / "one.bin").chmod(0o644)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def inetd_run(root: Path, *args: str) -> Set[str]:
    """Serve one RRQ as inetd would start tftpd; the modules it had at exit."""
    # __main__.py run as python runs a script (no runpy: it would count), then
    # the names in sys.modules written to a pipe
    probe = (
        "import sys\n"
        "sys.argv = sys.argv[1:]\n"
        "path = sys.argv[0]\n"
        "with open(path) as f:\n"
        "    code = compile(f.read(), path, 'exec')\n"
        "try:\n"
        "    exec(code, {'__name__': '__main__', '__file__': path, '__package__': None})\n"
        "finally:\n"
        "    import os\n"
        "    os.write(int(os.environ['MODULES_FD']), ' '.join(sorted(sys.modules)).encode())\n"
    )
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(10)
    r, w = os.pipe()
    try:
        client.sendto(b"\0\1one.bin\0octet\0", listen.getsockname())
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", probe, str(ROOT / "tftpd" / "__main__.py"),
             "--root", str(root), "--access-file", str(root / "none.ctl"),
             "--idle-timeout", "0", *args],
            stdin=listen, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(w,), env={"MODULES_FD": str(w)}, cwd="/")
        os.close(w)
        w = -1
        listen.close()
        data, peer = client.recvfrom(1024)
        assert data[:4] == b"\0\3\0\1", data
        client.sendto(b"\0\4\0\1", peer)
        assert proc.wait(20) == 0
        out = b""
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        listen.close()
        client.close()
    return set(out.decode().split())


def baseline() -> Set[str]:
    """Modules of the interpreter's own start."""
    out = subprocess.run([sys.executable, "-I", "-S", "-c",
                          "import sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd="/").stdout
    return set(out.split())


def floor() -> Set[str]:
    """Modules of the interpreter's start plus what the allowed standard
    modules import themselves on this Python (3.13's threading brings
    warnings, its start linecache): tftpd cannot avoid those."""
    code = ("import sys\n"
            f"for name in {['os'] + sorted(ALLOWED_STDLIB)!r}:\n"   # (os first: genericpath needs it)
            "    try:\n"
            "        __import__(name)\n"
            "    except ImportError:\n"
            "        pass\n"
            "print(' '.join(sys.modules))\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code],
                         capture_output=True, text=True, check=True, cwd="/").stdout
    return set(out.split()) | baseline()


@pytest.mark.parametrize("args", [[], ["-v"], ["-s"]], ids=["plain", "-v", "-s"])
def test_inetd_request_imports_little(served_dir: Path, args: List[str]) -> None:
    modules = inetd_run(served_dir, *args)
    assert "tftpd.server" in modules and "tftpd.transfer" in modules   # it did serve
    unavoidable = floor()
    present = sorted(m for m in ABSENT if m in modules and m not in unavoidable)
    assert not present, "back on the inetd path: " + ", ".join(
        f"{m} ({ABSENT[m]})" for m in present)
    extra = sorted(m for m in modules - unavoidable
                   if not m.startswith("tftpd") and m not in ALLOWED_STDLIB)
    assert not extra, f"new imports on the inetd path (worth their cost?): {extra}"


def test_big_blocks_preload_mmap_only_for_a_privilege_drop(served_dir: Path) -> None:
    """A download at blksize >= 32768 maps the file: mmap is imported then,
    or before a privilege drop (the interpreter may be unreadable after it);
    an inetd start as the serving user (the sample lines) never loads it for
    a small request, nor does a drop when -z rules big blocks out."""
    dropped = os.geteuid() == 0
    assert ("mmap" in inetd_run(served_dir)) == dropped
    assert "mmap" not in inetd_run(served_dir, "-z", "32767")
    if dropped:
        assert "mmap" not in inetd_run(served_dir, "--user", "root")


def test_uploads_allowed_import_nothing_more(served_dir: Path) -> None:
    """-n (NIM's line), also with a privilege drop: an upload's temporary
    file needs no tempfile (it used to be imported before the drop)."""
    modules = inetd_run(served_dir, "-n")
    unavoidable = floor()
    present = sorted(m for m in ABSENT if m in modules and m not in unavoidable)
    assert not present, present
