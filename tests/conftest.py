"""Shared fixtures: a real tftpd process on loopback, and the real peers.

``tftpd_server(args...)`` starts ``python -m tftpd -p 0`` with the given extra
arguments, waits for its "listening on" line and returns a handle with the
port; the process is stopped (by PID) at the end of the test.

``need(tool)`` returns the path of a real peer program; a missing peer skips
the test on a developer's machine and fails it in CI (CI=true).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"real peer '{tool}' is not installed (tools/setup-tests installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    host: str
    root: Path
    lines: List[str] = field(default_factory=list)

    @property
    def addr(self) -> tuple:
        return (self.host, self.port)

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                if rx.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}; log:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def launch(args: List[str], root: Path = Path("."), host: str = "127.0.0.1",
           timeout: float = 15.0) -> ServerProcess:
    """Start ``python -m tftpd ARGS`` and wait for its "listening on" line."""
    proc = subprocess.Popen([sys.executable, "-m", "tftpd", *args], cwd=str(ROOT),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: List[str] = []
    ready = threading.Event()
    port_box: List[int] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = re.search(r"listening on \[?[^\]\s]*\]?:(\d+)", line)
            if m and not port_box:
                port_box.append(int(m.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    if not ready.wait(timeout) or not port_box:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        raise AssertionError(f"tftpd {' '.join(args)} did not start:\n" + "\n".join(lines))
    return ServerProcess(proc, port_box[0], host, root, lines)


def start_server(args: List[str], root: Path, host: str = "127.0.0.1",
                 timeout: float = 15.0) -> ServerProcess:
    return launch(["-p", "0", "--address", host, "--root", str(root)] + list(args),
                  root, host, timeout)


@pytest.fixture
def tftpd_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``tftpd_server("-n", "-v", root=path, host="::1")``."""
    started: List[ServerProcess] = []

    def factory(*args: str, root: Optional[Path] = None, host: str = "127.0.0.1") -> ServerProcess:
        if root is None:
            root = tmp_path / "root"
            root.mkdir(exist_ok=True)
        extra = list(args)
        # Hermetic defaults: no host /etc/tftpaccess.ctl, and stay root when run as
        # root (tmp_path is 0700, so 'nobody' could read nothing in it).
        if not any(a.startswith("--access-file") for a in extra):
            extra += ["--access-file", str(tmp_path / "no-tftpaccess.ctl")]
        if not any(a.startswith("--user") for a in extra):
            extra += ["--user", "root"]
        server = start_server(extra, root, host)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
