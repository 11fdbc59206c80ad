"""Logging (-v, -i, -s, --log-file, syslog) and signals (SIGUSR1/SIGUSR2,
SIGHUP, SIGTERM/SIGINT graceful then forced, the bounded grace)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import List

import pytest

from conftest import need
from scripted_client import TftpFailure, fetch, request
from test_processes import children, logged_pids
from test_server import wait_until_no_process_takes_requests

BIG = bytes(range(256)) * 40          # 10240 bytes: 21 blocks of 512, 10 of 1024


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "big.bin").write_bytes(BIG)
    (r / "huge.bin").write_bytes(BIG * 4)   # 81 blocks: a connected transfer socket
    (r / "small.txt").write_bytes(b"small\n")
    return r


def wait_lines(lines: List[str], pattern: str, timeout: float = 10.0) -> str:
    rx = re.compile(pattern)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in list(lines):
            if rx.search(line):
                return line
        time.sleep(0.02)
    raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(lines))


# -- -v ------------------------------------------------------------------------

def test_verbose_line_has_client_direction_file_bytes_seconds_options(tftpd_server, root) -> None:
    atftp = need("atftp")
    srv = tftpd_server("-v", "-n", root=root)
    out = root.parent / "got.bin"
    proc = subprocess.run([atftp, "--option", "blksize 1024", "--option", "tsize 0", "-g",
                           "-r", "big.bin", "-l", str(out), "127.0.0.1", str(srv.port)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    line = srv.wait_for_log(r"RRQ from ")
    m = re.search(r"tftpd\[\d+\]: RRQ from 127\.0\.0\.1:(\d+) big\.bin: sent 10240 bytes in "
                  r"(\d+\.\d{3}) s \(mode=octet blksize=1024 windowsize=1 tsize=10240; "
                  r"negotiated: (blksize tsize|tsize blksize)\)$", line)
    assert m, line
    assert float(m.group(2)) < 10
    # plain request: the options in force are still named
    assert fetch(srv.addr, "small.txt", mode="netascii") == b"small\r\n"
    line = srv.wait_for_log(r"RRQ from .* small\.txt")
    assert line.endswith("small.txt: sent 7 bytes in " + line.split(" in ")[1])
    assert "(mode=netascii blksize=512 windowsize=1)" in line
    # an upload
    src = root.parent / "up.bin"
    src.write_bytes(BIG[:1500])
    put = subprocess.run([atftp, "-p", "-l", str(src), "-r", "up.bin", "127.0.0.1",
                          str(srv.port)], capture_output=True, text=True, timeout=30)
    assert put.returncode == 0, put.stderr
    line = srv.wait_for_log(r"WRQ from ")
    assert re.search(r"WRQ from 127\.0\.0\.1:\d+ up\.bin: received 1500 bytes in \d+\.\d{3} s "
                     r"\(mode=octet blksize=512 windowsize=1\)$", line), line


def test_no_line_per_packet_without_s(tftpd_server, root) -> None:
    srv = tftpd_server("-v", root=root)
    assert fetch(srv.addr, "big.bin") == BIG         # 21 DATA, 21 ACK
    srv.wait_for_log(r"RRQ from ")
    time.sleep(0.2)
    after_start = [ln for ln in srv.lines if "RRQ" in ln or "trace" in ln or "DATA" in ln]
    assert len(after_start) == 1, srv.log()


def test_without_v_successful_transfers_are_not_logged(tftpd_server, root) -> None:
    srv = tftpd_server(root=root)
    assert fetch(srv.addr, "small.txt") == b"small\n"
    time.sleep(0.3)
    assert not any("RRQ" in ln for ln in srv.lines), srv.log()


# -- -i ------------------------------------------------------------------------

@pytest.mark.parametrize("with_i", [True, False])
def test_i_puts_the_client_address_in_error_lines(tftpd_server, root, with_i: bool) -> None:
    srv = tftpd_server(*(["-i"] if with_i else []), root=root)
    clients = []

    def client() -> socket.socket:
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind(("127.0.0.1", 0))
        c.settimeout(5)
        clients.append(c)
        return c

    try:
        a, b, c = client(), client(), client()
        a.sendto(request(1, "missing.txt"), srv.addr)          # file not found
        assert a.recvfrom(600)[0][:4] == b"\0\5\0\1"
        b.sendto(request(2, "new.txt"), srv.addr)              # WRQ without -n
        assert b.recvfrom(600)[0][:4] == b"\0\5\0\2"
        c.sendto(request(1, "small.txt"), srv.addr)            # a transfer the client abandons
        data, tid = c.recvfrom(600)
        assert data[:4] == b"\0\3\0\1"
        c.sendto(b"\0\5\0\0client gave up\0", tid)
        lines = [(srv.wait_for_log(r"RRQ missing\.txt refused: File not found"), a),
                 (srv.wait_for_log(r"WRQ new\.txt refused: Access violation"), b),
                 (srv.wait_for_log(r"RRQ small\.txt ended by client: .*client gave up"), c)]
        for line, sock in lines:
            me = f"127.0.0.1:{sock.getsockname()[1]}"
            assert (f": {me} " in line) == with_i, line
            assert ("127.0.0.1" in line) == with_i, line
    finally:
        for sock in clients:
            sock.close()


# -- -s and SIGUSR1/SIGUSR2 ----------------------------------------------------

def traces(lines: List[str]) -> List[str]:
    return [ln for ln in lines if " trace " in ln]


def test_s_traces_every_packet(tftpd_server, root) -> None:
    srv = tftpd_server("-s", root=root)
    assert fetch(srv.addr, "big.bin", options={"blksize": "1024"}) == BIG
    with pytest.raises(TftpFailure):
        fetch(srv.addr, "missing.txt")
    time.sleep(0.3)
    t = "\n".join(traces(srv.lines))
    assert re.search(r"trace 127\.0\.0\.1:\d+ < RRQ big\.bin octet blksize 1024", t), t
    assert re.search(r"> OACK blksize=1024", t)
    assert re.search(r"< ACK 0$", t, re.M)
    for block in range(1, 12):
        assert re.search(rf"> DATA {block} \({1024 if block <= 10 else 0} bytes\)", t), block
        assert re.search(rf"< ACK {block}$", t, re.M), block
    assert re.search(r"> ERROR 1 File not found", t)


def test_sigusr1_sigusr2_toggle_socket_debugging(tftpd_server, root) -> None:
    srv = tftpd_server(root=root)
    assert fetch(srv.addr, "small.txt") == b"small\n"
    time.sleep(0.2)
    assert not traces(srv.lines)
    every = {srv.proc.pid, *children(srv.proc.pid)}   # the signals are passed on to each
    srv.proc.send_signal(signal.SIGUSR1)
    assert logged_pids(srv, r"socket debugging on", len(every)) == every
    assert fetch(srv.addr, "small.txt") == b"small\n"
    wait_lines(srv.lines, r"trace .* < ACK 1$")
    srv.proc.send_signal(signal.SIGUSR2)
    assert logged_pids(srv, r"socket debugging off", len(every)) == every
    before = len(traces(srv.lines))
    assert fetch(srv.addr, "big.bin") == BIG
    time.sleep(0.3)
    assert len(traces(srv.lines)) == before, srv.log()


# -- SIGHUP: logs reopened -----------------------------------------------------

def test_sighup_reopens_the_log_file(tftpd_server, root, tmp_path: Path) -> None:
    log = tmp_path / "tftpd.log"
    srv = tftpd_server("-v", "--log-file", str(log), root=root)
    assert fetch(srv.addr, "small.txt") == b"small\n"
    srv.wait_for_log(r"RRQ from ")
    rotated = tmp_path / "tftpd.log.1"
    log.rename(rotated)                              # what logrotate does
    srv.proc.send_signal(signal.SIGHUP)
    every = {srv.proc.pid, *children(srv.proc.pid)}   # each serving process reopens its own log
    assert logged_pids(srv, r"SIGHUP: logs reopened", len(every)) == every
    assert fetch(srv.addr, "big.bin") == BIG
    srv.wait_for_log(r"RRQ from .* big\.bin")
    time.sleep(0.1)
    old, new = rotated.read_text(), log.read_text()
    assert "small.txt" in old and "big.bin" not in old
    assert "SIGHUP: logs reopened" in new and "big.bin: sent 10240 bytes" in new


def test_log_file_that_cannot_be_opened_is_an_error(tmp_path: Path, root) -> None:
    import sys
    from conftest import ROOT
    proc = subprocess.run([sys.executable, "-m", "tftpd", "-p", "0", "--address", "127.0.0.1",
                           "--root", str(root), "--log-file", str(tmp_path / "no" / "x.log")],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "--log-file: cannot open" in proc.stderr


# -- SIGTERM / SIGINT ----------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_taking_requests_and_lets_transfers_finish(tftpd_server, root, sig) -> None:
    srv = tftpd_server("-v", root=root)
    result: List[object] = []

    def slow() -> None:
        try:
            result.append(fetch(srv.addr, "big.bin", ack_delay=0.08))
        except TftpFailure as e:
            result.append(e)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.4)
    srv.proc.send_signal(sig)
    srv.wait_for_log(r"stopping: waiting up to 60 s for 1 transfer")
    wait_until_no_process_takes_requests(srv.port)
    with pytest.raises(TftpFailure):
        fetch(srv.addr, "small.txt", timeout=0.3, retries=1)
    t.join(20)
    assert result == [BIG]
    assert srv.proc.wait(10) == 0
    assert any("big.bin: sent 10240 bytes" in ln for ln in srv.lines)


@pytest.mark.parametrize("name", ["big.bin", "huge.bin"])
def test_second_signal_ends_transfers_at_once(tftpd_server, root, name: str) -> None:
    srv = tftpd_server(root=root)
    result: List[object] = []

    def slow() -> None:
        try:
            result.append(fetch(srv.addr, name, ack_delay=0.5))
        except TftpFailure as e:
            result.append(e)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.7)
    srv.proc.send_signal(signal.SIGTERM)
    srv.wait_for_log(r"stopping: waiting")
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(5) == 0
    assert time.monotonic() - t0 < 3
    t.join(10)
    assert len(result) == 1 and isinstance(result[0], TftpFailure)
    assert "shutting down" in str(result[0])


def test_grace_period_is_bounded(monkeypatch, root, tmp_path: Path) -> None:
    """In process, with the grace shortened: a transfer that outlasts it is ended."""
    from tftpd import server as server_mod
    from tftpd.access import AccessTable
    from tftpd.config import Config
    monkeypatch.setattr(server_mod, "STOP_GRACE", 0.5)
    config = Config(root=str(root), access_file=str(tmp_path / "none.ctl"))
    sock = server_mod.bind_standalone(0, "127.0.0.1")
    port = sock.getsockname()[1]
    srv = server_mod.Server(config, [sock], AccessTable(config.access_file, [str(root)]))
    done: List[int] = []
    runner = threading.Thread(target=lambda: done.append(srv.serve()))
    runner.start()
    result: List[object] = []

    def slow() -> None:
        try:
            result.append(fetch(("127.0.0.1", port), "big.bin", ack_delay=0.4))
        except TftpFailure as e:
            result.append(e)

    client = threading.Thread(target=slow)
    client.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    srv.stop()
    runner.join(10)
    assert done == [0]
    assert 0.4 <= time.monotonic() - t0 < 3
    client.join(10)
    assert len(result) == 1 and isinstance(result[0], TftpFailure)


# -- syslog --------------------------------------------------------------------

def test_syslog_handler_sends_daemon_facility_and_reconnects(tmp_path: Path) -> None:
    from tftpd.log import DEBUG, Formatter, SyslogHandler, getLogger
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    handler = SyslogHandler(path)
    handler.setFormatter(Formatter("tftpd[%(process)d]: %(message)s"))
    logger = getLogger("tftpd-test-syslog")
    logger.setLevel(DEBUG)
    logger.addHandler(handler)
    try:
        logger.warning("RRQ x refused")
        assert re.fullmatch(rb"<28>tftpd\[\d+\]: RRQ x refused", server.recv(1000))
        logger.info("RRQ from 127.0.0.1:1 x: sent 1 bytes")
        assert server.recv(1000).startswith(b"<30>tftpd[")
        server.close()                               # syslogd restarts
        Path(path).unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(path)
        server.settimeout(5)
        logger.error("after restart")
        assert server.recv(1000).endswith(b": after restart")
    finally:
        logger.removeHandler(handler)
        handler.close()
        server.close()
