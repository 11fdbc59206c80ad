#!/usr/bin/env python3
"""Start-up cost under inetd: time from the first datagram to the first DATA.

Every burst of requests to an inetd ("wait") service pays one start of the
server.  This runs openbsd-inetd in the foreground on a private config with
one line per server (tftp-hpa's in.tftpd as the reference, tftpd in its
inetd.conf forms), and for each trial, with no server process running, sends
one RRQ for a one-block file and times the first DATA.  It then ACKs, waits
until inetd has reaped the server (both are told to exit as soon as they are
idle), and goes on; the servers take turns.

    .venv/bin/python bench/inetd_startup.py [--trials 30]
    .venv/bin/python bench/inetd_startup.py --linger 200

With ``--linger N`` it measures the other inetd case instead: each server
stays after its first request (tftpd ``--idle-timeout``, in.tftpd ``-t``), and
N sequential one-block RRQs, each from a new client port, are timed from RRQ
to the last ACK (tftp-hpa forks a child per request; tftpd serves them from
the one process).

Needs root (inetd switches to the service user), openbsd-inetd and in.tftpd
(tools/setup-tests unpacks it into .venv/peers/tftpd-hpa).  Only loopback.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent


def find_in_tftpd() -> str:
    for p in (REPO / ".venv/peers/tftpd-hpa/usr/sbin/in.tftpd", Path("/usr/sbin/in.tftpd")):
        if p.exists():
            return str(p)
    sys.exit("in.tftpd not found: run tools/setup-tests (it unpacks tftpd-hpa)")


def find_inetd() -> str:
    path = shutil.which("inetd") or "/usr/sbin/inetd"
    if not os.path.exists(path):
        sys.exit("openbsd-inetd not found: run tools/setup-tests")
    return path


def nobody_can_run(py: str, pkg: str) -> bool:
    """True if user nobody can execute ``py`` and read the package."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return False
    probe = subprocess.run([py, "-I", "-S", "-c", f"import os; os.stat({pkg + '/main.py'!r})"],
                           preexec_fn=lambda: (os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid)),
                           capture_output=True, cwd="/")
    return probe.returncode == 0


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Inetd:
    def __init__(self, conf: Path) -> None:
        self.proc = subprocess.Popen([find_inetd(), "-d", "-i", str(conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: List[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self.cond:
            return sum(1 for ln in self.lines if rx.search(ln))

    def wait_count(self, pattern: str, n: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while self.count_locked(pattern) < n:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def count_locked(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for ln in self.lines if rx.search(ln))

    def wait_services(self, n: int) -> None:
        """Until inetd has added its n services (at most 10 s)."""
        deadline = time.monotonic() + 10
        while self.count(r"^ADD: ") < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def make_root(prefix: str) -> Tuple[Path, Path]:
    """A world-readable work directory with a root holding one.bin (100 bytes)."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(work, 0o755)
    root = work / "root"
    root.mkdir()
    os.chmod(root, 0o755)
    (root / "one.bin").write_bytes(b"x" * 100)
    os.chmod(root / "one.bin", 0o644)
    return work, root


def median_p90(xs: List[float]) -> Tuple[float, float]:
    xs.sort()
    return statistics.median(xs), xs[min(len(xs) - 1, int(len(xs) * 0.9))]


def first_data(port: int, timeout: float = 10.0) -> float:
    """Seconds from sending an RRQ to receiving DATA 1; the transfer is then ACKed."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        rrq = b"\0\1one.bin\0octet\0"
        t0 = time.perf_counter()
        s.sendto(rrq, ("127.0.0.1", port))
        data, peer = s.recvfrom(1024)
        t1 = time.perf_counter()
        if data[:4] != b"\0\3\0\1":
            raise RuntimeError(f"expected DATA 1, got {data[:40]!r}")
        s.sendto(b"\0\4\0\1", peer)
        return t1 - t0
    finally:
        s.close()


def timed(name: str, cmd: str, port: int) -> float:
    """``first_data`` of one server, or exit naming it (under inetd a server's
    errors go to the client's socket, so a broken line only shows as silence)."""
    try:
        return first_data(port)
    except (TimeoutError, socket.timeout, ConnectionRefusedError) as e:
        sys.exit(f"{name}: no DATA ({e}); run its inetd command by hand to see why:"
                 f"\n  {cmd}")


def lingering(n: int, py: str) -> int:
    """N sequential small RRQs to servers that stay after the first one."""
    work, root = make_root("tftpd-linger-")
    me = pwd.getpwuid(os.getuid()).pw_name
    pkg = str(REPO / "tftpd")
    idle = 3
    servers = {
        "in.tftpd (tftp-hpa)": (free_port(), f"{find_in_tftpd()} in.tftpd -s {root} -t {idle}"),
        "tftpd -I -S .../__main__.py": (free_port(), f"{py} {py} -I -S {pkg}/__main__.py --root "
                                        f"{root} --access-file {work}/none.ctl "
                                        f"--idle-timeout {idle}"),
    }
    conf = work / "inetd.conf"
    conf.write_text("".join(f"{port} dgram udp4 wait {me} {cmd}\n"
                            for port, cmd in servers.values()))
    inetd = Inetd(conf)
    results: Dict[str, List[float]] = {name: [] for name in servers}
    try:
        inetd.wait_services(len(servers))
        for name, (port, cmd) in servers.items():
            reaped = inetd.count(r" reaped, status ")
            timed(name, cmd, port)                    # starts the server; not counted
            for _ in range(n):
                t0 = time.perf_counter()
                timed(name, cmd, port)                # RRQ, DATA 1 (the whole file), ACK
                results[name].append(time.perf_counter() - t0)
            if not inetd.wait_count(r" reaped, status ", reaped + 1, idle + 30):
                sys.exit(f"{name}: server did not exit after its idle time")
    finally:
        inetd.stop()
        shutil.rmtree(work, ignore_errors=True)
    ref = statistics.median(results["in.tftpd (tftp-hpa)"])
    print(f"{n} sequential one-block RRQs to a lingering server under openbsd-inetd"
          f" ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(f"{'server':34} {'median':>9} {'p90':>9} {'req/s':>8} {'speed-up':>9}")
    for name, xs in results.items():
        med, p90 = median_p90(xs)
        print(f"{name:34} {med * 1e6:7.0f}us {p90 * 1e6:7.0f}us {len(xs) / sum(xs):8.0f} "
              f"{ref / med:8.1f}x")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--linger", type=int, default=0, metavar="N",
                    help="measure N sequential requests to a lingering server instead")
    ap.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                    else sys.executable,
                    help="interpreter for the -I -S forms (default: /usr/bin/python3)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (inetd switches to the service user)")
    if args.linger:
        return lingering(args.linger, args.python)

    work, root = make_root("tftpd-startup-")
    me = pwd.getpwuid(os.getuid()).pw_name
    py = args.python
    # the project's virtual environment (tools/setup-tests), where tftpd is installed
    venv = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
    pkg = str(REPO / "tftpd")
    common = f"--root {root} --access-file {work}/none.ctl --idle-timeout 0"
    servers: Dict[str, Tuple[int, str, str]] = {}

    def add(name: str, user: str, program: str, argv: str) -> None:
        servers[name] = (free_port(), user, f"{program} {argv}")

    add("in.tftpd (tftp-hpa)", me, find_in_tftpd(), f"in.tftpd -s {root} -t 0")
    add("tftpd -I -S .../__main__.py", me, py, f"{py} -I -S {pkg}/__main__.py {common}")
    if nobody_can_run(py, pkg):
        add("  same, inetd user nobody", "nobody", py,
            f"{py} -I -S {pkg}/__main__.py {common}")
    add("tftpd -I -S .../tftpd (dir)", me, py, f"{py} -I -S {pkg} {common}")
    add("tftpd venv -I -m tftpd", me, venv, f"{venv} -I -m tftpd {common}")
    conf = work / "inetd.conf"
    conf.write_text("".join(f"{port} dgram udp4 wait {user} {cmd}\n"
                            for port, user, cmd in servers.values()))
    inetd = Inetd(conf)
    try:
        inetd.wait_services(len(servers))
        results: Dict[str, List[float]] = {name: [] for name in servers}
        # one warm-up per server (page cache, .pyc), not counted
        for rnd in range(args.trials + 1):
            for name, (port, _user, cmd) in servers.items():
                reaped = inetd.count(r" reaped, status ")
                dt = timed(name, cmd, port)
                if not inetd.wait_count(r" reaped, status ", reaped + 1, 30):
                    sys.exit(f"{name}: server did not exit after the transfer")
                if rnd:
                    results[name].append(dt)
        failures = [ln for ln in inetd.lines if re.search(r"reaped, status [^0]", ln)]
        if failures:
            print("warning: non-zero exits:", failures[:3], file=sys.stderr)
    finally:
        inetd.stop()
        shutil.rmtree(work, ignore_errors=True)

    ref = statistics.median(results["in.tftpd (tftp-hpa)"])
    print(f"first datagram -> first DATA under openbsd-inetd, {args.trials} cold starts each"
          f" ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(f"(-I -S forms with {py}; 'ratio' is the median over in.tftpd's median)")
    print(f"{'server':34} {'median':>9} {'min':>9} {'p90':>9} {'ratio':>7}")
    for name, xs in results.items():
        med, p90 = median_p90(xs)
        print(f"{name:34} {med * 1e3:7.1f}ms {xs[0] * 1e3:7.1f}ms {p90 * 1e3:7.1f}ms "
              f"{med / ref:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
