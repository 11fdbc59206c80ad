"""What a running process holds, from /proc: threads, descriptors, memory.

Used by the reliability, flood and fault tests to show that the server frees
what each transfer took and that its memory stays bounded.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Dict, List, Optional


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> List[str]:
    """What each descriptor points at (socket:[inode], a path...), sorted."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status: VmRSS (now), VmHWM (peak RSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    return status_kib(pid, "VmHWM") / 1024


def settle(pid: int, want_threads: int, want_fds: int, timeout: float = 15.0) -> Dict[str, int]:
    """Wait (bounded) until the counts are back to the wanted ones; return them."""
    end = time.monotonic() + timeout
    while True:
        got = {"threads": threads(pid), "fds": fds(pid)}
        if (got["threads"] <= want_threads and got["fds"] <= want_fds) \
                or time.monotonic() > end:
            return got
        time.sleep(0.05)


class RssSampler:
    """Samples a process's RSS in a thread (bounded: every ``step`` s, at most
    ``limit`` samples) and keeps the largest value seen, in MiB."""

    def __init__(self, pid: int, step: float = 0.1, limit: int = 6000) -> None:
        self.pid, self.step, self.limit = pid, step, limit
        self.samples: List[float] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        for _ in range(self.limit):
            try:
                self.samples.append(rss_mib(self.pid))
            except (OSError, KeyError):
                return
            if self._stop.wait(self.step):
                return

    @property
    def peak(self) -> float:
        return max(self.samples, default=0.0)
