"""A small scripted TFTP peer over real UDP sockets, for the integration tests.

It has its own tiny codec (it must not trust the server's), records every
datagram it sends and receives, and never waits without a timeout: every
loop is bounded both in packets and in time, so a misbehaving server makes a
test fail, never hang.

    with Peer(server.addr) as peer:
        result = peer.download("file.bin", options={"blksize": "1024"})
        assert result.error is None and result.data == expected
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

Address = Tuple  # (host, port) or (host, port, flowinfo, scope_id)

_HDR = struct.Struct("!HH")


# -- codec ------------------------------------------------------------------
def request(opcode: int, name: str | bytes, mode: str = "octet",
            options: Optional[Mapping[str, str]] = None) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    parts = [raw, mode.encode()]
    for key, value in (options or {}).items():
        parts += [key.encode(), str(value).encode()]
    return struct.pack("!H", opcode) + b"".join(p + b"\0" for p in parts)


def rrq(name: str | bytes, mode: str = "octet",
        options: Optional[Mapping[str, str]] = None) -> bytes:
    return request(RRQ, name, mode, options)


def wrq(name: str | bytes, mode: str = "octet",
        options: Optional[Mapping[str, str]] = None) -> bytes:
    return request(WRQ, name, mode, options)


def data(block: int, payload: bytes) -> bytes:
    return _HDR.pack(DATA, block & 0xFFFF) + payload


def ack(block: int) -> bytes:
    return _HDR.pack(ACK, block & 0xFFFF)


def error(code: int, message: str = "") -> bytes:
    return _HDR.pack(ERROR, code) + message.encode() + b"\0"


@dataclass
class Packet:
    op: int
    block: int = 0                 # DATA / ACK
    payload: bytes = b""           # DATA
    code: int = 0                  # ERROR
    message: str = ""              # ERROR
    options: Dict[str, str] = field(default_factory=dict)   # OACK
    raw: bytes = b""


def parse(datagram: bytes) -> Packet:
    """Decode what a server sends; anything odd is an AssertionError."""
    assert len(datagram) >= 2, f"datagram of {len(datagram)} bytes"
    op = struct.unpack_from("!H", datagram)[0]
    if op in (DATA, ACK):
        assert len(datagram) >= 4, f"short {op} packet {datagram!r}"
        if op == ACK:
            assert len(datagram) == 4, f"ACK of {len(datagram)} bytes"
        block = _HDR.unpack_from(datagram)[1]
        return Packet(op, block=block, payload=datagram[4:], raw=datagram)
    if op == ERROR:
        assert len(datagram) >= 5 and datagram.endswith(b"\0"), f"bad ERROR {datagram!r}"
        code = _HDR.unpack_from(datagram)[1]
        text = datagram[4:-1]
        assert b"\0" not in text, f"ERROR message with NUL: {datagram!r}"
        return Packet(op, code=code, message=text.decode("utf-8", "replace"), raw=datagram)
    if op == OACK:
        body = datagram[2:]
        assert body.endswith(b"\0"), f"OACK not NUL-terminated: {datagram!r}"
        fields = body[:-1].split(b"\0")
        assert len(fields) % 2 == 0, f"OACK with odd fields: {datagram!r}"
        opts = {fields[i].decode().lower(): fields[i + 1].decode()
                for i in range(0, len(fields), 2)}
        return Packet(op, options=opts, raw=datagram)
    raise AssertionError(f"server sent opcode {op}: {datagram[:40]!r}")


# -- the peer ---------------------------------------------------------------
@dataclass
class Event:
    t: float
    direction: str          # "send" or "recv"
    addr: Address
    op: int
    block: int              # DATA/ACK block, ERROR code, else 0
    size: int               # datagram length
    raw: Optional[bytes]    # the datagram (None for bulk DATA when not recorded)


@dataclass
class Result:
    data: bytes = b""
    error: Optional[Packet] = None          # the ERROR the server sent, if any
    oack: Optional[Dict[str, str]] = None
    tid: Optional[Address] = None           # the server's transfer address
    data_packets: int = 0                   # DATA packets received (download)
    blocks: int = 0                         # distinct blocks delivered / sent
    timeouts: int = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class PeerTimeout(AssertionError):
    pass


def loopback_for(host: str) -> str:
    return "::1" if ":" in host else "127.0.0.1"


class Peer:
    """One client socket. ``server`` is the address of the request port."""

    def __init__(self, server: Address, *, timeout: float = 5.0,
                 record_data: bool = True, bind: Optional[str] = None) -> None:
        host = server[0]
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.server = (host, server[1])
        self.timeout = timeout
        self.record_data = record_data
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        self.sock.bind((bind or loopback_for(host), 0))
        self.address: Address = self.sock.getsockname()
        self.port: int = self.address[1]
        self.events: List[Event] = []
        self.t0 = time.monotonic()

    # context manager
    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- raw I/O -----------------------------------------------------------
    def _record(self, direction: str, addr: Address, datagram: bytes) -> None:
        op = datagram[1] if len(datagram) >= 2 and datagram[0] == 0 else -1
        block = _HDR.unpack_from(datagram)[1] if len(datagram) >= 4 else 0
        keep = self.record_data or op != DATA
        self.events.append(Event(time.monotonic() - self.t0, direction, addr, op, block,
                                 len(datagram), datagram if keep else None))

    def send(self, datagram: bytes, to: Optional[Address] = None) -> None:
        addr = to or self.server
        self.sock.sendto(datagram, addr)
        self._record("send", addr, datagram)

    def recv_raw(self, timeout: Optional[float] = None) -> Optional[Tuple[bytes, Address]]:
        """One datagram, or None after ``timeout`` seconds."""
        self.sock.settimeout(self.timeout if timeout is None else max(timeout, 0.001))
        try:
            datagram, addr = self.sock.recvfrom(65536 + 4)
        except socket.timeout:
            return None
        self._record("recv", addr, datagram)
        return datagram, addr

    def recv(self, timeout: Optional[float] = None) -> Optional[Tuple[Packet, Address]]:
        got = self.recv_raw(timeout)
        if got is None:
            return None
        return parse(got[0]), got[1]

    def expect(self, timeout: Optional[float] = None, *, op: Optional[int] = None,
               what: str = "a packet") -> Tuple[Packet, Address]:
        got = self.recv(timeout)
        if got is None:
            raise PeerTimeout(f"no {what} within {timeout or self.timeout} s")
        if op is not None and got[0].op != op:
            raise AssertionError(f"expected opcode {op} ({what}), got {got[0]}")
        return got

    def listen(self, duration: float, limit: int = 10000) -> List[Tuple[Packet, Address]]:
        """Everything that arrives within ``duration`` seconds (at most ``limit``)."""
        out: List[Tuple[Packet, Address]] = []
        end = time.monotonic() + duration
        while len(out) < limit:
            left = end - time.monotonic()
            if left <= 0:
                break
            got = self.recv(left)
            if got is None:
                break
            out.append(got)
        return out

    def received(self, op: Optional[int] = None) -> List[Event]:
        return [e for e in self.events
                if e.direction == "recv" and (op is None or e.op == op)]

    def sources(self) -> set:
        return {e.addr for e in self.events if e.direction == "recv"}

    # -- whole transfers ---------------------------------------------------
    def download(self, name: str | bytes, mode: str = "octet",
                 options: Optional[Mapping[str, str]] = None, *,
                 ack_copies: int = 1, max_retries: int = 6,
                 limit_s: float = 120.0) -> Result:
        """Fetch a file (RRQ); ACK each in-order block (``ack_copies`` times).

        Returns with ``error`` set if the server refuses or aborts.  Raises on
        a timeout (after ``max_retries`` resends of the last ACK) or when
        ``limit_s`` runs out.
        """
        self.send(rrq(name, mode, options))
        res = Result()
        pkt, addr = self.expect(op=None, what="reply to RRQ")
        res.tid = addr
        blksize, window = 512, 1
        out = bytearray()
        if pkt.op == ERROR:
            res.error = pkt
            return res
        if pkt.op == OACK:
            res.oack = pkt.options
            blksize = int(pkt.options.get("blksize", 512))
            window = int(pkt.options.get("windowsize", 1))
            self.send(ack(0), addr)
            pkt = None
        expected = 1                       # index of the next block we need
        last_acked = 0
        in_window = 0
        end = time.monotonic() + limit_s
        retries = 0
        hard_limit = 4 * (1 << 20)         # packets: bounds the loop whatever happens
        for _ in range(hard_limit):
            if pkt is None:
                if time.monotonic() > end:
                    raise PeerTimeout(f"download of {name!r} exceeded {limit_s} s")
                got = self.recv()
                if got is None:
                    retries += 1
                    res.timeouts += 1
                    if retries > max_retries:
                        raise PeerTimeout(f"download of {name!r}: no DATA after "
                                          f"{max_retries} resends of ACK {last_acked}")
                    self.send(ack(last_acked), res.tid)
                    continue
                pkt, addr = got
                if addr != res.tid:
                    pkt = None             # not from our transfer: ignore it
                    continue
            current, pkt = pkt, None
            if current.op == ERROR:
                res.error = current
                break
            assert current.op == DATA, f"expected DATA, got {current}"
            res.data_packets += 1
            retries = 0
            if current.block != expected & 0xFFFF:
                if in_window == 0 or window == 1:
                    self.send(ack(last_acked), res.tid)   # old block: re-ACK
                else:
                    self.send(ack(last_acked), res.tid)   # a gap: ask again
                    in_window = 0
                continue
            assert len(current.payload) <= blksize, "DATA larger than blksize"
            out += current.payload
            last_acked = expected
            expected += 1
            in_window += 1
            final = len(current.payload) < blksize
            if final or in_window >= window:
                for _ in range(ack_copies):
                    self.send(ack(last_acked), res.tid)
                in_window = 0
            if final:
                break
        res.data = bytes(out)
        res.blocks = expected - 1
        return res

    def upload(self, name: str | bytes, payload: bytes, mode: str = "octet",
               options: Optional[Mapping[str, str]] = None, *,
               stop_after: Optional[int] = None, max_retries: int = 6,
               limit_s: float = 120.0) -> Result:
        """Send a file (WRQ).  ``stop_after=N``: send N blocks, then go silent."""
        self.send(wrq(name, mode, options))
        res = Result()
        pkt, addr = self.expect(what="reply to WRQ")
        res.tid = addr
        if pkt.op == ERROR:
            res.error = pkt
            return res
        blksize, window = 512, 1
        if pkt.op == OACK:
            res.oack = pkt.options
            blksize = int(pkt.options.get("blksize", 512))
            window = int(pkt.options.get("windowsize", 1))
        else:
            assert pkt.op == ACK and pkt.block == 0, f"expected ACK 0 or OACK, got {pkt}"
        nblocks = len(payload) // blksize + 1          # a short (maybe empty) last block
        view = memoryview(payload)
        base = 1                                       # oldest unacknowledged block
        end = time.monotonic() + limit_s
        retries = 0
        sent = [0]                                     # highest block sent so far

        def send_window(first: int) -> None:
            for index in range(first, min(base + window, nblocks + 1)):
                if stop_after is not None and index > stop_after:
                    return
                chunk = view[(index - 1) * blksize:index * blksize]
                self.send(data(index, bytes(chunk)), res.tid)
                sent[0] = max(sent[0], index)

        send_window(base)
        for _ in range(4 * (1 << 20)):
            if base > nblocks:
                break
            if stop_after is not None and base > stop_after:
                res.blocks = stop_after
                return res
            if time.monotonic() > end:
                raise PeerTimeout(f"upload of {name!r} exceeded {limit_s} s")
            got = self.recv()
            if got is None:
                retries += 1
                res.timeouts += 1
                if retries > max_retries:
                    raise PeerTimeout(f"upload of {name!r}: no ACK for block {base}")
                send_window(base)
                continue
            pkt, addr = got
            if addr != res.tid:
                continue
            if pkt.op == ERROR:
                res.error = pkt
                return res
            assert pkt.op == ACK, f"expected ACK, got {pkt}"
            # which block does this ACK name? the one in [base-1, base+window-1]
            step = (pkt.block - (base - 1)) & 0xFFFF
            if step == 0 or step > sent[0] - (base - 1):
                continue                                # duplicate or stale ACK
            retries = 0
            base += step
            if base <= nblocks:
                send_window(base)       # the next window, or go back after a gap
        res.blocks = nblocks
        res.data = payload
        return res
