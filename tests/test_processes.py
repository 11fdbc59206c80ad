"""--processes: standalone serving processes (tftpd/spread.py).

The main process forks the others after the privilege drop and alone reads
the request socket: it serves a request itself while it has no more in hand
than the least busy other process, else passes it to that one; a retransmitted
request goes where the first went (and is recognised there).  Signals reach
every process; a kill -9 of the main one takes the others down
(PR_SET_PDEATHSIG); one that dies leaves its share to the others.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from conftest import ServerProcess
from tftpclient import DATA, OACK, Peer, ack, rrq
from test_privileges import Tree, assert_is_nobody, as_root, get, tree  # noqa: F401
from test_server import _finish_download, udp_sockets_on

BODY = bytes(range(256)) * 64          # 16 KiB: 33 blocks of 512


def children(pid: int) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def gone(pids: List[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            return True
        time.sleep(0.05)
    return False


def logged_pids(server: ServerProcess, pattern: str, want: int, timeout: float = 10) -> set:
    """The PIDs of the processes that logged a line matching ``pattern``,
    once ``want`` of them have (or the timeout is over)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {int(p) for p in re.findall(r"tftpd\[(\d+)\]: " + pattern, server.log())}
        if len(pids) >= want or time.monotonic() >= deadline:
            return pids
        time.sleep(0.05)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "f.bin").write_bytes(BODY)
    return r


def fetch_from_many_ports(server: ServerProcess, count: int) -> None:
    for _ in range(count):
        with Peer(server.addr) as peer:
            res = peer.download("f.bin")
        assert res.error is None and res.data == BODY


def served_by(server: ServerProcess, count: int, timeout: float = 10,
              name: str = "f.bin") -> List[int]:
    """The PIDs in the first ``count`` "sent" lines of ``name`` (-v), in order."""
    deadline = time.monotonic() + timeout
    pattern = r"tftpd\[(\d+)\]: RRQ from \S+ " + re.escape(name) + ": sent"
    while True:
        pids = [int(p) for p in re.findall(pattern, server.log())]
        if len(pids) >= count or time.monotonic() >= deadline:
            return pids[:count]
        time.sleep(0.05)


def hold(server: ServerProcess, count: int) -> List[Tuple[Peer, Any]]:
    """``count`` downloads, one after the other, each left waiting for the
    ACK of its OACK (timeout 5: no retransmission meanwhile) and so in hand
    in the process serving it."""
    held = []
    for _ in range(count):
        peer = Peer(server.addr)
        peer.send(rrq("f.bin", options={"timeout": "5"}))
        _, tid = peer.expect(op=OACK)
        held.append((peer, tid))
    return held


def finish(held: List[Tuple[Peer, Any]]) -> None:
    for peer, tid in held:
        assert _finish_download(peer, tid) == BODY
        peer.close()


def test_one_client_after_another_is_served_by_the_main_process(
        tftpd_server, root: Path) -> None:
    """A quiet server serves each small download in the main process (no
    hand-over, its caches warm; with SO_REUSEPORT each new client port went
    to any)."""
    (root / "s.bin").write_bytes(BODY[:1000])
    server = tftpd_server("--processes", "3", "-v", root=root)
    line = server.wait_for_log(r"listening on")
    assert "3 processes" in line
    kids = children(server.proc.pid)
    assert len(kids) == 2
    assert udp_sockets_on(server.port, socket.AF_INET) == ["unconnected"]   # the main one's
    for _ in range(20):
        with Peer(server.addr) as peer:
            assert peer.download("s.bin").data == BODY[:1000]
    assert served_by(server, 20, name="s.bin") == [server.proc.pid] * 20
    assert server.stop() == 0
    assert gone(kids, 10)


def test_back_to_back_downloads_stay_in_the_main_process(tftpd_server, root: Path) -> None:
    """A client that sends its next request right behind the final ACK (as
    a C client does, and a boot loader fetching file after file) finds the
    main process with that transfer sent but for the ACK: it is not counted
    as in hand, so the next one is served there too, not in a process with
    cold caches and without the file's mapping."""
    server = tftpd_server("--processes", "3", "-v", root=root)
    peer = Peer(server.addr)
    peer.send(rrq("f.bin"))
    for i in range(12):
        got = bytearray()
        for block in range(1, 100):
            pkt, tid = peer.expect(op=DATA)
            assert pkt.block == block
            got += pkt.payload
            if len(pkt.payload) < 512:
                break
            peer.send(ack(block), tid)
        assert got == BODY
        following = Peer(server.addr)
        peer.send(ack(block), tid)
        if i < 11:
            following.send(rrq("f.bin"))      # right behind the final ACK
        peer.close()
        peer = following
    peer.close()
    assert served_by(server, 12) == [server.proc.pid] * 12
    assert server.stop() == 0


def test_requests_in_hand_spread_evenly_over_the_processes(tftpd_server, root: Path) -> None:
    """Each new request goes to the process with the fewest in hand (the
    main one on a tie): nine held downloads are three in each of three."""
    server = tftpd_server("--processes", "3", "-v", root=root)
    kids = children(server.proc.pid)
    held = hold(server, 9)
    assert len({tid for _, tid in held}) == 9
    finish(held)
    assert Counter(served_by(server, 9)) == {server.proc.pid: 3, kids[0]: 3, kids[1]: 3}
    assert server.stop() == 0


def test_a_process_that_died_leaves_its_share_to_the_others(tftpd_server, root: Path) -> None:
    server = tftpd_server("--processes", "2", "-v", root=root)
    kids = children(server.proc.pid)
    assert len(kids) == 1
    os.kill(kids[0], signal.SIGKILL)
    assert gone_or_zombie(kids[0], 5)
    held = hold(server, 1)                 # the main process has one in hand: the next
    fetch_from_many_ports(server, 2)       # would go to the other, which is gone
    finish(held)
    assert served_by(server, 3) == [server.proc.pid] * 3
    server.wait_for_log(rf"serving process {kids[0]} is gone")
    assert server.stop() == 1               # it ended with a signal: reported at the end
    assert f"serving process {kids[0]} ended with status -9" in server.log()


def gone_or_zombie(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_signals_reach_every_process(tftpd_server, root: Path) -> None:
    server = tftpd_server("--processes", "3", root=root)
    kids = children(server.proc.pid)
    server.proc.send_signal(signal.SIGHUP)
    assert logged_pids(server, r"SIGHUP: logs reopened", 3) == {server.proc.pid, *kids}
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert gone(kids, 5)


def test_kill_9_of_the_main_process_ends_the_others(tftpd_server, root: Path) -> None:
    server = tftpd_server("--processes", "2", root=root)
    kids = children(server.proc.pid)
    assert len(kids) == 1
    server.proc.kill()
    server.proc.wait(5)
    assert gone(kids, 10), "a serving process outlived the main one"
    for kid in kids:          # reap nothing: they were the main process's children
        assert not os.path.exists(f"/proc/{kid}")


def test_a_retransmitted_request_is_one_transfer_with_several_processes(
        tftpd_server, root: Path) -> None:
    server = tftpd_server("--processes", "4", "-v", root=root)
    kids = children(server.proc.pid)
    held = hold(server, 1)               # the main process is busier: the next go to the others
    for _ in range(8):
        with Peer(server.addr) as peer:
            request = rrq("f.bin", options={"timeout": "5"})
            for _ in range(4):
                peer.send(request)
            _, tid = peer.expect(op=OACK)
            assert peer.listen(0.3) == [], "a second transfer answered"
            assert _finish_download(peer, tid) == BODY
    finish(held)
    pids = served_by(server, 9)
    assert pids.count(server.proc.pid) == 1 and set(pids) - {server.proc.pid} <= set(kids)


def test_one_process_means_one(tftpd_server, root: Path) -> None:
    server = tftpd_server("--processes", "1", root=root)
    assert children(server.proc.pid) == []
    assert "processes" not in server.wait_for_log(r"listening on")
    fetch_from_many_ports(server, 3)


@as_root
def test_every_process_runs_as_nobody(tftpd_server, tree: Tree, tmp_path: Path) -> None:  # noqa: F811
    server = tftpd_server("--user", "nobody", "--processes", "3", "--access-file",
                          str(tree.ctl), root=tree.root)
    kids = children(server.proc.pid)
    assert len(kids) == 2
    for i in range(3):
        ok, said = get(server, "pub.txt", tmp_path / f"pub{i}")
        assert ok, said
    for pid in [server.proc.pid, *kids]:
        assert_is_nobody(pid)
    assert "failed" not in server.log()
    assert children(server.proc.pid) == kids, "a serving process died"


@pytest.mark.parametrize("cpus, want", [(1, 4), (2, 8), (3, 12), (4, 16), (64, 16)])
def test_default_processes_is_four_per_cpu_at_most_16(cpus: int, want: int) -> None:
    from unittest import mock

    from tftpd import main
    with mock.patch.object(main.os, "sched_getaffinity", return_value=set(range(cpus))):
        assert main.default_processes() == want


def test_default_processes_serve_without_the_flag(tftpd_server, root: Path) -> None:
    from tftpd import main
    server = tftpd_server(root=root)
    want = main.default_processes()
    assert f"{want} processes" in server.wait_for_log(r"listening on")
    assert len(children(server.proc.pid)) == want - 1
    fetch_from_many_ports(server, 3)
    assert server.stop() == 0


def test_a_second_server_on_the_port_refuses_to_start(tftpd_server, root: Path) -> None:
    """A second tftpd on the port (several processes or not) must fail to
    bind, as any server on a busy port does, and the first keeps serving
    (SO_REUSEPORT, which tftpd once used for --processes, would have let it
    share the port and the requests without a word)."""
    from test_cli import hermetic, tftpd
    server = tftpd_server(root=root)
    assert len(children(server.proc.pid)) >= 1          # several processes
    r = tftpd("-p", str(server.port), "--address", server.addr[0], "--root", str(root),
              *hermetic(root.parent))
    assert r.returncode == 1, r.stderr
    assert f"cannot bind {server.addr[0]} port {server.port}: Address already in use" in r.stderr
    fetch_from_many_ports(server, 3)
    assert server.stop() == 0
