#!/usr/bin/env python3
"""Amplification: what a server sends in reply to one request whose sender
never answers (a request with a forged source address makes the server send
all of it to the victim).

For each server and each request (an RRQ with no options, with blksize 512,
with blksize 65464), one datagram is sent from a socket that then only
listens; every datagram that comes back is counted until the server has
clearly given up.  The factor is bytes out / bytes in, as UDP payload and as
IPv4 packets (28 bytes of IP and UDP header each; without fragmentation).

    .venv/bin/python bench/amplification.py            # short timeouts, same counts
    .venv/bin/python bench/amplification.py --default-timing   # both servers' defaults

Servers: tftpd (``python -m tftpd -p 0 --address 127.0.0.1 -t T``) and tftp-hpa
(``in.tftpd -L -a 127.0.0.1:PORT -s DIR -T USEC``: Debian's tftpd-hpa, or the
copy tools/setup-tests unpacks into .venv/peers).  The short timing (tftpd
``-t 0.2``, in.tftpd ``-T 200000``) changes when the retransmissions happen,
not how many there are; ``--default-timing`` uses ``-t 1`` and in.tftpd's
default (1 s) and takes about a minute.  Each server is stopped by its PID.
Only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
FILE = "pxelinux.0"
CASES = [("no options", {}), ("blksize 512", {"blksize": "512"}),
         ("blksize 65464", {"blksize": "65464"})]
HEADERS = 28          # IPv4 + UDP


def rrq(name: str, options: Dict[str, str]) -> bytes:
    parts = [name.encode(), b"octet"]
    for k, v in options.items():
        parts += [k.encode(), v.encode()]
    return b"\x00\x01" + b"".join(p + b"\0" for p in parts)


def find_in_tftpd() -> Optional[str]:
    for p in (REPO / ".venv/peers/tftpd-hpa/usr/sbin/in.tftpd", Path("/usr/sbin/in.tftpd"),
              Path(shutil.which("in.tftpd") or "/nonexistent")):
        if p.exists():
            version = subprocess.run([str(p), "-V"], capture_output=True, text=True)
            if "tftp-hpa" in version.stdout + version.stderr:
                return str(p)
    return None


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, name: str, cmd: List[str], port: Optional[int]) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=str(REPO))
        self.lines: List[str] = []
        self.port = port
        ready = threading.Event()

        def reader() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                m = re.search(r"listening on \S*?:(\d+)", line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        if port is None:
            ready.wait(15)
        else:
            time.sleep(0.3)                   # in.tftpd -L binds at once
        if self.port is None or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"{name} did not start:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()             # by PID
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def measure(port: int, request: bytes, quiet: float, limit: float) -> List[Tuple[float, int]]:
    """(seconds after the request, size) of every datagram that answers it; the
    server is taken to have given up after ``quiet`` s with nothing (and at
    least twice the longest gap so far)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    got: List[Tuple[float, int]] = []
    try:
        t0 = time.monotonic()
        s.sendto(request, ("127.0.0.1", port))
        last = t0
        gap = 0.0
        while time.monotonic() - t0 < limit:
            wait = max(quiet, 2.5 * gap) - (time.monotonic() - last)
            if wait <= 0:
                break
            s.settimeout(wait)
            try:
                data, _ = s.recvfrom(65536 + 4)
            except socket.timeout:
                break
            now = time.monotonic()
            gap = max(gap, now - last) if got else 0.0
            last = now
            got.append((round(now - t0, 2), len(data)))
    finally:
        s.close()
    return got


def run(server: Server, quiet: float, limit: float) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    results: Dict[str, List[Tuple[float, int]]] = {}

    def one(label: str, opts: Dict[str, str]) -> None:
        results[label] = measure(server.port or 0, rrq(FILE, opts), quiet, limit)

    threads = [threading.Thread(target=one, args=(label, opts)) for label, opts in CASES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit + 10)
    for label, opts in CASES:
        req = len(rrq(FILE, opts))
        got = results.get(label, [])
        out = sum(size for _, size in got)
        rows.append({"server": server.name, "request": label, "in": req, "datagrams": len(got),
                     "first": got[0][1] if got else 0, "out": out,
                     "factor": out / req,
                     "factor_ip": (out + HEADERS * len(got)) / (req + HEADERS),
                     "times": [t for t, _ in got]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--default-timing", action="store_true",
                    help="tftpd -t 1 and in.tftpd's default timeout (about a minute)")
    a = ap.parse_args()
    t = 1.0 if a.default_timing else 0.2
    hpa_us = 1_000_000 if a.default_timing else 200_000
    quiet = 6.0 * t + 1.0 if not a.default_timing else 40.0
    limit = 200.0
    work = Path(tempfile.mkdtemp(prefix="tftpd-amplification-"))
    os.chmod(work, 0o755)
    rows: List[Dict[str, object]] = []
    try:
        (work / FILE).write_bytes(os.urandom(1 << 20))
        (work / FILE).chmod(0o644)
        (work / "tftpaccess.ctl").write_text(f"allow:{work}\n")
        servers = [("tftpd", [sys.executable, "-m", "tftpd", "-p", "0", "--address", "127.0.0.1",
                              "--root", str(work), "--access-file", str(work / "tftpaccess.ctl"),
                              "-t", str(t), "--user", "root"], None)]
        hpa = find_in_tftpd()
        if hpa is None:
            print("in.tftpd (tftp-hpa) not found: measuring tftpd only", file=sys.stderr)
        else:
            port = free_port()
            servers.append(("tftp-hpa", [hpa, "-L", "-a", f"127.0.0.1:{port}", "-s", str(work),
                                         "-T", str(hpa_us)], port))
        for name, cmd, port in servers:
            server = Server(name, cmd, port)
            try:
                rows += run(server, quiet, limit)
            finally:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timing = ("tftpd -t 1, in.tftpd -T 1000000 (defaults)" if a.default_timing
              else "tftpd -t 0.2, in.tftpd -T 200000")
    print(f"One RRQ for a 1 MiB file from a peer that never answers ({timing}):\n")
    print("| server | request | bytes in | datagrams out | first reply | bytes out | "
          "factor (UDP payload) | factor (IPv4 packets) | sent at (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        times = ", ".join(f"{x:g}" for x in r["times"])  # type: ignore[attr-defined]
        print(f"| {r['server']} | {r['request']} | {r['in']} | {r['datagrams']} | {r['first']} | "
              f"{r['out']} | {r['factor']:.1f} | {r['factor_ip']:.1f} | {times} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
