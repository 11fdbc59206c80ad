"""The hostile-input catalogue (issue 6): every case is sent to a live server,
its answer is checked, and then a normal RRQ must still be served.

What each kind of case must get:

* ``NOTHING`` -- not a well-formed request: no reply at all on the request port
  (a server that answers junk is a reflector);
* ``ERROR`` -- a well-formed request that is refused: exactly one ERROR, with
  one of the listed codes, and never the contents of a file outside the root;
* ``SERVE`` -- served, with exactly the listed OACK (None: no OACK).

Cases asserted the same way in test_server.py are not repeated here: a
duplicate RRQ from the same port while its transfer runs
(test_duplicate_request_while_running_is_not_a_second_transfer) and ERROR
right after the OACK of an RRQ (test_client_error_after_oack_ends_quietly);
their WRQ twins, which test_server.py does not cover, are here.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from conftest import ServerProcess, start_server
from tftpclient import ACK, DATA, ERROR, OACK, Packet, Peer, ack, data, error, rrq, wrq

SMALL = bytes(range(256)) * 6 + b"tail"          # 1540 bytes: 4 blocks of 512
SECRET = b"outside the root: must never be sent\n"
LONG_DIR = ["d" * 200, "e" * 200, "f" * 190]       # 592 bytes of name with the slashes
LONG_FILE = "g" * 7


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServerProcess:
    base = tmp_path_factory.mktemp("hostile")
    root = base / "root"
    upload = base / "upload"
    root.mkdir()
    upload.mkdir()
    (base / "outside.txt").write_bytes(SECRET)
    for name in ("small.bin", "n" * 255):
        (root / name).write_bytes(SMALL)
        (root / name).chmod(0o644)
    deep = root.joinpath(*LONG_DIR)
    deep.mkdir(parents=True)
    (deep / LONG_FILE).write_bytes(SMALL)
    (deep / LONG_FILE).chmod(0o644)
    srv = start_server(["-n", "-v", "-i", "-d", str(upload),
                        "--access-file", str(base / "none.ctl"), "--user", "root"], root)
    srv.upload = upload  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def still_serves(server: ServerProcess) -> None:
    """The server is alive, logged no internal error, and serves a normal RRQ."""
    assert server.proc.poll() is None, "the server died"
    with Peer(server.addr, timeout=5.0) as peer:
        res = peer.download("small.bin")
    assert res.error is None and res.data == SMALL
    bad = [l for l in server.lines if "internal error" in l or "Traceback" in l]
    assert bad == [], "\n".join(bad)


def finish_download(peer: Peer, first: Packet, tid, blksize: int = 512) -> bytes:
    """Complete an RRQ whose first answer (OACK or DATA 1) is ``first``."""
    got = bytearray()
    pkt: Optional[Packet] = first
    if first.op == OACK:
        peer.send(ack(0), tid)
        pkt = None
    for block in range(1, 100_000):
        while pkt is None or (block > 1 and pkt.block == (block - 1) & 0xFFFF):
            # (a DATA again after our ACK: the server's timer ran out first on a
            # busy machine; as RFC 1350 clients do, it is not acknowledged again)
            pkt, addr = peer.expect(op=DATA, what=f"DATA {block}")
            assert addr == tid
        assert pkt.op == DATA and pkt.block == block & 0xFFFF, pkt
        got += pkt.payload
        peer.send(ack(block), tid)
        if len(pkt.payload) < blksize:
            return bytes(got)
        pkt = None
    raise AssertionError("download did not end")


def finish_upload(peer: Peer, tid, payload: bytes, blksize: int = 512) -> None:
    for index in range(1, len(payload) // blksize + 2):
        peer.send(data(index, payload[(index - 1) * blksize:index * blksize]), tid)
        pkt, _ = peer.expect(op=ACK, what=f"ACK {index}")
        assert pkt.block == index


# -- the table --------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    datagrams: Sequence[bytes]
    expect: str                                # NOTHING, ERROR or SERVE
    codes: Tuple[int, ...] = ()                # ERROR: acceptable codes
    oack: Optional[Dict[str, str]] = None      # SERVE: the OACK (None: no OACK)
    upload: bool = False                       # SERVE of a WRQ


def raw(opcode: int, *fields: bytes) -> bytes:
    return struct.pack("!H", opcode) + b"".join(f + b"\0" for f in fields)


def opts(*pairs: Tuple[str, str]) -> List[bytes]:
    out: List[bytes] = []
    for k, v in pairs:
        out += [k.encode(), v.encode()]
    return out


def nothing(name: str, *datagrams: bytes) -> Case:
    return Case(name, datagrams, "NOTHING")


def refused(name: str, datagram: bytes, *codes: int) -> Case:
    return Case(name, [datagram], "ERROR", codes)


def served(name: str, datagram: bytes, oack: Optional[Dict[str, str]] = None,
           upload: bool = False) -> Case:
    return Case(name, [datagram], "SERVE", oack=oack, upload=upload)


def rrq_opt(*pairs: Tuple[str, str], name: bytes = b"small.bin") -> bytes:
    return raw(1, name, b"octet", *opts(*pairs))


def wrq_opt(target: str, *pairs: Tuple[str, str]) -> bytes:
    return raw(2, target.encode(), b"octet", *opts(*pairs))


BIG_NAME = b"/".join(d.encode() for d in LONG_DIR) + b"/" + LONG_FILE.encode()

CASES: List[Case] = [
    # datagrams of 0-3 bytes
    nothing("0-bytes", b""),
    nothing("1-byte-all-values", *[bytes([i]) for i in range(256)]),
    nothing("2-bytes-opcodes", *[struct.pack("!H", op)
                                 for op in (0, 1, 2, 3, 4, 5, 6, 7, 9, 0x0101, 0xFFFF)]),
    nothing("3-bytes", b"\x00\x01f", b"\x00\x02\x00", b"\x00\x03\x00", b"\x00\x04\x00",
            b"\x00\x05\x00", b"\x00\x06\x00", b"\xff\xff\xff"),
    # opcodes that are not requests, with a request's body
    *[nothing(f"opcode-{op}", raw(op, b"small.bin", b"octet"),
              raw(op, b"small.bin", b"octet", b"blksize", b"1024"))
      for op in (0, 6, 7, 9, 0xFFFF)],
    # malformed requests
    nothing("rrq-without-nul", b"\x00\x01small.bin octet"),
    nothing("wrq-without-nul", b"\x00\x02new.bin octet"),
    nothing("rrq-mode-unterminated", b"\x00\x01small.bin\x00octet"),
    nothing("empty-name-rrq", raw(1, b"", b"octet")),
    nothing("empty-name-wrq", raw(2, b"", b"octet")),
    nothing("odd-options-1", raw(1, b"small.bin", b"octet", b"blksize")),
    nothing("odd-options-3", raw(1, b"small.bin", b"octet", b"blksize", b"1024",
                                 b"tsize", b"0", b"windowsize")),
    nothing("error-600-bytes-to-request-port", error(0, "E" * 600)),
    # long names: a missing one gets one ERROR, an existing one is served
    refused("name-255-missing", rrq("m" * 255), 1),
    served("name-255-exists", rrq("n" * 255)),
    refused("name-512", rrq("m" * 512), 1, 2),
    refused("name-600", rrq("m" * 600), 1, 2),
    served("name-600-exists", rrq(BIG_NAME)),
    refused("name-65000", rrq("m" * 65000), 1, 2),
    refused("name-65000-wrq", wrq("m" * 65000), 1, 2),
    # requests over 512 bytes
    served("request-over-512", rrq_opt(("x-padding", "p" * 600))),
    served("request-over-512-options", rrq_opt(("x-padding", "p" * 600), ("blksize", "1024")),
           {"blksize": "1024"}),
    # duplicate and many options: the first of a name counts, unknown ones are ignored
    served("duplicate-options", rrq_opt(("blksize", "1024"), ("BLKSIZE", "2048"),
                                        ("blksize", "600")), {"blksize": "1024"}),
    served("500-options", rrq_opt(*[(f"x-opt-{i}", str(i)) for i in range(499)],
                                  ("blksize", "1024")), {"blksize": "1024"}),
    served("500-blksize-options", rrq_opt(*[("blksize", str(600 + i)) for i in range(500)]),
           {"blksize": "600"}),
    # blksize values
    *[served(f"blksize={v}", rrq_opt(("blksize", v)), {"blksize": v} if ok else None)
      for v, ok in [("0", False), ("7", False), ("8", True), ("65464", True),
                    ("65465", False), ("-1", False), ("abc", False), ("1e3", False),
                    ("1" * 20, False), ("", False)]],
    # timeout values
    *[served(f"timeout={v}", rrq_opt(("timeout", v)), {"timeout": v} if ok else None)
      for v, ok in [("0", False), ("1", True), ("255", True), ("256", False),
                    ("5.5", False)]],
    # tsize on WRQ: -1 is ignored; more than any disk is refused before any data moves
    served("wrq-tsize=-1", wrq_opt("tsize-minus-one.bin", ("tsize", "-1")), None, upload=True),
    refused("wrq-tsize=10**30", wrq_opt("tsize-huge.bin", ("tsize", str(10 ** 30))), 3),
    refused("wrq-tsize=2**64", wrq_opt("tsize-2-64.bin", ("tsize", str(2 ** 64))), 3),
    # windowsize out of range, both directions
    served("windowsize=0", rrq_opt(("windowsize", "0"))),
    served("windowsize=65536", rrq_opt(("windowsize", "65536"))),
    served("wrq-windowsize=0", wrq_opt("ws0.bin", ("windowsize", "0")), None, upload=True),
    served("wrq-windowsize=65536", wrq_opt("ws65536.bin", ("windowsize", "65536")), None,
           upload=True),
    # an unknown option with a 600-byte value
    served("utimeout-600-bytes", rrq_opt(("utimeout", "9" * 600))),
    served("utimeout-600-bytes-and-blksize", rrq_opt(("utimeout", "9" * 600),
                                                     ("blksize", "1024")), {"blksize": "1024"}),
    # names that try to leave the root
    refused("dotdot", rrq(".."), 2),
    refused("slash-dotdot-slash", rrq("/../"), 2),
    refused("slash-dotdot-etc-passwd", rrq("/../../../etc/passwd"), 2),
    refused("a-dotdot-dotdot", rrq("a/../../outside.txt"), 2),
    refused("dotdot-outside", rrq("../outside.txt"), 2),
    refused("backslash-dotdot", rrq("\\..\\outside.txt"), 1),
    refused("backslash-dotdot-2", rrq("..\\..\\outside.txt"), 1),
    refused("percent-2e", rrq("%2e%2e/outside.txt"), 1),
    refused("percent-2f", rrq("..%2f..%2foutside.txt"), 1),
    refused("dots-and-slashes", rrq("....//outside.txt"), 1),
    refused("wrq-dotdot", wrq("../planted.bin"), 2),
    refused("wrq-a-dotdot-dotdot", wrq("a/../../planted.bin"), 2),
    # a NUL inside the name ends the name: the rest cannot smuggle a path in
    nothing("nul-in-name-odd", b"\x00\x01small.bin\x00../outside.txt\x00octet\x00"),
    served("nul-in-name-as-option", b"\x00\x01small.bin\x00octet\x00../outside.txt\x00octet\x00"),
    nothing("nul-in-name-empty-mode", b"\x00\x01../outside.txt\x00\x00octet\x00"),
    # modes
    served("mode-OCTET", raw(1, b"small.bin", b"OcTeT")),
    refused("mode-600-bytes", raw(1, b"small.bin", b"m" * 600), 4),
]


def _collect(peer: Peer, window: float) -> List[Tuple[Packet, tuple]]:
    """Every packet within ``window`` s of the last one (bounded)."""
    out = []
    for _ in range(100):
        got = peer.recv(window)
        if got is None:
            return out
        out.append(got)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request(server: ServerProcess, case: Case) -> None:
    with Peer(server.addr, timeout=5.0) as peer:
        for d in case.datagrams:
            peer.send(d)
        if case.expect == "NOTHING":
            assert peer.listen(0.3) == [], f"{case.name} was answered"
        elif case.expect == "ERROR":
            first = peer.recv(5.0)
            assert first is not None, f"no answer to {case.name}"
            answers = [first] + _collect(peer, 0.3)
            got = [(p.op, p.code) for p, _ in answers]
            assert len(got) == 1 and got[0][0] == ERROR and got[0][1] in case.codes, got
            assert SECRET.decode() not in answers[0][0].message
            assert str(server.root.parent) not in answers[0][0].message
        else:
            first, tid = peer.expect(what=f"an answer to {case.name}")
            assert tid[0] == server.host and tid[1] != server.port
            if case.upload:
                assert first.op == (OACK if case.oack else ACK), first
                if case.oack:
                    assert first.options == case.oack
                payload = os.urandom(1300)
                finish_upload(peer, tid, payload)
                name = case.datagrams[0][2:].split(b"\0")[0].decode()
                assert (server.upload / name).read_bytes() == payload
            else:
                if case.oack is None:
                    assert first.op == DATA and first.block == 1, first
                else:
                    assert first.op == OACK and first.options == case.oack, first
                blksize = int((case.oack or {}).get("blksize", 512))
                assert finish_download(peer, first, tid, blksize) == SMALL
    planted = [p for p in (server.root.parent.glob("planted*"))]
    assert planted == []
    still_serves(server)


# -- inside a transfer ---------------------------------------------------------------------------
def test_error_with_600_byte_message_ends_a_transfer_quietly(server: ServerProcess) -> None:
    with Peer(server.addr) as peer:
        peer.send(rrq("small.bin", options={"timeout": "10"}))
        _, tid = peer.expect(op=OACK)
        peer.send(ack(0), tid)
        peer.expect(op=DATA)
        peer.send(error(0, "X" * 600), tid)
        assert peer.listen(0.5) == [], "the server answered the client's ERROR"
    line = server.wait_for_log(rf":{peer.port} RRQ small\.bin ended by client")
    assert len(line) < 400, "the client's message was logged in full"
    # the same message as a stranger to a live transfer: no answer (no error loop)
    with Peer(server.addr) as peer, Peer(server.addr) as stranger:
        peer.send(rrq("small.bin", options={"timeout": "10"}))
        _, tid = peer.expect(op=OACK)
        stranger.send(error(0, "Y" * 600), tid)
        assert stranger.listen(0.3) == []
        assert finish_download(peer, Packet(OACK), tid) == SMALL
    still_serves(server)


def test_ack_for_a_future_block_is_ignored(server: ServerProcess) -> None:
    with Peer(server.addr) as peer:
        peer.send(rrq("small.bin", options={"timeout": "10"}))
        _, tid = peer.expect(op=OACK)
        peer.send(ack(0), tid)
        d1, _ = peer.expect(op=DATA)
        assert d1.block == 1
        for block in (2, 3, 4, 5, 100, 65535):
            peer.send(ack(block), tid)          # blocks not sent yet
        assert peer.listen(0.4) == [], "a future ACK moved the transfer or got an answer"
        got = bytearray(d1.payload)
        peer.send(ack(1), tid)
        for block in range(2, 10):
            pkt, _ = peer.expect(op=DATA)
            assert pkt.block == block
            got += pkt.payload
            peer.send(ack(block), tid)
            if len(pkt.payload) < 512:
                break
    assert bytes(got) == SMALL
    still_serves(server)


def test_data_for_a_future_block_reports_the_gap_once(server: ServerProcess) -> None:
    payload = os.urandom(2000)
    with Peer(server.addr) as peer:
        peer.send(wrq("future.bin", options={"timeout": "10"}))
        _, tid = peer.expect(op=OACK)
        peer.send(data(1, payload[:512]), tid)
        pkt, _ = peer.expect(op=ACK)
        assert pkt.block == 1
        for _ in range(3):
            peer.send(data(3, payload[1024:1536]), tid)     # block 2 "lost"
        answers = peer.listen(0.4)
        assert [(p.op, p.block) for p, _ in answers] == [(ACK, 1)]
        for index in range(2, 5):
            peer.send(data(index, payload[(index - 1) * 512:index * 512]), tid)
            pkt, _ = peer.expect(op=ACK)
            assert pkt.block == index
    assert (server.upload / "future.bin").read_bytes() == payload
    still_serves(server)


def test_duplicate_wrq_from_the_same_port_is_not_a_second_transfer(server: ServerProcess) -> None:
    payload = os.urandom(3000)
    with Peer(server.addr) as peer:
        request = wrq("dup-wrq.bin", options={"timeout": "10"})
        peer.send(request)
        _, tid = peer.expect(op=OACK)
        for _ in range(3):
            peer.send(request)
        assert peer.listen(0.4) == [], "the repeated WRQ got an answer"
        finish_upload(peer, tid, payload)
        assert peer.listen(0.3) == []
        assert peer.sources() == {tid}
    assert (server.upload / "dup-wrq.bin").read_bytes() == payload
    temps = [p.name for p in server.upload.iterdir() if p.name.startswith(".tftpd-")]
    assert temps == []
    still_serves(server)


def test_error_right_after_oack_of_a_wrq(server: ServerProcess) -> None:
    with Peer(server.addr) as peer:
        peer.send(wrq("aborted.bin", options={"tsize": "5000", "timeout": "10"}))
        pkt, tid = peer.expect(op=OACK)
        assert pkt.options == {"tsize": "5000", "timeout": "10"}
        peer.send(error(0, "changed my mind"), tid)
        assert peer.listen(0.5) == [], "the OACK was sent again after the client's ERROR"
    server.wait_for_log(rf":{peer.port} WRQ aborted\.bin ended by client")
    names = [p.name for p in server.upload.iterdir()]
    assert "aborted.bin" not in names and not any(n.startswith(".tftpd-") for n in names)
    still_serves(server)
