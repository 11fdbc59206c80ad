"""Integration tests: the real server process on 127.0.0.1 and ::1, driven by a
scripted peer (tests/tftpclient.py) over real UDP sockets.

Every wait is bounded.  Packets go only to 127.0.0.1 and ::1.  Where a test
counts packets, the client asks for a fixed ``timeout`` so that no timer
retransmission can blur the count on a loaded machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from conftest import ServerProcess, launch, start_server
from tftpclient import (ACK, DATA, ERROR, OACK, Peer, ack, data, error,
                        rrq, wrq)

HOSTS = ["127.0.0.1", "::1"]
FAMILY_IDS = ["v4", "v6"]
SIZES = [0, 511, 512, 513]
BIG = 40 * 1024 * 1024            # 81920 blocks of 512: the block number wraps


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ from block to block."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


def put(root: Path, name: str, content: bytes, mode: int = 0o644) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(mode)
    return path


def temp_files(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tftpd-"))


def wait_until(check, timeout: float = 10.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(step)
    return check()


def udp_local_address(port: int) -> Optional[str]:
    """The local address a UDP socket of this machine on ``port`` is bound to."""
    for table, family in (("/proc/net/udp", socket.AF_INET), ("/proc/net/udp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local = line.split()[1]
            hexaddr, hexport = local.split(":")
            if int(hexport, 16) != port:
                continue
            raw = bytes.fromhex(hexaddr)
            # each 32-bit word is in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            return socket.inet_ntop(family, raw)
    return None


def hermetic(base: Path) -> List[str]:
    """As the conftest fixture does: no host access file; stay root (tmp dirs are 0700)."""
    return ["--access-file", str(base / "no-tftpaccess.ctl"), "--user", "root"]


@pytest.fixture(params=HOSTS, ids=FAMILY_IDS)
def host(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=HOSTS, ids=FAMILY_IDS)
def shared(request, tmp_path_factory):
    """One server per address family for tests that do not change its state:
    ``-n -v`` with a read root full of test files and a separate upload dir."""
    base = tmp_path_factory.mktemp("shared")
    root = base / "root"
    root.mkdir()
    upload = base / "upload"
    upload.mkdir()
    for size in SIZES + [5000, 40000]:
        put(root, f"f{size}.bin", payload(size, size))
    put(root, "secret.bin", b"private\n", 0o600)
    (root / "dir").mkdir()
    put(root, "sub/dir/deep.txt", b"deep\n")
    put(base, "outside.txt", b"outside the root\n")
    os.symlink(base / "outside.txt", root / "escape.txt")
    server = start_server(["-n", "-v", "-d", str(upload)] + hermetic(base), root, request.param)
    server.upload = upload  # type: ignore[attr-defined]
    yield server
    server.stop()


# -- plain transfers -----------------------------------------------------------
@pytest.mark.parametrize("size", SIZES + [5000])
def test_rrq_sizes(shared: ServerProcess, size: int) -> None:
    expected = (shared.root / f"f{size}.bin").read_bytes()
    with Peer(shared.addr) as peer:
        res = peer.download(f"f{size}.bin")
    assert res.error is None
    assert sha(res.data) == sha(expected)
    assert res.data_packets == size // 512 + 1   # a 512-byte file ends with an empty DATA
    assert res.oack is None
    # each transfer on its own socket, from the address the request was sent to
    assert res.tid[0] == shared.host and res.tid[1] != shared.port


def test_wildcard_server_answers_each_request_from_its_address(tmp_path: Path) -> None:
    """Bound to the wildcard (dual-stack), the server answers each request
    from the address it was sent to, also when one client after another
    changes address and family."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.bin").write_bytes(b"a" * 100)
    server = launch(["-p", "0", "--root", str(root)] + hermetic(tmp_path), root)
    try:
        for dest in ["127.0.0.1", "127.0.0.2", "127.0.0.2", "::1", "127.0.0.1", "::1",
                     "127.0.0.3", "127.0.0.1"]:
            with Peer((dest, server.port)) as peer:
                res = peer.download("a.bin")
            assert res.error is None and res.data == b"a" * 100
            assert res.tid[0] == dest and res.tid[1] != server.port
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("size", SIZES + [5000])
def test_wrq_sizes(shared: ServerProcess, size: int) -> None:
    content = payload(size, 1000 + size)
    name = f"up{size}.bin"
    with Peer(shared.addr) as peer:
        res = peer.upload(name, content)
    assert res.error is None
    assert res.tid[0] == shared.host and res.tid[1] != shared.port
    target = shared.upload / name
    # the file is renamed into place before the last ACK is sent
    assert target.exists()
    assert file_sha(target) == sha(content)
    assert temp_files(shared.upload) == []
    sent = [e for e in peer.events if e.direction == "send" and e.op == DATA]
    assert len(sent) == size // 512 + 1


def test_rrq_subdirectory_and_absolute_name(shared: ServerProcess) -> None:
    with Peer(shared.addr) as peer:
        res = peer.download("sub/dir/deep.txt")
    assert res.error is None and res.data == b"deep\n"
    with Peer(shared.addr) as peer:
        res = peer.download(str(shared.root / "sub" / "dir" / "deep.txt"))
    assert res.error is None and res.data == b"deep\n"


def test_options_acknowledged(shared: ServerProcess) -> None:
    content = (shared.root / "f5000.bin").read_bytes()
    with Peer(shared.addr) as peer:
        res = peer.download("f5000.bin", options={"BlkSize": "1024", "tsize": "0",
                                                  "timeout": "3", "windowsize": "4"})
    assert res.error is None
    assert res.oack == {"blksize": "1024", "tsize": str(len(content)),
                        "timeout": "3", "windowsize": "4"}
    assert sha(res.data) == sha(content)
    assert res.data_packets == 5


def test_netascii_rrq_and_tsize(shared: ServerProcess) -> None:
    text = b"line one\nline two\r\nbare\rcr\n"
    put(shared.root, "text.txt", text)
    wire = text.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    with Peer(shared.addr) as peer:
        res = peer.download("text.txt", mode="NetASCII", options={"tsize": "0"})
    assert res.error is None
    assert res.data == wire
    assert res.oack == {"tsize": str(len(wire))}


def test_netascii_wrq(shared: ServerProcess) -> None:
    text = b"a\nb\r\nc\rd\n" * 200
    wire = text.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    with Peer(shared.addr) as peer:
        res = peer.upload("text-up.txt", wire, mode="netascii")
    assert res.error is None
    assert (shared.upload / "text-up.txt").read_bytes() == text


# -- errors ----------------------------------------------------------------------
def _refused(server: ServerProcess, packet: bytes) -> List:
    """Send one request; return every packet that answers it within 0.4 s."""
    with Peer(server.addr) as peer:
        peer.send(packet)
        first = peer.recv(5.0)
        assert first is not None, "no answer to a refused request"
        rest = peer.listen(0.3)
    return [first] + rest


ERROR_CASES = [
    ("missing", rrq("no-such-file.bin"), 1),
    ("missing-dir", rrq("no/such/dir.bin"), 1),
    ("dotdot", rrq("../outside.txt"), 2),
    ("dotdot-deep", rrq("sub/../../outside.txt"), 2),
    ("absolute-outside", rrq("/etc/passwd"), 2),
    ("symlink-out", rrq("escape.txt"), 2),
    ("mode-0600", rrq("secret.bin"), 2),
    ("directory", rrq("dir"), 2),
    ("directory-slash", rrq("dir/"), 2),
    ("rrq-mail", rrq("f511.bin", "mail"), 4),
    ("rrq-bogus-mode", rrq("f511.bin", "binary"), 4),
    ("wrq-mail", wrq("new.bin", "mail"), 4),
    ("wrq-outside", wrq("../escaped.bin"), 2),
    ("wrq-absolute-outside", wrq("/tmp/tftpd-escaped.bin"), 2),
    ("wrq-tsize-too-big", wrq("huge.bin", options={"tsize": str(10 ** 15)}), 3),
]


def test_refused_requests_get_exactly_one_error(shared: ServerProcess) -> None:
    """Every refusal path at once, one client each: one ERROR with the right code."""
    peers = {case: Peer(shared.addr) for case, _, _ in ERROR_CASES}
    try:
        for case, packet, _ in ERROR_CASES:
            peers[case].send(packet)
        answers = {}
        for case, _, _ in ERROR_CASES:
            first = peers[case].recv(5.0)
            answers[case] = [first] if first else []
        time.sleep(0.5)                  # room for a (wrong) second answer
        for case, _, _ in ERROR_CASES:
            answers[case] += peers[case].listen(0.05)
    finally:
        for peer in peers.values():
            peer.close()
    wrong = {}
    for case, _, code in ERROR_CASES:
        got = [(p.op, p.code) for p, _ in answers[case]]
        if got != [(ERROR, code)]:
            wrong[case] = got
    assert wrong == {}, f"expected one ERROR each; got {wrong}"
    for case, _, _ in ERROR_CASES:
        pkt, addr = answers[case][0]
        assert addr[0] == shared.host
        # never reveal paths the client did not ask for
        assert str(shared.root.parent) not in pkt.message, (case, pkt.message)
    assert not (shared.upload.parent / "escaped.bin").exists()
    assert not (shared.root.parent / "escaped.bin").exists()
    assert not Path("/tmp/tftpd-escaped.bin").exists()
    assert not (shared.upload / "huge.bin").exists()
    assert not (shared.upload / "new.bin").exists()
    assert temp_files(shared.upload) == []


def test_wrq_without_n_is_access_violation(tftpd_server, tmp_path: Path, host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    put(root, "old.bin", b"old")
    server = tftpd_server(root=root, host=host)
    for name in ("new.bin", "old.bin"):
        answers = _refused(server, wrq(name))
        assert [(p.op, p.code) for p, _ in answers] == [(ERROR, 2)]
    assert sorted(p.name for p in root.iterdir()) == ["old.bin"]
    assert (root / "old.bin").read_bytes() == b"old"


def test_wrq_tsize_just_over_free_space(shared: ServerProcess) -> None:
    st = os.statvfs(shared.upload)
    free = st.f_bavail * st.f_frsize
    answers = _refused(shared, wrq("over.bin", options={"tsize": str(free + (1 << 30))}))
    assert [(p.op, p.code) for p, _ in answers] == [(ERROR, 3)]
    assert not (shared.upload / "over.bin").exists() and temp_files(shared.upload) == []


def test_wrq_tsize_that_fits_is_acknowledged(shared: ServerProcess) -> None:
    content = payload(3000, 7)
    with Peer(shared.addr) as peer:
        res = peer.upload("fits.bin", content, options={"tsize": str(len(content))})
    assert res.error is None and res.oack == {"tsize": "3000"}
    assert file_sha(shared.upload / "fits.bin") == sha(content)


# -- bad option values -------------------------------------------------------------
BAD_OPTIONS = [
    ("blksize", "7"), ("blksize", "65465"), ("blksize", "abc"), ("blksize", "-1"),
    ("blksize", ""), ("blksize", "1e3"), ("blksize", " 512"), ("blksize", "0x200"),
    ("blksize", "99999999999999999999999"),
    ("timeout", "0"), ("timeout", "256"), ("timeout", "abc"), ("timeout", "-5"),
    ("timeout", "1.5"),
    ("windowsize", "0"), ("windowsize", "65536"), ("windowsize", "x"),
    ("tsize", "abc"), ("tsize", "-1"),
    ("rollover", "2"),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS,
                         ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_bad_option_value_is_ignored(shared: ServerProcess, name: str, value: str) -> None:
    good = ("tsize", "0") if name != "tsize" else ("blksize", "600")
    content = (shared.root / "f5000.bin").read_bytes()
    with Peer(shared.addr) as peer:
        res = peer.download("f5000.bin", options={name: value, good[0]: good[1]})
    assert res.error is None
    expected_oack = {"tsize": "5000"} if good[0] == "tsize" else {"blksize": "600"}
    assert res.oack == expected_oack
    assert sha(res.data) == sha(content)
    sizes = {len(e.raw) - 4 for e in peer.received(DATA)}
    assert max(sizes) == (512 if good[0] == "tsize" else 600)


def test_only_bad_options_means_no_oack(shared: ServerProcess) -> None:
    with Peer(shared.addr) as peer:
        res = peer.download("f513.bin", options={"blksize": "abc", "timeout": "0",
                                                 "windowsize": "0", "x-unknown": "1"})
    assert res.error is None and res.oack is None
    assert res.data == (shared.root / "f513.bin").read_bytes()
    assert peer.received(OACK) == []


def test_blksize_capped_by_z(tftpd_server, tmp_path: Path, host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    content = put(root, "f.bin", payload(3000)).read_bytes()
    server = tftpd_server("-z", "1024", root=root, host=host)
    with Peer(server.addr) as peer:
        res = peer.download("f.bin", options={"blksize": "8192"})
    assert res.oack == {"blksize": "1024"} and res.data == content


def test_refused_option_is_ignored(tftpd_server, tmp_path: Path, host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    content = put(root, "f.bin", payload(3000)).read_bytes()
    server = tftpd_server("-r", "blksize", "-r", "tsize", root=root, host=host)
    with Peer(server.addr) as peer:
        res = peer.download("f.bin", options={"blksize": "1024", "tsize": "0",
                                              "timeout": "2"})
    assert res.error is None and res.oack == {"timeout": "2"} and res.data == content


# -- junk on the request port ---------------------------------------------------------
JUNK = [
    b"", b"\x00", b"\x01", b"\x00\x01", b"\x00\x01f", b"\x01\x02\x03",
    b"\x00\x00file\x00octet\x00",                  # opcode 0
    b"\x00\x03\x00\x01some data",                   # DATA
    b"\x00\x04\x00\x01",                            # ACK
    b"\x00\x05\x00\x01oops\x00",                    # ERROR
    b"\x00\x06blksize\x00512\x00",                  # OACK
    b"\x00\x07file\x00octet\x00",                   # opcode 7
    b"\xff\xfffile\x00octet\x00",                   # opcode 0xFFFF
    b"\x00\x01f511.bin octet",                      # RRQ without any NUL
    b"\x00\x02new.bin octet",                       # WRQ without any NUL
    b"\x00\x01f511.bin\x00octet",                   # mode not terminated
    b"\x00\x01f511.bin\x00",                        # no mode
    b"\x00\x01\x00octet\x00",                       # empty file name
    b"\x00\x01f511.bin\x00\x00",                    # empty mode
]


def test_junk_on_request_port_gets_no_reply(shared: ServerProcess) -> None:
    peers = [Peer(shared.addr) for _ in JUNK]
    try:
        for peer, junk in zip(peers, JUNK):
            peer.send(junk)
        deadline = time.monotonic() + 0.8
        for peer, junk in zip(peers, JUNK):
            got = peer.recv_raw(max(0.0, deadline - time.monotonic()))
            assert got is None, f"junk {junk!r} was answered with {got!r}"
    finally:
        for peer in peers:
            peer.close()
    # the server is alive and still serves
    with Peer(shared.addr) as peer:
        res = peer.download("f511.bin")
    assert res.error is None and len(res.data) == 511
    assert not (shared.upload / "new.bin").exists()


# -- retransmission behaviour ---------------------------------------------------------
def test_duplicate_acks_do_not_cause_duplicate_data(shared: ServerProcess) -> None:
    """Sorcerer's Apprentice: every ACK sent three times, still one DATA per block."""
    content = (shared.root / "f5000.bin").read_bytes()
    with Peer(shared.addr) as peer:
        res = peer.download("f5000.bin", options={"timeout": "10"}, ack_copies=3)
        extra = peer.listen(0.5)
    assert res.error is None and res.data == content
    assert res.timeouts == 0
    blocks = [e.block for e in peer.received(DATA)]
    assert blocks == list(range(1, 11)), blocks
    assert extra == []


def test_duplicate_ack_mid_transfer_sends_nothing(shared: ServerProcess) -> None:
    content = (shared.root / "f5000.bin").read_bytes()
    with Peer(shared.addr) as peer:
        peer.send(rrq("f5000.bin", options={"timeout": "10"}))
        oack, tid = peer.expect(op=OACK)
        peer.send(ack(0), tid)
        d1, _ = peer.expect(op=DATA)
        assert d1.block == 1
        peer.send(ack(1), tid)
        d2, _ = peer.expect(op=DATA)
        assert d2.block == 2
        for _ in range(5):
            peer.send(ack(1), tid)      # stale ACKs
            peer.send(ack(0), tid)
        assert peer.listen(0.5) == [], "a duplicate ACK caused a retransmission"
        got = bytearray(d1.payload + d2.payload)
        block = 2
        for _ in range(20):
            peer.send(ack(block), tid)
            pkt, _ = peer.expect(op=DATA)
            assert pkt.block == block + 1
            got += pkt.payload
            block += 1
            if len(pkt.payload) < 512:
                peer.send(ack(block), tid)
                break
    assert bytes(got) == content


def udp_sockets_on(port: int, family: int) -> List[str]:
    """The kernel's view of the UDP sockets bound to ``port``: "connected"
    (state 01, a remote address) or "unconnected" (07), from /proc/net/udp[6]."""
    table = "/proc/net/udp6" if family == socket.AF_INET6 else "/proc/net/udp"
    out = []
    with open(table) as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                out.append("connected" if fields[3] == "01" else "unconnected")
    return sorted(out)


def wait_until_no_process_takes_requests(port: int, family: int = socket.AF_INET) -> None:
    """After a stop signal: the main process passes it on to the other serving
    processes, and each closes its request socket once it has it."""
    deadline = time.monotonic() + 10
    while "unconnected" in udp_sockets_on(port, family):
        assert time.monotonic() < deadline, "a serving process still takes requests"
        time.sleep(0.02)


# A transfer of at least server.CONNECT_MIN_BLOCKS blocks runs on a socket
# connected to its peer, strays going to a catcher on the same port; a
# shorter one on one unconnected socket, where the engine answers strays.
@pytest.mark.parametrize("kind,size", [("RRQ", 5000), ("RRQ", 40000), ("WRQ", 5000),
                                       ("WRQ", 40000)])
def test_wrong_tid_gets_error_5_and_transfer_continues(shared: ServerProcess, kind: str,
                                                       size: int) -> None:
    content = payload(size, 42)
    name = f"f{size}.bin" if kind == "RRQ" else f"tid-up-{size}.bin"
    if kind == "RRQ":
        content = (shared.root / name).read_bytes()
    blocks = size // 512 + 1
    with Peer(shared.addr) as peer, Peer(shared.addr) as intruder:
        opts = {"timeout": "10"}
        if kind == "WRQ" and size > 5000:
            opts["tsize"] = str(size)           # tells the server the upload is long
        peer.send(rrq(name, options=opts) if kind == "RRQ" else wrq(name, options=opts))
        first, tid = peer.expect(op=OACK)
        family = socket.AF_INET6 if ":" in tid[0] else socket.AF_INET
        assert udp_sockets_on(tid[1], family) == (
            ["connected", "unconnected"] if size > 5000 else ["unconnected"])
        if kind == "RRQ":
            peer.send(ack(0), tid)
            d1, _ = peer.expect(op=DATA)
            # strangers: an ACK, a DATA, a junk datagram, all to the transfer's port
            for stray in (ack(1), data(1, b"x"), b"\x00\x09junk"):
                intruder.send(stray, tid)
                pkt, addr = intruder.expect(op=ERROR, what="ERROR 5")
                assert pkt.code == 5 and addr == tid
            # an ERROR from a stranger is not answered (no error loops)
            intruder.send(error(0, "go away"), tid)
            assert intruder.listen(0.3) == []
            assert peer.listen(0.3) == [], "the stray packets disturbed the transfer"
            got = bytearray(d1.payload)
            block = 1
            for _ in range(blocks):
                peer.send(ack(block), tid)
                pkt, addr = peer.expect(op=DATA)
                assert addr == tid and pkt.block == block + 1
                got += pkt.payload
                block += 1
                if len(pkt.payload) < 512:
                    peer.send(ack(block), tid)
                    break
            assert bytes(got) == content
        else:
            for index in range(1, blocks + 1):
                chunk = content[(index - 1) * 512:index * 512]
                peer.send(data(index, chunk), tid)
                if index == 3:
                    intruder.send(data(4, b"evil" * 128), tid)
                    pkt, _ = intruder.expect(op=ERROR, what="ERROR 5")
                    assert pkt.code == 5
                pkt, addr = peer.expect(op=ACK)
                assert addr == tid and pkt.block == index
            deadline = time.monotonic() + 5
            while not (shared.upload / name).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert file_sha(shared.upload / name) == sha(content)
    if kind == "RRQ":          # (a WRQ dallies for its client's last DATA first)
        deadline = time.monotonic() + 5             # the catcher goes with the transfer
        while udp_sockets_on(tid[1], family) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert udp_sockets_on(tid[1], family) == []


def test_duplicate_request_while_running_is_not_a_second_transfer(shared: ServerProcess) -> None:
    content = (shared.root / "f5000.bin").read_bytes()
    before = len(shared.lines)
    with Peer(shared.addr) as peer:
        request = rrq("f5000.bin", options={"timeout": "10"})
        peer.send(request)
        _, tid = peer.expect(op=OACK)
        for _ in range(3):
            peer.send(request)           # a client retransmitting its request
        assert peer.listen(0.5) == [], "the repeated request got an answer"
        peer.send(ack(0), tid)
        got = bytearray()
        block = 0
        for _ in range(20):
            pkt, addr = peer.expect(op=DATA)
            assert addr == tid
            got += pkt.payload
            block += 1
            peer.send(ack(block), tid)
            if len(pkt.payload) < 512:
                break
        assert peer.listen(0.3) == []
    assert bytes(got) == content
    assert peer.sources() == {tid}
    port = peer.port
    assert_one_transfer_logged(shared, port, "f5000.bin", since=before)


def assert_one_transfer_logged(server: ServerProcess, port: int, name: str,
                               since: int = 0) -> None:
    """The -v log has exactly one line for this client port (one transfer of
    name) from line ``since`` on (on a shared server an earlier test's client
    may have had the same ephemeral port)."""
    assert wait_until(lambda: any(f":{port} " in l and name in l for l in server.lines[since:]))
    assert sum(f":{port} " in l for l in server.lines[since:]) == 1, server.log()


def test_peer_that_never_acks(tftpd_server, tmp_path: Path, host: str) -> None:
    """The server gives up after the retry limit and its only worker is free again."""
    root = tmp_path / "root"
    root.mkdir()
    content = put(root, "f.bin", payload(3000)).read_bytes()
    server = tftpd_server("-c", "1", "-t", "0.1", "-x", "3", "-v", root=root, host=host)
    with Peer(server.addr) as silent, Peer(server.addr) as waiting:
        silent.send(rrq("f.bin"))
        first, tid = silent.expect(op=DATA)
        # a second client while the only worker is busy: queued, then served
        # (its fixed timeout keeps its OACK from being retransmitted meanwhile)
        waiting.send(rrq("f.bin", options={"timeout": "10"}))
        server.wait_for_log(r"RRQ f\.bin failed after 0 bytes")
        copies = [first] + [p for p, _ in silent.listen(0.5, limit=50)]
        assert all(p.op == DATA and p.block == 1 for p in copies)
        # never answered: the first DATA goes out at most 3 times (the -x limit and
        # the smaller limit for a peer that has never answered), and at least twice
        assert 2 <= len(copies) <= 3, [p.block for p in copies]
        # the queued client is served in full
        _, tid2 = waiting.expect(op=OACK, timeout=5.0)
        assert tid2 != tid
        waiting.send(ack(0), tid2)
        got = bytearray()
        for block in range(1, 20):
            pkt, _ = waiting.expect(op=DATA)
            assert pkt.block == block
            got += pkt.payload
            waiting.send(ack(block), tid2)
            if len(pkt.payload) < 512:
                break
        assert bytes(got) == content
    # and a new request works
    with Peer(server.addr) as peer:
        res = peer.download("f.bin")
    assert res.error is None and res.data == content


def test_answered_peer_gets_more_retries_than_a_silent_one(tftpd_server, tmp_path: Path,
                                                            host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    put(root, "f.bin", payload(3000))
    server = tftpd_server("-t", "0.1", "-x", "4", root=root, host=host)
    with Peer(server.addr) as silent:
        silent.send(rrq("f.bin"))
        server.wait_for_log(r"failed after 0 bytes", timeout=30)
        unanswered = silent.listen(0.3, limit=50)
    with Peer(server.addr) as peer:
        peer.send(rrq("f.bin"))
        _, tid = peer.expect(op=DATA)
        peer.send(ack(1), tid)
        server.wait_for_log(r"failed after 512 bytes", timeout=30)
        answered = peer.listen(0.3, limit=50)
    assert all(p.op == DATA and p.block == 1 for p, _ in unanswered)
    # (a DATA 1 resent before our ACK arrived, on a loaded machine, is not counted)
    answered = [(p, a) for p, a in answered if p.block != 1]
    assert all(p.op == DATA and p.block == 2 for p, _ in answered)
    assert 2 <= len(unanswered) <= 3
    assert len(unanswered) < len(answered) <= 4


def test_wrq_peer_that_never_sends_data(tftpd_server, tmp_path: Path, host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    server = tftpd_server("-n", "-c", "1", "-t", "0.1", "-x", "3", root=root, host=host)
    with Peer(server.addr) as silent:
        silent.send(wrq("never.bin"))
        server.wait_for_log(r"WRQ never\.bin failed")
        acks = silent.listen(0.3, limit=50)
    assert all(p.op == ACK and p.block == 0 for p, _ in acks)
    assert 2 <= len(acks) <= 3
    assert list(root.iterdir()) == []
    with Peer(server.addr) as peer:
        res = peer.upload("after.bin", b"fine")
    assert res.error is None and (root / "after.bin").read_bytes() == b"fine"


def test_duplicate_request_while_queued(tftpd_server, tmp_path: Path, host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    content = put(root, "f.bin", payload(1500)).read_bytes()
    server = tftpd_server("-c", "1", "-t", "0.1", "-x", "3", "-v", root=root, host=host)
    with Peer(server.addr) as blocker, Peer(server.addr) as peer:
        blocker.send(rrq("f.bin"))
        blocker.expect(op=DATA)          # the only worker is now busy
        for _ in range(4):
            peer.send(rrq("f.bin", options={"timeout": "10"}))
            time.sleep(0.05)
        res_pkt, tid = peer.expect(op=OACK, timeout=5.0)
        got = _finish_download(peer, tid)
        assert peer.listen(0.5) == []
        assert bytes(got) == content
        assert peer.sources() == {tid}
        assert len(peer.received(OACK)) == 1
    port = peer.port
    assert_one_transfer_logged(server, port, "f.bin")


def test_client_error_after_oack_ends_quietly(tftpd_server, tmp_path: Path, host: str) -> None:
    """PXE ROMs ask for tsize, then abort with an ERROR: no retransmission, worker freed."""
    root = tmp_path / "root"
    root.mkdir()
    content = put(root, "boot.img", payload(70000)).read_bytes()
    server = tftpd_server("-c", "1", "-t", "0.5", "-x", "3", root=root, host=host)
    with Peer(server.addr) as rom:
        rom.send(rrq("boot.img", options={"tsize": "0"}))
        pkt, tid = rom.expect(op=OACK)
        assert pkt.options == {"tsize": "70000"}
        rom.send(error(8, "tsize probe done"), tid)
        assert rom.listen(0.8) == [], "the OACK was sent again after the client's ERROR"
        res = rom.download("boot.img", options={"blksize": "1428"})
    assert res.error is None and sha(res.data) == sha(content)
    server.wait_for_log(r"ended by client")


# -- large files: block number rollover --------------------------------------------------
def first_after_wrap(wire: List[int]) -> int:
    """The first block number that follows the numbers near 65535."""
    high = False
    for number in wire:
        if number >= 60000:
            high = True
        elif high and number < 5000:
            return number
    raise AssertionError("the block numbers never wrapped")


# Lock-step on IPv4 and windows of 16 on IPv6: both directions each, so that the
# wrap is exercised with one ACK per block and with one ACK per window.
ROLLOVER = [("127.0.0.1", "RRQ", 1), ("127.0.0.1", "WRQ", 1),
            ("::1", "RRQ", 16), ("::1", "WRQ", 16)]


@pytest.mark.parametrize("host,direction,window", ROLLOVER,
                         ids=[f"{'v6' if ':' in h else 'v4'}-{d}-window{w}"
                              for h, d, w in ROLLOVER])
def test_40mib_rollover(tftpd_server, tmp_path: Path, host: str, direction: str,
                        window: int) -> None:
    root = tmp_path / "root"
    root.mkdir()
    content = os.urandom(BIG)
    nblocks = BIG // 512 + 1                       # and a final empty DATA
    options = {"windowsize": str(window)} if window > 1 else None
    server = tftpd_server("-n", root=root, host=host)
    with Peer(server.addr, record_data=False) as peer:
        if direction == "RRQ":
            put(root, "big.bin", content)
            res = peer.download("big.bin", options=options, limit_s=120)
            assert res.error is None
            assert sha(res.data) == sha(content)
        else:
            res = peer.upload("big.bin", content, options=options, limit_s=120)
            assert res.error is None
            assert file_sha(root / "big.bin") == sha(content)
    assert res.blocks == nblocks > 65536
    # the wire numbers wrapped from 65535 to 0 (not 1) and went on
    wire = [e.block for e in peer.received(DATA if direction == "RRQ" else ACK)]
    assert first_after_wrap(wire) == 0
    assert wire[-1] == nblocks & 0xFFFF
    assert temp_files(root) == []


# -- addresses -------------------------------------------------------------------
def test_transfer_socket_bound_to_request_address(shared: ServerProcess) -> None:
    with Peer(shared.addr) as peer:
        peer.send(rrq("f5000.bin", options={"timeout": "10"}))
        _, tid = peer.expect(op=OACK)
        assert tid[0] == shared.host
        assert tid[1] != shared.port
        bound = udp_local_address(tid[1])
        peer.send(error(0, "enough"), tid)
    assert bound == shared.host


def _start_default_bind(root: Path, extra: List[str]) -> ServerProcess:
    """``tftpd -p 0`` without --address: the standalone default bind."""
    return launch(["-p", "0", "--root", str(root)] + extra, root, "::")


def test_default_bind_is_dual_stack(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    content = put(root, "f.bin", payload(2000)).read_bytes()
    server = _start_default_bind(root, ["-v"] + hermetic(tmp_path))
    try:
        assert re.search(r"listening on \[::\]:\d+", server.log()), server.log()
        for host in HOSTS:
            with Peer((host, server.port)) as peer:
                peer.send(rrq("f.bin", options={"timeout": "10"}))
                _, tid = peer.expect(op=OACK)
                bound = udp_local_address(tid[1])
                peer.send(error(0, "enough"), tid)
                assert tid[0] == host and bound == host, (tid, bound)
            with Peer((host, server.port)) as peer:
                res = peer.download("f.bin")
            assert res.error is None and res.data == content
            assert res.tid[0] == host
            port = peer.port
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            assert wait_until(lambda: any(f"RRQ from {shown} " in l and "f.bin" in l
                                          for l in server.lines)), server.log()
        assert "::ffff:" not in server.log()
    finally:
        assert server.stop() == 0


# -- failed uploads ------------------------------------------------------------------
@pytest.mark.parametrize("how", ["silence", "error"])
@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
def test_failed_upload_leaves_target_alone(tftpd_server, tmp_path: Path, host: str,
                                          how: str, existing: bool) -> None:
    root = tmp_path / "root"
    root.mkdir()
    old = payload(700, 1)
    if existing:
        put(root, "target.bin", old)
    server = tftpd_server("-n", "-t", "0.1", "-x", "3", root=root, host=host)
    with Peer(server.addr) as peer:
        res = peer.upload("target.bin", payload(20000, 2), stop_after=5)
        assert res.error is None and res.blocks == 5
        # the temporary file exists while the transfer runs, the target is untouched
        assert len(temp_files(root)) == 1
        assert ((root / "target.bin").read_bytes() == old) if existing \
            else not (root / "target.bin").exists()
        if how == "error":
            peer.send(error(0, "user cancelled"), res.tid)
    server.wait_for_log(r"WRQ target\.bin (failed|ended by client)")
    assert wait_until(lambda: temp_files(root) == [], 5.0), temp_files(root)
    if existing:
        assert (root / "target.bin").read_bytes() == old
        assert sorted(p.name for p in root.iterdir()) == ["target.bin"]
    else:
        assert list(root.iterdir()) == []
    # the worker is free and the same name can be uploaded in full afterwards
    with Peer(server.addr) as peer:
        res = peer.upload("target.bin", b"new content")
    assert res.error is None and (root / "target.bin").read_bytes() == b"new content"


def test_upload_replaces_existing_file_atomically(shared: ServerProcess) -> None:
    target = put(shared.upload, "replace.bin", b"old version")
    content = payload(4000, 9)
    with Peer(shared.addr) as peer:
        res = peer.upload("replace.bin", content)
    assert res.error is None
    assert file_sha(target) == sha(content)
    assert temp_files(shared.upload) == []


# -- signals -------------------------------------------------------------------
def test_sigterm_lets_a_running_transfer_finish(tftpd_server, tmp_path: Path, host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    content = put(root, "f.bin", payload(5000)).read_bytes()
    server = tftpd_server(root=root, host=host)
    with Peer(server.addr) as peer:
        peer.send(rrq("f.bin", options={"timeout": "10"}))
        _, tid = peer.expect(op=OACK)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert server.proc.poll() is None, "exited with a transfer running"
        # no new requests are taken
        with Peer(server.addr) as late:
            late.send(rrq("f.bin"))
            assert late.listen(0.3) == []
        peer.send(ack(0), tid)
        got = bytearray()
        for block in range(1, 20):
            pkt, _ = peer.expect(op=DATA)
            got += pkt.payload
            peer.send(ack(block), tid)
            if len(pkt.payload) < 512:
                break
    assert bytes(got) == content
    assert server.proc.wait(5) == 0


def test_second_sigterm_ends_transfers_at_once(tftpd_server, tmp_path: Path, host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    put(root, "f.bin", payload(5000))
    server = tftpd_server(root=root, host=host)
    with Peer(server.addr) as peer:
        peer.send(rrq("f.bin", options={"timeout": "10"}))
        _, tid = peer.expect(op=OACK)
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_log(r"stopping: waiting .*1 transfer")
        server.proc.send_signal(signal.SIGTERM)
        pkt, addr = peer.expect(op=ERROR, timeout=3.0, what="ERROR on a forced stop")
        assert addr == tid
    assert server.proc.wait(5) == 0


def test_sigterm_does_not_wait_for_a_dallying_upload(tftpd_server, tmp_path: Path,
                                                     host: str) -> None:
    """An upload that is complete but dallying (client timeout 10 s: the server
    waits for a repeated last DATA) does not hold up a graceful stop."""
    root = tmp_path / "root"
    root.mkdir()
    server = tftpd_server("-n", root=root, host=host)
    with Peer(server.addr) as peer:
        res = peer.upload("up.bin", b"x" * 600, options={"timeout": "10"})
    assert res.error is None and (root / "up.bin").read_bytes() == b"x" * 600
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(8) == 0
    assert time.monotonic() - started < 5, "waited for the dally to end"


# -- the worker limit and the queue ------------------------------------------------
def _open_transfer(server: ServerProcess, name: str) -> tuple:
    """A client that asks with a fixed 10 s timeout and then waits: it holds a worker."""
    peer = Peer(server.addr)
    peer.send(rrq(name, options={"timeout": "10"}))
    return peer


def _finish_download(peer: Peer, tid, first_block: int = 1) -> bytes:
    peer.send(ack(first_block - 1), tid)
    got = bytearray()
    for block in range(first_block, first_block + 100):
        pkt, addr = peer.expect(op=DATA)
        assert addr == tid and pkt.block == block
        got += pkt.payload
        peer.send(ack(block), tid)
        if len(pkt.payload) < 512:
            return bytes(got)
    raise AssertionError("download did not end")


def test_transfer_sockets_never_share_a_port() -> None:
    """Each transfer socket gets a port of its own, also while others are
    connected with a stray catcher beside them (SO_REUSEPORT set before a bind
    to port 0 would let the kernel hand out a port another socket holds)."""
    from tftpd.server import bind_transfer, stray_catcher
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    transfers: List[socket.socket] = []
    catchers: List[socket.socket] = []
    try:
        for i in range(1500):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            bind_transfer(sock, ("127.0.0.1", 0))   # as Server._transfer does
            transfers.append(sock)
            if i % 2 == 0:
                catcher = stray_catcher(sock, peer.getsockname())
                assert catcher is not None
                catchers.append(catcher)
                assert catcher.getsockname() == sock.getsockname()
                assert sock.getpeername() == peer.getsockname()
        ports = [s.getsockname()[1] for s in transfers]
        assert len(set(ports)) == len(ports), "two transfers got the same port"
    finally:
        for s in transfers + catchers:
            s.close()
        peer.close()


def test_at_most_c_transfers_at_once(tftpd_server, tmp_path: Path, host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    content = put(root, "f.bin", payload(2000)).read_bytes()
    server = tftpd_server("-c", "2", "--processes", "1", root=root, host=host)   # -c: per process
    a, b, c = (_open_transfer(server, "f.bin") for _ in range(3))
    try:
        _, tid_a = a.expect(op=OACK)
        _, tid_b = b.expect(op=OACK)
        assert c.listen(0.5) == [], "a third transfer ran with -c 2"
        assert _finish_download(a, tid_a) == content
        _, tid_c = c.expect(op=OACK, timeout=5.0)     # now it has a worker
        assert _finish_download(c, tid_c) == content
        assert _finish_download(b, tid_b) == content
    finally:
        for p in (a, b, c):
            p.close()


def test_queue_overflow_is_dropped_without_reply(tftpd_server, tmp_path: Path, host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    content = put(root, "f.bin", payload(2000)).read_bytes()
    server = tftpd_server("-c", "1", "--queue", "1", "--processes", "1", root=root, host=host)
    running = _open_transfer(server, "f.bin")
    _, tid = running.expect(op=OACK)
    queued = _open_transfer(server, "f.bin")
    time.sleep(0.1)
    dropped = _open_transfer(server, "f.bin")
    try:
        assert dropped.listen(0.5) == [], "a request beyond the queue was answered"
        server.wait_for_log(r"busy: 1 request\(s\) dropped")
        assert _finish_download(running, tid) == content
        _, tid_q = queued.expect(op=OACK, timeout=5.0)
        assert _finish_download(queued, tid_q) == content
        # the dropped client retransmits its request and is served
        dropped.send(rrq("f.bin", options={"timeout": "10"}))
        _, tid_d = dropped.expect(op=OACK, timeout=5.0)
        assert _finish_download(dropped, tid_d) == content
    finally:
        for p in (running, queued, dropped):
            p.close()


# -- more transfers ------------------------------------------------------------------
@pytest.mark.parametrize("blksize,windowsize", [(65464, 1), (1468, 8), (8, 1)])
def test_blksize_and_windowsize_both_directions(shared: ServerProcess, blksize: int,
                                                windowsize: int) -> None:
    size = 200_000 if blksize > 8 else 3000
    content = payload(size, blksize)
    opts = {"blksize": str(blksize), "windowsize": str(windowsize)}
    name = f"bw-{blksize}-{windowsize}.bin"
    with Peer(shared.addr) as peer:
        res = peer.upload(name, content, options=opts)
    assert res.error is None and res.oack == opts
    assert file_sha(shared.upload / name) == sha(content)
    with Peer(shared.addr) as peer:
        res = peer.download(str(shared.upload / name), options=opts)
    assert res.error is None and res.oack == opts
    assert sha(res.data) == sha(content)
    assert res.data_packets == size // blksize + 1


def test_non_utf8_file_name(shared: ServerProcess) -> None:
    name = b"caf\xe9-\xff.bin"
    (shared.root / os.fsdecode(name)).write_bytes(b"latin-1 name\n")
    (shared.root / os.fsdecode(name)).chmod(0o644)
    with Peer(shared.addr) as peer:
        res = peer.download(name)
    assert res.error is None and res.data == b"latin-1 name\n"
    with Peer(shared.addr) as peer:
        res = peer.upload(b"up-\xfe.bin", b"x")
    assert res.error is None
    assert (shared.upload / os.fsdecode(b"up-\xfe.bin")).read_bytes() == b"x"


def test_very_long_file_name(shared: ServerProcess) -> None:
    for packet in (rrq("a" * 5000), rrq("d/" * 2000 + "f"), wrq("b" * 5000)):
        answers = _refused(shared, packet)
        assert len(answers) == 1 and answers[0][0].op == ERROR
        assert answers[0][0].code in (1, 2)


def test_two_uploads_of_one_name_never_interleave(shared: ServerProcess) -> None:
    one, two = payload(6000, 1), payload(6000, 2)
    with Peer(shared.addr) as p1, Peer(shared.addr) as p2:
        p1.send(wrq("same.bin"))
        _, t1 = p1.expect(op=ACK)
        p2.send(wrq("same.bin"))
        _, t2 = p2.expect(op=ACK)
        blocks = len(one) // 512 + 1
        for index in range(1, blocks + 1):
            for peer, tid, content in ((p1, t1, one), (p2, t2, two)):
                peer.send(data(index, content[(index - 1) * 512:index * 512]), tid)
                pkt, _ = peer.expect(op=ACK)
                assert pkt.block == index
            if index == blocks // 2:
                assert not (shared.upload / "same.bin").exists()
    final = (shared.upload / "same.bin").read_bytes()
    assert final in (one, two)
    assert temp_files(shared.upload) == []


def test_illegal_packets_inside_a_transfer_get_error_4(shared: ServerProcess) -> None:
    # WRQ: a DATA larger than the block size
    with Peer(shared.addr) as peer:
        peer.send(wrq("illegal.bin"))
        _, tid = peer.expect(op=ACK)
        peer.send(data(1, b"x" * 600), tid)
        pkt, addr = peer.expect(op=ERROR)
        assert pkt.code == 4 and addr == tid
        assert peer.listen(0.3) == []
    # RRQ: a request sent to the transfer's own port
    with Peer(shared.addr) as peer:
        peer.send(rrq("f5000.bin", options={"timeout": "10"}))
        _, tid = peer.expect(op=OACK)
        peer.send(rrq("f5000.bin"), tid)
        pkt, addr = peer.expect(op=ERROR)
        assert pkt.code == 4 and addr == tid
    assert not (shared.upload / "illegal.bin").exists()
    assert wait_until(lambda: temp_files(shared.upload) == [], 3.0)


def test_i_puts_the_client_address_in_error_lines(tftpd_server, tmp_path: Path,
                                                  host: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    server = tftpd_server("-i", root=root, host=host)
    with Peer(server.addr) as peer:
        peer.download("missing.bin")
    shown = f"[{host}]:{peer.port}" if ":" in host else f"{host}:{peer.port}"
    line = server.wait_for_log(r"missing\.bin")
    assert shown in line, line


# -- one client port, several requests (tftp-hpa's interactive client) -------------
def test_new_request_from_same_port_while_upload_dallies(shared: ServerProcess) -> None:
    """After the last ACK of an upload the server dallies (here 10 s, the client's
    timeout) in case that ACK was lost; a new request from the same port is not a
    retransmission of the old one and must be served at once."""
    content = (shared.root / "f5000.bin").read_bytes()
    with Peer(shared.addr) as peer:
        res = peer.upload("dally.bin", b"d" * 700, options={"timeout": "10"})
        assert res.error is None
        peer.send(rrq("f5000.bin"))
        pkt, tid = peer.expect(op=DATA, timeout=5.0, what="DATA 1 of the next request")
        assert tid != res.tid
        got = bytearray(pkt.payload)
        for block in range(1, 20):
            peer.send(ack(block), tid)
            if len(pkt.payload) < 512:
                break
            pkt, _ = peer.expect(op=DATA)
            got += pkt.payload
    assert bytes(got) == content


def test_same_upload_again_while_the_first_dallies(shared: ServerProcess) -> None:
    """``put f; put f`` from one port: the second, identical WRQ arrives while the
    first transfer dallies (10 s here) and is a new transfer, not a duplicate."""
    with Peer(shared.addr) as peer:
        res = peer.upload("again.bin", b"1" * 600, options={"timeout": "10"})
        assert res.error is None
        time.sleep(0.2)
        res = peer.upload("again.bin", b"2" * 600, options={"timeout": "10"})
        assert res.error is None and res.timeouts == 0
    assert (shared.upload / "again.bin").read_bytes() == b"2" * 600


# -- the reply address, from the ancillary data of a request (no packets) ------------
def test_local_address_from_pktinfo() -> None:
    import struct
    from tftpd.server import local_address

    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        def in_pktinfo(spec: str, dest: str) -> tuple:
            data = struct.pack("=i", 2) + socket.inet_aton(spec) + socket.inet_aton(dest)
            return (socket.IPPROTO_IP, 8, data)

        def in6_pktinfo(dest: str, ifindex: int = 3) -> tuple:
            return (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                    socket.inet_pton(socket.AF_INET6, dest) + struct.pack("=I", ifindex))

        # unicast: the destination; broadcast: the interface's own address
        assert local_address(v4, [in_pktinfo("192.0.2.7", "192.0.2.7")]) == ("192.0.2.7", 0)
        assert local_address(v4, [in_pktinfo("192.0.2.7", "192.0.2.255")]) == ("192.0.2.7", 0)
        # dual stack: the v4-mapped IPV6_PKTINFO carries the header destination
        anc = [in6_pktinfo("::ffff:192.0.2.255", 2), in_pktinfo("192.0.2.7", "192.0.2.255")]
        assert local_address(v6, anc) == ("192.0.2.7", 0)
        assert local_address(v6, [in6_pktinfo("2001:db8::1")]) == ("2001:db8::1", 3)
        assert local_address(v6, [in6_pktinfo("ff02::1")]) == (None, 3)
    finally:
        v4.close()
        v6.close()


# -- as an unprivileged user ------------------------------------------------------------
@pytest.fixture
def world_dir():
    """A directory others can enter (pytest's tmp_path is 0700 and root's)."""
    import shutil
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="tftpd-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_permissions_as_nobody(world_dir: Path, host: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to start as root and drop to nobody")
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    root = world_dir / "root"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    upload = world_dir / "upload"
    upload.mkdir()
    upload.chmod(0o777)
    put(root, "public.bin", b"public\n", 0o644)
    put(root, "group.bin", b"group only\n", 0o640)
    put(root, "readonly.bin", b"old\n", 0o644)
    server = start_server(["-n", "-d", str(upload), "--user", "nobody", "--access-file",
                           str(world_dir / "none.ctl")], root, host)
    try:
        with Peer(server.addr) as peer:
            res = peer.download("public.bin")
        assert res.error is None and res.data == b"public\n"
        cases = [(rrq("group.bin"), 2),                     # not readable by others
                 (wrq(str(root / "readonly.bin")), 2),      # nobody may not write it
                 (wrq(str(root / "new.bin")), 2)]           # nor create files in root
        for packet, code in cases:
            answers = _refused(server, packet)
            assert [(p.op, p.code) for p, _ in answers] == [(ERROR, code)], packet
        assert (root / "readonly.bin").read_bytes() == b"old\n"
        assert sorted(p.name for p in root.iterdir()) == ["group.bin", "public.bin",
                                                          "readonly.bin"]
        with Peer(server.addr) as peer:
            res = peer.upload("by-nobody.bin", b"mine\n")
        assert res.error is None
        st = (upload / "by-nobody.bin").stat()
        assert st.st_uid == nobody.pw_uid
        assert (upload / "by-nobody.bin").read_bytes() == b"mine\n"
    finally:
        server.stop()


# -- retransmission or a new identical request: by arrival time ----------------------
def test_identical_request_is_a_retransmission_until_the_peer_has_answered() -> None:
    """A client resends its request only until it hears from the transfer; one
    that arrives (kernel timestamp) after we sent what the peer first answered
    is new."""
    import time as _time
    from types import SimpleNamespace
    from tftpd.server import Job, is_retransmission

    from tftpd.transfer import Outcome

    def engine(outcome: Outcome, answered_after: object, all_sent: bool = False
               ) -> SimpleNamespace:
        return SimpleNamespace(outcome=outcome, answered_after=answered_after,
                               all_sent=all_sent)

    job = Job(None, ("127.0.0.1", 5000), ("127.0.0.1", 0), socket.AF_INET, 0.0)  # type: ignore[arg-type]
    now_real = _time.time()
    sent_mono = _time.monotonic() - 5.0                       # what the peer answered: 5 s ago
    assert is_retransmission(job, now_real)                   # still queued
    job.engine = engine(Outcome.RUNNING, None)                # type: ignore[assignment]
    assert is_retransmission(job, now_real + 100)             # running, never answered
    job.engine = engine(Outcome.RUNNING, sent_mono)           # type: ignore[assignment]
    assert is_retransmission(job, now_real)                   # running: a delayed resend
    job.engine = engine(Outcome.RUNNING, None, all_sent=True)  # type: ignore[assignment]
    assert is_retransmission(job, now_real) is None           # last block out: not known yet
    job.engine = engine(Outcome.OK, sent_mono)                # type: ignore[assignment]
    assert is_retransmission(job, now_real - 6.0)             # over, sent before: a resend
    assert not is_retransmission(job, now_real - 4.0)         # over, sent after: new
    job.engine = engine(Outcome.TIMEOUT, None)                # type: ignore[assignment]
    assert is_retransmission(job, now_real)                   # never answered


def test_a_request_again_after_the_last_ack_is_new_even_if_that_ack_is_read_later() -> None:
    """One block: the client's last ACK is its first answer, and it asks again
    from the same port right behind it.  If the transfer's thread reads that
    ACK only after the new request arrived, the request is still new (it came
    after the DATA it acknowledged was sent)."""
    import time as _time

    from tftpd.server import Job, is_retransmission
    from tftpd.transfer import Outcome, Rto, Sender

    class Source:
        def packet(self, index: int, number: int) -> bytes:
            return b"\0\3\0\1" + b"x" * 10

    sent: List[bytes] = []
    mono = _time.monotonic()
    offset = _time.time() - mono
    s = Sender(Source(), ("127.0.0.1", 5000), lambda p, a: sent.append(p),  # type: ignore[arg-type]
               rto=Rto(1.0))
    s.start(mono - 2.0)                                 # DATA 1 sent 2 s ago
    s.receive(memoryview(b"\0\4\0\1"), ("127.0.0.1", 5000), mono)   # its ACK, read now
    assert s.outcome == Outcome.OK and s.answered_after == mono - 2.0 and len(sent) == 1
    job = Job(None, ("127.0.0.1", 5000), ("127.0.0.1", 0), socket.AF_INET, 0.0)  # type: ignore[arg-type]
    job.engine = s
    assert is_retransmission(job, offset + mono - 1.0) is False  # before the ACK was read
    assert is_retransmission(job, offset + mono - 3.0)       # before DATA 1 went out: a resend


def test_a_request_that_may_repeat_a_running_transfer_waits_for_its_end(tmp_path: Path) -> None:
    """A request identical to one whose transfer has sent its last block but
    not read the last ACK: its worker waits for that transfer to end, then
    serves it if it came after what the peer first answered, else drops it
    (the old transfer was never answered: a resend)."""
    import threading
    import time as _time
    from types import SimpleNamespace

    from tftpd.server import Job
    from tftpd.transfer import Outcome

    with InProcess(tmp_path, {"f.bin": b"f"}) as it:
        offset = _time.time() - _time.monotonic()
        for answered, expected in ((True, True), (False, False)):
            sent = _time.monotonic() - 1.0
            eng = SimpleNamespace(outcome=Outcome.RUNNING, answered_after=None, all_sent=True)
            old = Job(None, ("127.0.0.1", 5000), ("127.0.0.1", 0),  # type: ignore[arg-type]
                      socket.AF_INET, 0.0)
            old.engine = eng                                     # type: ignore[assignment]

            def end() -> None:
                _time.sleep(0.2)
                if answered:
                    eng.answered_after = sent
                eng.outcome = Outcome.OK if answered else Outcome.TIMEOUT

            t = threading.Thread(target=end)
            started = _time.monotonic()
            t.start()
            assert it.server._settled((old, offset + sent + 0.5)) is expected
            assert _time.monotonic() - started >= 0.2                # it waited for the end
            t.join()


def test_pool_limits_threads_bounds_the_queue_and_closes() -> None:
    """The worker pool: at most ``limit`` jobs run at once, ``queue_limit``
    more wait, idle threads are reused, ``on_idle`` fires when the last job
    ends, and ``close`` lets the rest finish and ends every thread."""
    import threading

    from tftpd.server import Pool

    gate = threading.Event()
    ran: List[int] = []
    running: List[int] = []
    most = [0]
    idle_calls: List[int] = []
    lock = threading.Lock()

    def run(job: object) -> None:
        with lock:
            running.append(1)
            most[0] = max(most[0], len(running))
        gate.wait(10)
        with lock:
            running.pop()
            ran.append(id(job))

    pool = Pool(2, 3, run, on_idle=lambda: idle_calls.append(1))  # type: ignore[arg-type]
    jobs = [object() for _ in range(6)]
    accepted = [pool.submit(job) for job in jobs]                     # type: ignore[arg-type]
    assert accepted == [True] * 5 + [False]                           # 2 running, 3 queued
    assert pool.pending() == 5 and pool.threads == 2
    gate.set()
    assert pool.close(timeout=10)
    assert sorted(ran) == sorted(id(j) for j in jobs[:5]) and most[0] == 2
    assert idle_calls and pool.threads == 0 and pool.pending() == 0
    deadline = time.monotonic() + 10
    while any(t.name == "tftpd-worker" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a worker thread outlived close()"
        time.sleep(0.01)


def test_pool_reuses_an_idle_thread_and_survives_a_failing_job(monkeypatch) -> None:
    import threading

    from tftpd.server import Pool

    failed: List[object] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failed.append(args.exc_type))
    done = threading.Semaphore(0)
    names: List[int] = []
    fail = object()

    def run(job: object) -> None:
        names.append(threading.get_ident())
        done.release()
        if job is fail:
            raise SystemExit        # ends its thread; the pool keeps count
    pool = Pool(4, 10, run)                                           # type: ignore[arg-type]
    for _ in range(5):
        assert pool.submit(object())                                  # type: ignore[arg-type]
        assert done.acquire(timeout=10)
        deadline = time.monotonic() + 10
        while pool.pending():                                         # back to idle
            assert time.monotonic() < deadline
            time.sleep(0.001)
    assert len(set(names)) == 1 and pool.threads == 1
    assert pool.submit(fail)                                          # type: ignore[arg-type]
    assert done.acquire(timeout=10)
    deadline = time.monotonic() + 10
    while pool.threads or names[0] in {t.ident for t in threading.enumerate()}:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert failed == [SystemExit]
    assert pool.submit(object()) and done.acquire(timeout=10)        # type: ignore[arg-type]
    assert pool.close(timeout=10) and pool.threads == 0


def test_pool_closed_by_its_idle_callback_ends_the_thread_cleanly(monkeypatch) -> None:
    """Inetd mode: the last job's end calls ``on_idle``, the request loop exits
    and closes the pool while that worker is going idle. close() wakes it from
    the idle list; the worker must not wake itself a second time (that raised
    "release unlocked lock" in the thread, seen once in CI)."""
    import threading

    from tftpd.server import Pool

    failed: List[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failed.append(args.exc_value))
    closed: List[bool] = []
    pool = Pool(2, 3, lambda job: None,                               # type: ignore[arg-type]
                on_idle=lambda: closed.append(pool.close(timeout=10)))
    assert pool.submit(object())                                      # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while pool.threads or any(t.name == "tftpd-worker" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the worker thread outlived close()"
        time.sleep(0.001)
    assert closed == [True]
    assert failed == []


def test_pool_leader_runs_the_jobs_it_reads_itself() -> None:
    """Leader/follower: a thread whose job ended, with nothing queued, finds
    the next job itself (``lead``) and runs it on its own thread, leading on;
    a job that calls ``resign()`` gives the role back (``on_lead(False)``)
    when no other thread is idle, and its thread takes it again after."""
    import queue
    import threading

    from tftpd.server import Pool

    feed: "queue.Queue[object]" = queue.Queue()
    ran: "queue.Queue[int]" = queue.Queue()
    told: List[bool] = []
    leaders: List[int] = []
    long = object()
    pool: Pool

    def run(job: object) -> None:
        if job is long:
            pool.resign()
        ran.put(threading.get_ident())

    def lead() -> object:
        leaders.append(threading.get_ident())
        return feed.get(timeout=10)

    pool = Pool(4, 10, run, lead=lead, on_lead=told.append)           # type: ignore[arg-type]
    assert pool.submit(object())                                      # type: ignore[arg-type]
    first = ran.get(timeout=10)
    for _ in range(3):
        feed.put(object())
        assert ran.get(timeout=10) == first
    assert wait_until(lambda: len(leaders) == 4, step=0.001)
    assert pool.threads == 1 and set(leaders) == {first} and pool.leader
    assert told == [True]                   # taken once, kept
    feed.put(long)
    assert ran.get(timeout=10) == first
    assert wait_until(lambda: len(leaders) == 5, step=0.001)
    assert told == [True, False, True] and pool.leader
    feed.put(None)                          # lead() found nothing: idle
    assert wait_until(lambda: not pool.leader, step=0.001)
    assert told[-1] is False and pool.pending() == 0
    assert pool.submit(object()) and ran.get(timeout=10) == first      # type: ignore[arg-type]
    assert wait_until(lambda: pool.leader, step=0.001)
    feed.put(None)
    assert pool.close(timeout=10)
    assert wait_until(lambda: all(t.ident != first for t in threading.enumerate()))
    assert pool.threads == 0


def test_pool_leader_resigning_passes_the_role_to_an_idle_thread() -> None:
    """A leader whose job resigns wakes an idle thread to lead in its place
    instead of giving the role back to whoever submits."""
    import queue
    import threading

    from tftpd.server import Pool

    gate = threading.Event()
    feed: "queue.Queue[object]" = queue.Queue()
    told: List[bool] = []
    leaders: List[int] = []
    ran: List[int] = []
    long = object()
    pool: Pool

    def run(job: object) -> None:
        ran.append(threading.get_ident())
        if job is long:
            pool.resign()
        if job is long or len(ran) <= 2:
            gate.wait(10)

    def lead() -> object:
        leaders.append(threading.get_ident())
        return feed.get(timeout=10)

    pool = Pool(2, 10, run, lead=lead, on_lead=told.append)          # type: ignore[arg-type]
    assert pool.submit(object()) and pool.submit(object())            # type: ignore[arg-type]
    assert wait_until(lambda: len(ran) == 2, step=0.001)
    gate.set()                                # both end: one leads, one idles
    assert wait_until(lambda: pool.leader and len(pool.idle) == 1 and len(leaders) == 1)
    gate.clear()
    feed.put(long)                            # the leader takes it and resigns
    assert wait_until(lambda: len(leaders) == 2, step=0.001)
    assert leaders[0] != leaders[1] and told == [True] and pool.leader
    assert pool.pending() == 1 and ran[-1] == leaders[0]
    gate.set()
    assert wait_until(lambda: not pool.pending(), step=0.001)   # the first one idles
    assert pool.leader and len(pool.idle) == 1 and len(leaders) == 2
    feed.put(None)
    assert wait_until(lambda: not pool.leader, step=0.001)
    assert told == [True, False]
    assert pool.close(timeout=10)
    assert wait_until(lambda: all(t.ident not in leaders for t in threading.enumerate()))


def test_pool_job_queued_while_the_leader_waits_goes_to_the_leader() -> None:
    """All threads taken, one of them the leader waiting in ``lead()``: a job
    submitted meanwhile (the request loop read it while the role changed
    hands) is queued, the leader is kicked out of ``lead()`` and runs it
    (found in CI: the job waited until another job ended, here never)."""
    import queue
    import threading

    from tftpd.server import Pool

    feed: "queue.Queue[object]" = queue.Queue()
    ran: "queue.Queue[object]" = queue.Queue()
    told: List[bool] = []
    kicks: List[int] = []
    pool: Pool

    def kick() -> None:
        kicks.append(1)
        feed.put(None)                        # lead() returns None when kicked

    pool = Pool(1, 10, ran.put, lead=lambda: feed.get(timeout=10),  # type: ignore[arg-type]
                on_lead=told.append, kick=kick)
    first, queued = object(), object()
    assert pool.submit(first) and ran.get(timeout=10) is first        # type: ignore[arg-type]
    assert wait_until(lambda: pool.leader and pool.pending() == 0, step=0.001)
    assert pool.submit(queued)                                         # type: ignore[arg-type]
    assert ran.get(timeout=10) is queued and kicks == [1]
    assert wait_until(lambda: pool.leader and pool.pending() == 0, step=0.001)
    assert told == [True] and pool.threads == 1
    feed.put(None)
    assert wait_until(lambda: not pool.leader, step=0.001)
    assert pool.close(timeout=10)


def test_pool_leader_lends_the_reading_and_takes_it_back() -> None:
    """``lend()`` only marks the leader's step and ``reclaim()`` clears the
    mark; whoever submits takes the reading (``take_lent``) only while that
    same step runs, and gives it back at the ``reclaim()``, or when a job that
    never reclaimed ends.  ``lend()`` calls ``on_lend`` once after the reader
    stopped looking (``unwatched``).  The role stays with the thread."""
    import queue
    import threading

    from tftpd.server import Pool

    feed: "queue.Queue[object]" = queue.Queue()
    ran: "queue.Queue[int]" = queue.Queue()
    told: List[bool] = []
    woken: List[int] = []
    quick, back, kept = object(), object(), object()
    pool: Pool

    def run(job: object) -> None:
        if job in (quick, back, kept):
            pool.unwatched = True
            before = len(woken)
            assert pool.lend() and pool.lending > 0
            assert not pool.unwatched and len(woken) == before + 1
            since = pool.lending
            assert not pool.take_lent(since - 1)        # not the step under way
            if job is quick:
                pool.reclaim()
                assert not pool.lending and not pool.take_lent(since)   # over
                assert told[-1] is True and not pool.lent
            else:
                assert pool.take_lent(since) and not pool.take_lent(since)
                assert told[-1] is False and pool.lent and pool.leader
                assert not pool.lend()                  # (lent: nothing to mark)
                if job is back:
                    pool.reclaim()
                    assert told[-1] is True and not pool.lent and not pool.lending
        ran.put(threading.get_ident())

    pool = Pool(4, 10, run, lead=lambda: feed.get(timeout=10),       # type: ignore[arg-type]
                on_lead=told.append, on_lend=lambda: woken.append(1))
    assert pool.submit(object())                                      # type: ignore[arg-type]
    first = ran.get(timeout=10)
    assert wait_until(lambda: pool.leader, step=0.001)
    assert not pool.lend() and pool.lends == 0  # not the leader's thread
    for job in (quick, back, kept):
        feed.put(job)
        assert ran.get(timeout=10) == first
    assert wait_until(lambda: pool.leader and not pool.leader_runs, step=0.001)
    # kept ended lent: the reading came back when it ended
    assert told == [True, False, True, False, True] and not pool.lent and not pool.lending
    assert pool.lends == 3 and len(woken) == 3
    feed.put(None)
    assert wait_until(lambda: not pool.leader, step=0.001)
    assert pool.close(timeout=10)
    assert wait_until(lambda: all(t.ident != first for t in threading.enumerate()))


class InProcess:
    """A Server on 127.0.0.1 in this process, its request loop in a thread."""

    def __init__(self, tmp_path: Path, files: Dict[str, bytes], **config: Any) -> None:
        import threading

        from tftpd.access import AccessTable
        from tftpd.config import Config
        from tftpd.server import Server

        self.root = tmp_path / "root"
        self.root.mkdir()
        for name, body in files.items():
            put(self.root, name, body)
        cfg = Config(root=str(self.root), access_file=str(tmp_path / "none.ctl"), **config)
        self.listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listen.bind(("127.0.0.1", 0))
        self.addr = self.listen.getsockname()
        self.server = Server(cfg, [self.listen], AccessTable(cfg.access_file, [str(self.root)]))
        self.loop = threading.Thread(target=self.server.serve)

    def __enter__(self) -> "InProcess":
        self.loop.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.loop.join(10)
        assert not self.loop.is_alive()

    def led_and_idle(self) -> bool:
        """A worker leads and no transfer runs."""
        return self.server.pool.leader and not self.server.pool.pending()


def test_a_leader_leaves_the_reading_to_others_for_an_upload(tmp_path: Path) -> None:
    """An upload's end waits for fsync (and its length may be unknown): the
    leader that takes a WRQ, even a small one, lets others read requests."""
    with InProcess(tmp_path, {"f.bin": b"f" * 100}, allow_write=True) as it:
        with Peer(it.addr) as peer:
            peer.download("f.bin")
        assert wait_until(it.led_and_idle, step=0.001)
        with Peer(it.addr) as up:
            up.send(wrq("new.bin", options={"tsize": "5"}))
            _, tid = up.expect(op=OACK)
            assert wait_until(lambda: not it.server.pool.leader)   # the request loop reads
            up.send(data(1, b"hello"), tid)
            pkt, _ = up.expect(op=ACK)
            assert pkt.block == 1
        assert (it.root / "new.bin").read_bytes() == b"hello"
        assert wait_until(it.led_and_idle)


def test_a_leader_stuck_in_the_file_system_does_not_hold_up_other_requests(
        tmp_path: Path) -> None:
    """While the leading worker waits for a file system that hangs, the
    request loop reads requests and another worker serves them."""
    import threading

    hang = threading.Event()
    stuck = threading.Event()
    it = InProcess(tmp_path, {"f.bin": b"f" * 100, "stuck.bin": b"s" * 100})
    admit = it.server.admission.admit

    def hanging_admit(request):                   # type: ignore[no-untyped-def]
        if request.filename == b"stuck.bin":
            stuck.set()
            hang.wait(10)
        return admit(request)

    it.server.admission.admit = hanging_admit    # type: ignore[method-assign]
    try:
        with it:
            with Peer(it.addr) as peer:
                peer.download("f.bin")
            assert wait_until(it.led_and_idle, step=0.001)
            with Peer(it.addr) as slow, Peer(it.addr) as other:
                slow.send(rrq("stuck.bin"))
                assert stuck.wait(10) and it.server.pool.leader_runs
                res = other.download("f.bin")
                assert res.error is None and res.data == b"f" * 100
                hang.set()
                pkt, tid = slow.expect(op=DATA)
                assert pkt.payload == b"s" * 100
                slow.send(ack(1), tid)
    finally:
        hang.set()


def test_the_request_loop_looks_at_lends_only_while_they_happen(tmp_path: Path) -> None:
    """While the leader serves requests the request loop looks at its lent
    steps every LEND_AFTER seconds; once no request came for one such period
    it waits without a timeout (the next ``lend()`` wakes it)."""
    from tftpd.server import LEND_AFTER

    with InProcess(tmp_path, {"f.bin": b"f" * 100}) as it:
        for _ in range(3):               # the first makes a leader, which serves the others
            with Peer(it.addr) as peer:
                assert peer.download("f.bin").data == b"f" * 100
            assert wait_until(it.led_and_idle, step=0.001)
        assert it.server.pool.lends >= 1
        assert wait_until(lambda: it.server.pool.unwatched, timeout=5 * LEND_AFTER + 2)
        waits: List[Any] = []
        poller = it.server._poller
        real_wait = poller.wait
        poller.wait = lambda t: waits.append(t) or real_wait(t)   # type: ignore[method-assign]
        time.sleep(4 * LEND_AFTER)
        assert waits == []                          # asleep: no look while quiet
        with Peer(it.addr) as peer:
            assert peer.download("f.bin").data == b"f" * 100
        assert wait_until(lambda: len(waits) >= 1)  # woken by the lend
        assert waits[0] is not None and 0 < waits[0] <= LEND_AFTER
        assert wait_until(lambda: it.server.pool.unwatched, timeout=5 * LEND_AFTER + 2)


def test_a_quiet_server_serves_requests_without_its_request_loop(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Sequential requests: once one transfer has ended, its worker reads the
    next request itself; the request loop reads only the first.  A request
    that comes while the leader serves goes to a second worker.  Stopping the
    server stops the leading worker."""
    import threading

    it = InProcess(tmp_path, {"f.bin": b"x" * 100})
    server = it.server
    read_by_loop: List[int] = []
    original = server._read_requests
    monkeypatch.setattr(server, "_read_requests", lambda sock, buf: (
        read_by_loop.append(1) if threading.current_thread() is it.loop else None,
        original(sock, buf)))
    with it:
        for i in range(5):
            assert i == 0 or wait_until(it.led_and_idle, step=0.001), "no worker took the lead"
            with Peer(it.addr) as peer:
                peer.send(rrq("f.bin"))
                pkt, tid = peer.expect(op=DATA)
                assert pkt.payload == b"x" * 100
                peer.send(ack(1), tid)
        assert len(read_by_loop) == 1 and server.pool.threads == 1
        # While the leader serves a small file (its DATA not yet ACKed), it
        # hands a second client's request to another worker.
        with Peer(it.addr) as first, Peer(it.addr) as second:
            first.send(rrq("f.bin"))
            _, tid1 = first.expect(op=DATA)
            second.send(rrq("f.bin"))
            pkt, tid2 = second.expect(op=DATA)
            assert pkt.payload == b"x" * 100 and tid2 != tid1
            second.send(ack(1), tid2)
            first.send(ack(1), tid1)
        assert wait_until(lambda: not server.pool.pending(), step=0.001)
        assert len(read_by_loop) == 1 and server.pool.threads == 2
    assert wait_until(lambda: all(t.name != "tftpd-worker" for t in threading.enumerate()),
                      step=0.001), "the leading worker outlived the server"


@pytest.mark.parametrize("kind", ["epoll", "poll"])
def test_poller_reports_readable_sockets_with_what_they_are_for(monkeypatch, kind: str) -> None:
    """The request loop's poller: epoll, or poll where there is no epoll."""
    import select as select_module
    import types

    from tftpd import server as server_module
    if kind == "epoll" and not hasattr(select_module, "epoll"):
        pytest.skip("no epoll here")
    if kind == "poll":
        fake = types.SimpleNamespace(poll=select_module.poll, POLLIN=select_module.POLLIN)
        monkeypatch.setattr(server_module, "select", fake)
    poller = server_module._Poller()
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
        poller.register(a, server_module._REQUESTS)
        poller.register(b, server_module._STRAYS)
        assert poller.wait(0) == []
        start = time.monotonic()
        assert poller.wait(0.05) == [] and time.monotonic() - start >= 0.04
        a.sendto(b"x", b.getsockname())
        ready = poller.wait(5)
        assert [fd for fd, _ in ready] == [b.fileno()]
        assert poller.targets[b.fileno()] == (server_module._STRAYS, b)
        poller.watch(b, False)                        # still registered, no events asked
        assert poller.wait(0) == [] and b.fileno() in poller.targets
        poller.watch(b, True)
        assert [fd for fd, _ in poller.wait(5)] == [b.fileno()]
        poller.unregister(b)
        assert poller.wait(0) == [] and b.fileno() not in poller.targets
        poller.unregister(b)                          # twice: nothing happens
        poller.close()
        with pytest.raises(ValueError):
            poller.register(b, server_module._STRAYS)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("idle", [0.0, 0.2, 0.8])
def test_inetd_mode_exits_when_idle_for_its_idle_time(tmp_path: Path, idle: float) -> None:
    """The request loop (inetd mode, in this process) exits ``--idle-timeout``
    seconds after the last transfer ended, whether the pool tells it at once
    (short idle times) or it finds out by looking every PENDING_POLL seconds."""
    import threading

    from tftpd.access import AccessTable
    from tftpd.config import Config
    from tftpd.server import PENDING_POLL, Server

    root = tmp_path / "root"
    root.mkdir()
    put(root, "f.bin", b"x" * 100)
    cfg = Config(root=str(root), access_file=str(tmp_path / "none.ctl"), idle_timeout=idle)
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind(("127.0.0.1", 0))
    server = Server(cfg, [listen], AccessTable(cfg.access_file, [str(root)]), idle_exit=True)
    assert (server.pool.on_idle is not None) == (idle < PENDING_POLL)
    ended: List[float] = []
    loop = threading.Thread(target=lambda: (server.serve(), ended.append(time.monotonic())))
    with Peer(listen.getsockname()) as peer:
        peer.send(rrq("f.bin"))                  # waiting when the loop starts, as under inetd
        loop.start()
        pkt, tid = peer.expect(op=DATA)
        peer.send(ack(1), tid)
        acked = time.monotonic()
        loop.join(idle + 5)
    assert ended, "the request loop did not exit"
    assert idle - 0.05 <= ended[0] - acked <= idle + 0.4


def test_a_small_files_kept_contents_serve_every_kind_of_download(tmp_path: Path) -> None:
    """Kept contents (files.kept_contents) are sent one block at a time, by a
    window, and on a connected socket by the pump (300 bytes at blksize 8
    are 38 blocks: CONNECT_MIN_BLOCKS or more); tsize says the file's size."""
    from tftpd import files
    body = payload(300, 3)
    with InProcess(tmp_path, {"f.bin": body}) as it:
        it.server.admission.clock = lambda: time.time() + 10      # the file looks settled
        for options in ({}, {"blksize": "8"}, {"blksize": "8", "windowsize": "4"},
                        {"blksize": "16", "tsize": "0"}):
            for _ in range(2):                   # read and kept, then sent from memory
                with Peer(it.addr) as peer:
                    res = peer.download("f.bin", options=options)
                assert res.error is None and res.data == body, options
                if "tsize" in options:
                    assert res.oack is not None and res.oack["tsize"] == "300"
        assert files.kept_contents(os.stat(it.root / "f.bin")) == body


def test_reread_keeps_no_small_files_contents(tmp_path: Path) -> None:
    """--reread: the admission gets no clock, so nothing is kept, even for a
    file that looks settled to a server without it."""
    from tftpd import files
    body = payload(300, 4)
    for reread in (True, False):
        base = tmp_path / str(reread)
        base.mkdir()
        with InProcess(base, {"f.bin": body}, reread=reread) as it:
            assert (it.server.admission.clock is None) is reread
            if not reread:
                it.server.admission.clock = lambda: time.time() + 10
            for _ in range(2):
                with Peer(it.addr) as peer:
                    assert peer.download("f.bin").data == body
            kept = files.kept_contents(os.stat(it.root / "f.bin"))
            assert kept is None if reread else kept == body
