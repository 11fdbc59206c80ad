"""``-p PORT --daemon``: python-daemon's DaemonContext and a PID lock file.

The foreground process returns once the daemon serves (or prints why it
could not); the daemon detaches (new session, cwd /, umask 022, standard
streams on /dev/null), holds the PID file, and removes it when it exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from conftest import ROOT, need
from scripted_client import TftpFailure, fetch
from test_server import wait_until_no_process_takes_requests

BIG = bytes(range(256)) * 40          # 10240 bytes: 21 blocks of 512


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


class Daemons:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.root.mkdir()
        (self.root / "small.txt").write_bytes(b"small file\n")
        (self.root / "big.bin").write_bytes(BIG)
        self.pids: List[int] = []

    def run(self, port: int, *extra: str, pidfile: Path, log: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "tftpd", "-p", str(port), "--address", "127.0.0.1",
               "--root", str(self.root), "--access-file", str(self.tmp / "none.ctl"),
               "--user", "root", "--daemon", "--pidfile", str(pidfile),
               "--log-file", str(log), "-v"] + list(extra)
        proc = subprocess.run(cmd, cwd=str(ROOT), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
        if pidfile.exists():
            try:
                self.pids.append(int(pidfile.read_text().split()[0]))
            except (ValueError, IndexError):
                pass
        return proc

    def stop_all(self) -> None:
        for pid in self.pids:
            if alive(pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"tftpd" not in f.read():
                            continue
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    yield d
    d.stop_all()


def read_pid(path: Path) -> int:
    text = path.read_text()
    assert text.endswith("\n")
    return int(text)


def proc_stat(pid: int) -> List[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()


def wait_log(log: Path, text: str, timeout: float = 10.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        content = log.read_text() if log.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in log:\n{log.read_text() if log.exists() else ''}")


def test_daemon_detaches_writes_pidfile_serves_and_cleans_up(daemons: Daemons, tmp_path: Path) -> None:
    port, pidfile, log = free_port(), tmp_path / "tftpd.pid", tmp_path / "tftpd.log"
    t0 = time.monotonic()
    proc = daemons.run(port, pidfile=pidfile, log=log)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 20
    pid = read_pid(pidfile)
    assert alive(pid)
    st = proc_stat(pid)
    ppid, sid = int(st[1]), int(st[3])
    assert sid != os.getsid(0) and sid != pid         # own session, not its leader
    assert ppid != os.getpid()
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    status = Path(f"/proc/{pid}/status").read_text()
    assert "Umask:\t0022" in status
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    assert fetch(("127.0.0.1", port), "big.bin") == BIG
    content = wait_log(log, "RRQ from 127.0.0.1:")
    assert f"tftpd[{pid}]: daemon started: process {pid}" in content
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 10)
    assert not pidfile.exists()
    assert "daemon stopped: PID file" in log.read_text()


def test_uploads_get_umask_022_modes(daemons: Daemons, tmp_path: Path) -> None:
    tftp = need("tftp")
    port, pidfile, log = free_port(), tmp_path / "tftpd.pid", tmp_path / "tftpd.log"
    proc = daemons.run(port, "-n", pidfile=pidfile, log=log)
    assert proc.returncode == 0, proc.stderr
    src = tmp_path / "up.txt"
    src.write_bytes(b"uploaded\n")
    put = subprocess.run([tftp, "-m", "octet", "127.0.0.1", str(port), "-c", "put", str(src),
                          "new.txt"], capture_output=True, text=True, timeout=30)
    assert put.returncode == 0, put.stdout + put.stderr
    target = daemons.root / "new.txt"
    assert target.read_bytes() == b"uploaded\n"
    assert target.stat().st_mode & 0o777 == 0o644    # python-daemon's default umask 0 would give 0666
    os.kill(read_pid(pidfile), signal.SIGTERM)


def test_second_instance_on_same_pidfile_is_refused(daemons: Daemons, tmp_path: Path) -> None:
    pidfile, log = tmp_path / "tftpd.pid", tmp_path / "tftpd.log"
    first = daemons.run(free_port(), pidfile=pidfile, log=log)
    assert first.returncode == 0, first.stderr
    pid = read_pid(pidfile)
    second = daemons.run(free_port(), pidfile=pidfile, log=tmp_path / "second.log")
    assert second.returncode == 1
    assert f"already running as process {pid}" in second.stderr
    assert str(pidfile) in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert read_pid(pidfile) == pid and alive(pid)
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 10)


@pytest.mark.parametrize("content", ["dead", "garbage"])
def test_stale_pidfile_is_replaced(daemons: Daemons, tmp_path: Path, content: str) -> None:
    pidfile, log = tmp_path / "tftpd.pid", tmp_path / "tftpd.log"
    if content == "dead":
        gone = subprocess.Popen(["true"])
        gone.wait()
        pidfile.write_text(f"{gone.pid}\n")
        why = f"process {gone.pid} is not running"
    else:
        pidfile.write_text("not a pid\n")
        old = time.time() - 3600
        os.utime(pidfile, (old, old))
        why = "it holds no process ID"
    port = free_port()
    proc = daemons.run(port, pidfile=pidfile, log=log)
    assert proc.returncode == 0, proc.stderr
    assert f"removed stale PID file {pidfile} ({why})" in proc.stderr
    pid = read_pid(pidfile)
    assert alive(pid)
    assert fetch(("127.0.0.1", port), "small.txt") == b"small file\n"
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 10)
    assert not pidfile.exists()


def test_pidfile_of_a_live_other_program_is_stale(daemons: Daemons, tmp_path: Path) -> None:
    """A PID reused by another program (after a reboot) does not block the start."""
    pidfile, log = tmp_path / "tftpd.pid", tmp_path / "tftpd.log"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pidfile.write_text(f"{sleeper.pid}\n")
        proc = daemons.run(free_port(), pidfile=pidfile, log=log)
        assert proc.returncode == 0, proc.stderr
        assert f"process {sleeper.pid} is not tftpd" in proc.stderr
        os.kill(read_pid(pidfile), signal.SIGTERM)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_busy_port_is_reported_before_detaching(daemons: Daemons, tmp_path: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        pidfile = tmp_path / "tftpd.pid"
        proc = daemons.run(port, pidfile=pidfile, log=tmp_path / "tftpd.log")
    finally:
        holder.close()
    assert proc.returncode == 1
    assert f"cannot bind 127.0.0.1 port {port}: Address already in use" in proc.stderr
    assert not pidfile.exists()


def test_unusable_pidfile_directory_is_reported(daemons: Daemons, tmp_path: Path) -> None:
    pidfile = tmp_path / "missing" / "tftpd.pid"
    proc = daemons.run(free_port(), pidfile=pidfile, log=tmp_path / "tftpd.log")
    assert proc.returncode == 1
    assert "--pidfile: directory" in proc.stderr and "does not exist" in proc.stderr


def test_sigterm_lets_a_slow_transfer_finish_then_removes_pidfile(daemons: Daemons,
                                                                  tmp_path: Path) -> None:
    port, pidfile, log = free_port(), tmp_path / "tftpd.pid", tmp_path / "tftpd.log"
    proc = daemons.run(port, pidfile=pidfile, log=log)
    assert proc.returncode == 0, proc.stderr
    pid = read_pid(pidfile)
    result: List[object] = []

    def slow() -> None:                 # 21 blocks, 0.1 s before each ACK: ~2 s
        try:
            result.append(fetch(("127.0.0.1", port), "big.bin", ack_delay=0.1))
        except TftpFailure as e:
            result.append(e)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)                      # the transfer is under way
    os.kill(pid, signal.SIGTERM)
    wait_log(log, "stopping: waiting up to")
    assert alive(pid) and pidfile.exists()
    # no new requests are taken while the transfer finishes
    wait_until_no_process_takes_requests(port)
    with pytest.raises(TftpFailure):
        fetch(("127.0.0.1", port), "small.txt", timeout=0.3, retries=1)
    t.join(20)
    assert result == [BIG]
    assert wait_gone(pid, 10)
    assert not pidfile.exists()
    text = log.read_text()
    assert "RRQ from 127.0.0.1:" in text and "big.bin: sent 10240 bytes" in text
    assert "daemon stopped: PID file" in text


def test_second_sigterm_ends_transfers_at_once(daemons: Daemons, tmp_path: Path) -> None:
    port, pidfile, log = free_port(), tmp_path / "tftpd.pid", tmp_path / "tftpd.log"
    proc = daemons.run(port, pidfile=pidfile, log=log)
    assert proc.returncode == 0, proc.stderr
    pid = read_pid(pidfile)
    result: List[object] = []

    def slow() -> None:                  # would take ~10 s
        try:
            result.append(fetch(("127.0.0.1", port), "big.bin", ack_delay=0.5))
        except TftpFailure as e:
            result.append(e)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.7)
    os.kill(pid, signal.SIGTERM)
    wait_log(log, "stopping: waiting up to")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 5)
    assert time.monotonic() - t0 < 4
    t.join(20)
    assert len(result) == 1 and isinstance(result[0], TftpFailure)
    assert not pidfile.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
def test_pid_lock_taken_as_root_then_privileges_dropped(tmp_path: Path) -> None:
    """The PID file is created as root; the daemon then serves as nobody.  The
    directory is not writable by nobody, so the file stays behind at exit
    (with a warning) and the next start replaces it as stale."""
    import pwd
    import shutil
    import tempfile
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="tftpd-daemon-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        root = base / "root"
        root.mkdir()
        os.chmod(root, 0o755)
        (root / "f.txt").write_bytes(b"as nobody\n")
        os.chmod(root / "f.txt", 0o644)
        pidfile, log = base / "tftpd.pid", base / "tftpd.log"

        def start(port: int) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "tftpd", "-p", str(port), "--address", "127.0.0.1",
                 "--root", str(root), "--access-file", str(base / "none.ctl"),
                 "--user", "nobody", "--daemon", "--pidfile", str(pidfile),
                 "--log-file", str(log)],
                cwd=str(ROOT), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=30)

        port = free_port()
        proc = start(port)
        assert proc.returncode == 0, proc.stderr
        pid = read_pid(pidfile)
        try:
            assert pidfile.stat().st_uid == 0
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
            assert uids == [str(nobody.pw_uid)] * 4
            groups = next(ln for ln in status.splitlines() if ln.startswith("Groups:"))
            assert groups.split()[1:] in ([], [str(nobody.pw_gid)])
            assert fetch(("127.0.0.1", port), "f.txt") == b"as nobody\n"
        finally:
            os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid, 10)
        assert pidfile.exists()
        assert "cannot remove PID file" in wait_log(log, "cannot remove PID file")
        again = start(free_port())
        assert again.returncode == 0, again.stderr
        assert f"process {pid} is not running" in again.stderr
        pid2 = read_pid(pidfile)
        os.kill(pid2, signal.SIGTERM)
        assert wait_gone(pid2, 10)
    finally:
        shutil.rmtree(base, ignore_errors=True)
