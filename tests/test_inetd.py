"""tftpd behind the real super-servers, started from the samples in inetd/.

Each test reads a shipped sample and changes only what must differ on a test
machine: the port (a free high one), the paths (interpreter, package
directory, file root) and the user field (the samples say ``nobody``, who
may not be able to execute the test interpreter; tftpd itself still drops to
``nobody`` when it starts as root).  It appends only what a test needs to
observe and to finish quickly: ``--log-file``, ``-v``, ``--access-file``
(a file that does not exist: hermetic) and a short ``--idle-timeout``.

Super-servers: openbsd-inetd (foreground, private config), xinetd (unpacked
by tools/setup-tests into .venv/peers, foreground, private config) and
``systemd-socket-activate --datagram`` (fd 3 and ``--inetd``).  Clients:
tftp-hpa's tftp, atftp, and a scripted burst of 20 concurrent readers.
"""

from __future__ import annotations

import os
import pty
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from conftest import IN_CI, ROOT, need
from scripted_client import fetch

pytestmark = pytest.mark.e2e

SAMPLES = ROOT / "inetd"
PY = sys.executable
PKG = str(ROOT / "tftpd")
IDLE = 1.5
ME = pwd.getpwuid(os.getuid()).pw_name
BIG = bytes((i * 7 + i // 251) & 0xFF for i in range(70_000))   # 137 blocks of 512


def need_file(path: Path, what: str) -> str:
    if not path.exists():
        message = f"{what} ({path}) is missing (tools/setup-tests provides it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return str(path)


def openbsd_inetd() -> str:
    path = shutil.which("inetd") or "/usr/sbin/inetd"
    return need_file(Path(path), "openbsd-inetd")


def xinetd() -> str:
    path = shutil.which("xinetd")
    if path:
        return path
    return need_file(ROOT / ".venv" / "peers" / "xinetd" / "usr" / "sbin" / "xinetd", "xinetd")


def tftpd_script() -> str:
    """The console script pip made (stands in for AIX's /usr/sbin/tftpd)."""
    return need_file(Path(PY).parent / "tftpd", "the tftpd console script")


def free_port() -> int:
    """A UDP port free on IPv4 and IPv6."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def udp_bound(port: int) -> bool:
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    local = line.split()[1]
                    if int(local.rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            pass
    return False


def wait_bound(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if udp_bound(port):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on UDP port {port}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return False


def sample_line(name: str) -> str:
    lines = [ln for ln in (SAMPLES / name).read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, f"{name}: expected one service line, got {lines}"
    return lines[0]


class Env:
    """A world-readable file root, a log file and the path substitutions."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tftpd-inetd-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.root = self.dir / "root"
        self.root.mkdir()
        os.chmod(self.root, 0o755)
        for name, data in (("hello.txt", b"hello, world\n"), ("big.bin", BIG)):
            (self.root / name).write_bytes(data)
            os.chmod(self.root / name, 0o644)
        self.log = self.dir / "tftpd.log"
        self.out = self.dir / "out"
        self.out.mkdir()
        self.paths: Dict[str, str] = {
            "/usr/bin/python3": PY,
            "/opt/tftpd/bin/python3": PY,
            "/usr/local/lib/python3.11/dist-packages/tftpd": PKG,
            "/srv/tftp": str(self.root),
            "/tftpboot": str(self.root),
        }

    def extras(self) -> List[str]:
        return ["--access-file", str(self.dir / "no-tftpaccess.ctl"), "-v",
                "--log-file", str(self.log), "--idle-timeout", str(IDLE)]

    def args(self, words: List[str]) -> List[str]:
        args = [self.paths.get(w, w) for w in words]
        if "--root" not in args:             # AIX's line relies on the default /tftpboot
            args += ["--root", self.paths["/tftpboot"]]
        return args + self.extras()

    def log_lines(self) -> List[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def transfers(self) -> List[str]:
        return [ln for ln in self.log_lines() if re.search(r"\bRRQ from \S+ ", ln)]

    def wait_transfers(self, n: int, timeout: float = 10.0) -> List[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.transfers()
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"expected {n} transfer lines; log:\n" + "\n".join(self.log_lines()))

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.log_lines():
                if rx.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line {pattern!r}; log:\n" + "\n".join(self.log_lines()))

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.cleanup()


class Supervisor:
    """A super-server in the foreground; its output collected line by line."""

    def __init__(self, argv: List[str], **kw) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, **kw)
        self.lines: List[str] = []
        self.children: List[int] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}:\n{self.text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.children:          # tftpd processes it started, if any linger
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def supervisors() -> Iterator[List[Supervisor]]:
    started: List[Supervisor] = []
    yield started
    for s in started:
        s.stop()


# -- clients -------------------------------------------------------------------

def tftp_hpa(host: str, port: int, name: str, dest: Path) -> bytes:
    tftp = need("tftp")
    proc = subprocess.run([tftp, "-m", "octet", host, str(port), "-c", "get", name, str(dest)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "rror" not in proc.stdout + proc.stderr, \
        proc.stdout + proc.stderr
    return dest.read_bytes()


def tftp_hpa_put(host: str, port: int, src: Path, name: str) -> None:
    tftp = need("tftp")
    proc = subprocess.run([tftp, "-m", "octet", host, str(port), "-c", "put", str(src), name],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "rror" not in proc.stdout + proc.stderr, \
        proc.stdout + proc.stderr


def atftp(host: str, port: int, name: str, dest: Path, blksize: int = 1024) -> bytes:
    exe = need("atftp")
    proc = subprocess.run([exe, "--option", f"blksize {blksize}", "-g", "-r", name,
                           "-l", str(dest), host, str(port)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest.read_bytes()


def burst(host: str, port: int, n: int = 20) -> float:
    """n readers at once; returns the time the last one finished."""
    results: List[Optional[bytes]] = [None] * n
    errors: List[BaseException] = []
    gate = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            gate.wait(10)
            results[i] = fetch((host, port), "big.bin" if i % 2 else "hello.txt",
                               options={"blksize": "1024"} if i % 3 == 0 else None,
                               timeout=3)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done = time.monotonic()
    assert not errors, errors
    for i, data in enumerate(results):
        assert data == (BIG if i % 2 else b"hello, world\n"), f"reader {i}"
    return done


def pids_in(lines: List[str]) -> set:
    return {int(m.group(1)) for ln in lines for m in [re.search(r"tftpd\[(\d+)\]", ln)] if m}


# -- openbsd-inetd -------------------------------------------------------------

def start_inetd(env: Env, supervisors: List[Supervisor], sample: str, port: int,
                program: Optional[str] = None) -> Supervisor:
    fields = sample_line(sample).split()
    service, socktype, proto, wait, _user, prog, *argv = fields
    assert (socktype, service) == ("dgram", "tftp")
    if wait == "SRC":                       # AIX's SRC-controlled "wait"
        wait = "wait"
    assert wait == "wait", "tftpd is a 'wait' service"
    line = " ".join([str(port), socktype, proto, wait, ME,
                     program or env.paths.get(prog, prog)] + env.args(argv))
    conf = env.dir / "inetd.conf"
    conf.write_text(line + "\n")
    sup = Supervisor([openbsd_inetd(), "-d", "-i", str(conf)])
    supervisors.append(sup)
    wait_bound(port)
    return sup


def inetd_children(sup: Supervisor) -> List[int]:
    pids = [int(m.group(1)) for ln in list(sup.lines)
            for m in [re.match(r"(\d+) execv ", ln)] if m]
    sup.children = pids
    return pids


def test_openbsd_inetd_linux_sample_serves_real_clients(env: Env, supervisors) -> None:
    port = free_port()
    sup = start_inetd(env, supervisors, "inetd.conf", port)
    assert tftp_hpa("127.0.0.1", port, "hello.txt", env.out / "a") == b"hello, world\n"
    assert atftp("127.0.0.1", port, "big.bin", env.out / "b") == BIG
    assert tftp_hpa("::1", port, "big.bin", env.out / "c") == BIG
    assert atftp("::1", port, "hello.txt", env.out / "d", blksize=1428) == b"hello, world\n"
    lines = env.wait_transfers(4)
    assert any("RRQ from 127.0.0.1:" in ln and "big.bin: sent 70000 bytes" in ln
               and "blksize=1024" in ln for ln in lines), lines
    assert any("RRQ from [::1]:" in ln for ln in lines), lines
    # "udp": one socket per family, so at most one tftpd per family
    assert len(inetd_children(sup)) <= 2, sup.text()
    for pid in inetd_children(sup):
        sup.wait_for(rf"^{pid} reaped, status 0\b", timeout=IDLE + 8)


def test_openbsd_inetd_burst_is_one_process_that_exits_when_idle(env: Env, supervisors) -> None:
    port = free_port()
    sup = start_inetd(env, supervisors, "inetd.conf", port)
    done = burst("127.0.0.1", port)
    lines = env.wait_transfers(20)
    children = inetd_children(sup)
    assert len(children) == 1, sup.text()
    assert pids_in(lines) == set(children), lines
    sup.wait_for(rf"^{children[0]} reaped, status 0\b", timeout=IDLE + 8)
    waited = time.monotonic() - done
    assert IDLE - 0.3 <= waited, f"exited {waited:.2f} s after the last transfer"
    # inetd listens again: the next request starts a new tftpd
    assert tftp_hpa("127.0.0.1", port, "hello.txt", env.out / "again") == b"hello, world\n"
    assert len(inetd_children(sup)) == 2


def test_openbsd_inetd_venv_sample(env: Env, supervisors) -> None:
    port = free_port()
    sup = start_inetd(env, supervisors, "inetd.conf.venv", port)
    assert tftp_hpa("127.0.0.1", port, "big.bin", env.out / "a") == BIG
    env.wait_transfers(1)
    (pid,) = inetd_children(sup)
    sup.wait_for(rf"^{pid} reaped, status 0\b", timeout=IDLE + 8)


def test_aix_sample_udp6_serves_v4_mapped_clients_as_ipv4(env: Env, supervisors) -> None:
    """The AIX line (udp6, SRC, -n) under openbsd-inetd: one dual-stack socket."""
    fields = sample_line("inetd.conf.aix").split()
    assert fields[:7] == ["tftp", "dgram", "udp6", "SRC", "nobody", "/usr/sbin/tftpd", "tftpd"]
    assert fields[7:] == ["-n"]
    os.chmod(env.root, 0o777)               # -n: nobody may create files here
    port = free_port()
    sup = start_inetd(env, supervisors, "inetd.conf.aix", port, program=tftpd_script())
    assert tftp_hpa("127.0.0.1", port, "hello.txt", env.out / "a") == b"hello, world\n"
    assert atftp("::1", port, "big.bin", env.out / "b") == BIG
    upload = env.out / "up.bin"
    upload.write_bytes(BIG[:3000])
    tftp_hpa_put("127.0.0.1", port, upload, "uploaded.bin")
    assert (env.root / "uploaded.bin").read_bytes() == BIG[:3000]
    env.wait_transfers(2)
    env.wait_log(r"WRQ from 127\.0\.0\.1:\d+ uploaded\.bin: received 3000 bytes")
    text = "\n".join(env.log_lines())
    assert "RRQ from 127.0.0.1:" in text and "WRQ from 127.0.0.1:" in text, text
    assert "::ffff:" not in text, text
    assert "RRQ from [::1]:" in text, text
    assert len(inetd_children(sup)) == 1, sup.text()    # one socket, one process


# -- xinetd --------------------------------------------------------------------

def start_xinetd(env: Env, supervisors: List[Supervisor], port: int) -> Supervisor:
    body = (SAMPLES / "xinetd.d" / "tftp").read_text()
    out = []
    for line in body.splitlines():
        m = re.match(r"^(\s*)(\w+)(\s*=\s*)(.*)$", line)
        if m and not line.lstrip().startswith("#"):
            key, value = m.group(2), m.group(4)
            if key == "port":
                value = str(port)
            elif key == "user":
                value = ME
            elif key == "server":
                value = env.paths.get(value, value)
            elif key == "server_args":
                value = " ".join(env.args(value.split()))
            line = f"{m.group(1)}{key}{m.group(3)}{value}"
        out.append(line)
    services = env.dir / "xinetd.d"
    services.mkdir()
    (services / "tftp").write_text("\n".join(out) + "\n")
    xlog = env.dir / "xinetd.log"
    main = env.dir / "xinetd.conf"
    main.write_text("defaults\n{\n"
                    f"\tlog_type = FILE {xlog}\n"
                    "\tlog_on_success = PID EXIT DURATION\n"
                    "\tlog_on_failure = HOST\n"
                    "}\n"
                    f"includedir {services}\n")
    sup = Supervisor([xinetd(), "-dontfork", "-f", str(main),
                      "-pidfile", str(env.dir / "xinetd.pid")])
    sup.xlog = xlog  # type: ignore[attr-defined]
    supervisors.append(sup)
    wait_bound(port)
    return sup


def xinetd_log(sup: Supervisor) -> str:
    try:
        return sup.xlog.read_text()  # type: ignore[attr-defined]
    except FileNotFoundError:
        return ""


def wait_xinetd(sup: Supervisor, pattern: str, timeout: float) -> re.Match:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(pattern, xinetd_log(sup), re.M)
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"xinetd log has no {pattern!r}:\n{xinetd_log(sup)}\n{sup.text()}")


def test_xinetd_sample(env: Env, supervisors) -> None:
    port = free_port()
    sup = start_xinetd(env, supervisors, port)
    assert tftp_hpa("127.0.0.1", port, "hello.txt", env.out / "a") == b"hello, world\n"
    assert atftp("::1", port, "big.bin", env.out / "b") == BIG
    done = burst("127.0.0.1", port)
    lines = env.wait_transfers(22)
    starts = [int(p) for p in re.findall(r"START: tftp pid=(\d+)", xinetd_log(sup))]
    sup.children = starts
    assert len(starts) == 1, xinetd_log(sup)            # flags = IPv6: one dual-stack socket
    assert pids_in(lines) == set(starts), lines
    text = "\n".join(lines)
    assert "RRQ from 127.0.0.1:" in text and "RRQ from [::1]:" in text and "::ffff:" not in text
    wait_xinetd(sup, rf"EXIT: tftp status=0 pid={starts[0]}\b", timeout=IDLE + 8)
    assert time.monotonic() - done >= IDLE - 0.3


# -- systemd-socket-activate ---------------------------------------------------

def unit(path: Path) -> Dict[str, str]:
    values: Dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


@pytest.mark.parametrize("service", ["tftpd.service", "tftpd-inetd.service"])
def test_systemd_socket_activation(env: Env, supervisors, service: str) -> None:
    activate = need("systemd-socket-activate")
    sock_unit = unit(SAMPLES / "systemd" / "tftpd.socket")
    svc = unit(SAMPLES / "systemd" / service)
    assert sock_unit["ListenDatagram"] == "69"
    assert sock_unit.get("BindIPv6Only") == "both"
    inetd_style = svc.get("StandardInput") == "socket"
    assert inetd_style == (service == "tftpd-inetd.service")
    port = free_port()
    argv = [activate, "--datagram", "-l", f"[::]:{port}"]
    if inetd_style:
        argv.append("--inetd")
    argv += env.args(svc["ExecStart"].split())
    sup = Supervisor(argv)
    supervisors.append(sup)
    wait_bound(port)
    assert tftp_hpa("127.0.0.1", port, "hello.txt", env.out / "a") == b"hello, world\n"
    assert atftp("::1", port, "big.bin", env.out / "b") == BIG
    burst("::1", port)
    lines = env.wait_transfers(22)
    # systemd-socket-activate execs the service: its PID is tftpd's, and only it serves
    assert pids_in(lines) == {sup.proc.pid}, lines
    assert "RRQ from 127.0.0.1:" in "\n".join(lines)
    assert sup.proc.wait(IDLE + 8) == 0, sup.text()


# -- not a socket --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["devnull", "pipe", "tty", "tcp", "unix-dgram",
                                  "listen-pid-of-another"])
def test_not_a_socket_is_one_line_pointing_at_p(tmp_path: Path, kind: str) -> None:
    env = dict(os.environ)
    closers = []
    if kind == "pipe":
        r, w = os.pipe()
        stdin, closers = r, [r, w]
    elif kind == "tty":
        master, slave = pty.openpty()
        stdin, closers = slave, [master, slave]
    elif kind == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen()
        stdin, closers = s.fileno(), [s]
    elif kind == "unix-dgram":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        stdin, closers = a.fileno(), [a, b]
    else:
        stdin = subprocess.DEVNULL
        if kind == "listen-pid-of-another":
            env.update(LISTEN_PID="1", LISTEN_FDS="1")
    try:
        proc = subprocess.run([PY, "-m", "tftpd", "--root", str(tmp_path)], stdin=stdin,
                              capture_output=True, text=True, timeout=30, env=env,
                              cwd=str(ROOT))
    finally:
        for c in closers:
            c.close() if hasattr(c, "close") else os.close(c)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "-p PORT" in lines[0] and "not a datagram socket" in lines[0]
    assert proc.stdout == ""
