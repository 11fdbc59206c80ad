"""Reliability through a lossy network (tests/lossy.py, a relay on loopback).

* 10 % loss and 5 % duplication in each direction (plus a little delay and
  reordering): 100 RRQs and 100 WRQs of 1 MiB, blksize 512 and 1468 times
  windowsize 1 and 8, all byte-exact, none served twice.
* 100 % loss after the request, and 100 % loss in the middle of a transfer:
  every transfer is abandoned within the bound the man page documents
  (RETRANSMISSION), and the server's threads and descriptors come back to
  what they were before.

The server runs with a short ``-t`` so that recovering from ~400 losses per
transfer takes seconds, not minutes; the clients run 40 at a time.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import procinfo
from conftest import ServerProcess
from lossy import Impairment, Outcome, RelayProcess, get, put, request

MIB = 1 << 20
LOSSY = Impairment(loss=0.10, dup=0.05, delay=0.001, reorder=0.01, reorder_delay=0.005)
CONFIGS = [(512, 1), (1468, 1), (512, 8), (1468, 8)]   # slowest first
PER_CONFIG = 25                                        # x 4 configs, RRQ and WRQ each
CONCURRENCY = 40

pytestmark = pytest.mark.slow


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("processes", ["default", "1"])
def test_lossy_link_200_transfers_byte_exact(tftpd_server, tmp_path: Path, processes: str) -> None:
    """... also with one serving process, where the downloads (up to 40 at
    once) go through its multiplexer, which then hands each duplicate, gap,
    reordered ACK and timeout back to the transfer's thread."""
    root = tmp_path / "root"
    root.mkdir()
    upload = tmp_path / "upload"
    upload.mkdir()
    content = os.urandom(MIB)
    (root / "m.bin").write_bytes(content)
    (root / "m.bin").chmod(0o644)
    uploads = {f"u-{b}-{w}-{i}.bin": os.urandom(MIB)
               for b, w in CONFIGS for i in range(PER_CONFIG)}
    extra = [] if processes == "default" else ["--processes", processes]
    server = tftpd_server("-n", "-v", "-i", "-d", str(upload), "-t", "0.02", "-x", "8",
                          "-c", "64", *extra, root=root)
    relay = RelayProcess(server.addr, impairment=LOSSY, seed=20261122, lifetime=300)
    jobs: List[Tuple[str, int, int, str]] = []
    for b, w in CONFIGS:
        for i in range(PER_CONFIG):
            jobs += [("RRQ", b, w, "m.bin"), ("WRQ", b, w, f"u-{b}-{w}-{i}.bin")]

    def run(job: Tuple[str, int, int, str]) -> Tuple[Tuple, Outcome]:
        kind, b, w, name = job
        opts = {"blksize": str(b), "windowsize": str(w)}
        if kind == "RRQ":
            return job, get(relay.addr, name, opts, timeout=0.015, limit_s=150)
        return job, put(relay.addr, name, uploads[name], opts, timeout=0.015, limit_s=150)

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(run, jobs))
    finally:
        stats = relay.stop()
    elapsed = time.monotonic() - started
    wrong = []
    second = []
    for (kind, b, w, name), out in results:
        where = f"{kind} {name} blksize={b} windowsize={w}"
        if not out.ok or out.error is not None:
            wrong.append(f"{where}: ok={out.ok} error={out.error}")
        elif out.oack != {"blksize": str(b), "windowsize": str(w)}:
            wrong.append(f"{where}: OACK {out.oack}")
        elif kind == "RRQ" and sha(out.data) != sha(content):
            wrong.append(f"{where}: {len(out.data)} bytes, not the file")
        elif kind == "WRQ" and sha((upload / name).read_bytes()) != sha(uploads[name]):
            wrong.append(f"{where}: the stored file differs")
        if out.other_tids:
            second.append(f"{where}: a second transfer answered from {out.other_tids}")
    failed = [l for l in server.lines if " failed " in l or "internal error" in l]
    assert wrong == [], "\n".join(wrong[:20] + failed[:20])
    # A first reply is sent at most 3 times: with 10% loss each way about one
    # transfer in 150 loses all three exchanges and is abandoned, and the
    # client's next retransmitted request is then rightly a new transfer.  Any
    # other second transfer is a duplicate the server should have recognised.
    abandoned = [l for l in failed if "failed after 0 bytes: no answer" in l]
    assert len(second) <= len(abandoned), "\n".join(second + failed[:20])
    assert not any("internal error" in l or "Traceback" in l for l in server.lines)
    assert [p.name for p in upload.iterdir() if p.name.startswith(".tftpd-")] == []
    # the link really was that bad, in both directions
    assert stats, "no counters from the relay"
    for direction in ("c2s", "s2c"):
        assert stats[f"{direction}_in"] > 100_000
    total = stats["c2s_in"] + stats["s2c_in"]
    assert 0.08 < stats["lost"] / total < 0.12, stats
    assert 0.035 < stats["duplicated"] / total < 0.065, stats
    assert stats["reordered"] > 0
    restarts = sum(out.attempts - 1 for _, out in results)
    print(f"\n200 transfers of 1 MiB through 10% loss + 5% dup each way: {elapsed:.1f} s, "
          f"{restarts} restarted after a lost first exchange; relay {stats}")


# -- 100 % loss: abandoned within the bound, everything freed ---------------------------------
T = 0.2          # -t
X = 4            # -x
NEVER_ANSWERED_BOUND = T * (1 + 2 + 4)                 # 3 sends of the first reply
ANSWERED_BOUND = T * (2 ** X - 1)                      # X timeouts, doubling from the floor
SLACK = 1.5                                            # a loaded 2-core machine


class LineClock:
    """Records when each server log line matching a pattern first appeared."""

    def __init__(self, server: ServerProcess, pattern: str) -> None:
        self.server = server
        self.rx = re.compile(pattern)
        self.seen: Dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(20000):                     # 20 ms steps: at most ~400 s
            lines = self.server.lines
            now = time.monotonic()
            for i in range(len(lines)):
                if i not in self.seen and self.rx.search(lines[i]):
                    self.seen[i] = now
            if self._stop.wait(0.02):
                return

    def wait(self, count: int, timeout: float) -> List[float]:
        end = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < end:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(2)
        return sorted(self.seen.values())


def _hold_workers(server: ServerProcess, count: int) -> None:
    """``count`` transfers at once (each holds a worker until its client sends
    ERROR): the pool grows to ``count`` threads, as it will in the test."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.settimeout(5)
            s.sendto(request(1, "m.bin", options={"timeout": "10"}), server.addr)
            socks.append(s)
        tids = [s.recvfrom(100)[1] for s in socks]    # every OACK: all workers busy
        for s, tid in zip(socks, tids):
            s.sendto(b"\x00\x05\x00\x00done\x00", tid)
    finally:
        for s in socks:
            s.close()


def test_total_loss_abandons_within_bound_and_frees_everything(tftpd_server,
                                                              tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "m.bin").write_bytes(os.urandom(MIB))
    (root / "m.bin").chmod(0o644)
    n = 16
    server = tftpd_server("-n", "-v", "-i", "-t", str(T), "-x", str(X), "-c", str(n),
                          "--processes", "1",
                          root=root)
    pid = server.proc.pid
    _hold_workers(server, n)
    assert _wait_lines(server, r"ended by client", n)
    time.sleep(0.3)
    base = {"threads": procinfo.threads(pid), "fds": procinfo.fds(pid)}
    base_targets = procinfo.fd_targets(pid)
    # the main thread, a full pool and the multiplexer's thread (transfers pumped at once)
    assert base["threads"] == 1 + n + 1

    # 1. 100 % loss right after the request: nobody ever answers the first reply
    clock = LineClock(server, r"failed after 0 bytes: no answer after 3 timeouts")
    relay = RelayProcess(server.addr, blackout_after=1, seed=1, lifetime=60)
    clients = []
    try:
        sent_at = time.monotonic()
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.sendto(request(1, "m.bin") if i % 2 else request(2, f"w{i}.bin"), relay.addr)
            clients.append(s)
        times = clock.wait(n, timeout=NEVER_ANSWERED_BOUND * 3 + 10)
    finally:
        stats = relay.stop()
        for s in clients:
            s.close()
    assert len(times) == n, server.log()
    late = [round(t - sent_at, 2) for t in times if t - sent_at > NEVER_ANSWERED_BOUND + SLACK]
    assert late == [], f"abandoned after more than {NEVER_ANSWERED_BOUND} s: {late}"
    # the first reply went out at most 3 times per transfer (and reached no one)
    assert stats["s2c_in"] <= 3 * n and stats["c2s_out"] == n, stats
    after = procinfo.settle(pid, base["threads"], base["fds"])
    assert after == base, (after, base, procinfo.fd_targets(pid), base_targets)
    _hold_workers(server, n)        # all n workers are free again (none is stuck)
    print(f"\nnever answered: abandoned {min(times) - sent_at:.2f}..{max(times) - sent_at:.2f} s "
          f"after the request (bound {NEVER_ANSWERED_BOUND:.1f} s); {stats['s2c_in']} replies "
          f"for {n} requests; threads/fds {after} = before")

    # 2. 100 % loss in the middle of transfers that were going well
    clock = LineClock(server, rf"failed after [1-9]\d* bytes: no answer after {X} timeouts")
    relay = RelayProcess(server.addr, blackout_after=60, seed=2, lifetime=60)
    payload = os.urandom(MIB)
    silenced: List[float] = []

    def victim(i: int) -> None:
        opts = {"blksize": "512"}
        try:
            if i % 2:
                get(relay.addr, "m.bin", opts, timeout=0.05, patience=ANSWERED_BOUND + 3,
                    attempts=1)
            else:
                put(relay.addr, f"mid{i}.bin", payload, opts, timeout=0.05,
                    patience=ANSWERED_BOUND + 3, attempts=1)
        except AssertionError:
            pass                                   # silence: what this test makes

    threads = [threading.Thread(target=victim, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        # the last datagram through the relay is the moment the silence began;
        # the relay lets 60 per flow through, which takes well under a second
        silenced.append(time.monotonic())
        times = clock.wait(n, timeout=ANSWERED_BOUND * 3 + 15)
        for t in threads:
            t.join(ANSWERED_BOUND + 10)
    finally:
        stats = relay.stop()
    assert len(times) == n, server.log()
    late = [round(t - silenced[0], 2) for t in times if t - silenced[0] > ANSWERED_BOUND + SLACK + 1]
    assert late == [], f"abandoned after more than {ANSWERED_BOUND} s of silence: {late}"
    assert stats["blacked_out"] > 0
    after = procinfo.settle(pid, base["threads"], base["fds"])
    assert after == base, (after, base, procinfo.fd_targets(pid), base_targets)
    _hold_workers(server, n)
    print(f"answered, then silence: abandoned {min(times) - silenced[0]:.2f}.."
          f"{max(times) - silenced[0]:.2f} s after the clients started (bound "
          f"{ANSWERED_BOUND:.1f} s of silence); threads/fds {after} = before")
    # nothing of the abandoned uploads is left, and the server still serves
    assert sorted(p.name for p in root.iterdir()) == ["m.bin"]
    out = get(server.addr, "m.bin", {"blksize": "1468"})
    assert out.ok and out.data == (root / "m.bin").read_bytes()


def _wait_lines(server: ServerProcess, pattern: str, count: int, timeout: float = 15) -> bool:
    rx = re.compile(pattern)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sum(1 for l in list(server.lines) if rx.search(l)) >= count:
            return True
        time.sleep(0.02)
    return False
