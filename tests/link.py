"""A fake clock, a seeded lossy link and scripted TFTP clients for the engine.

As in h11's ``tests/helpers.py`` and aioquic's connection tests, nothing here
sleeps or touches a socket.  Time is a number that moves only from one event to
the next: a datagram arriving, or the server's or the client's timer firing.
The link decides the fate of every datagram from a seeded random schedule
(lost, delivered once, delivered twice, held back so that later datagrams
overtake it), and can also drop chosen datagrams by their sequence number.

The clients speak TFTP from the other side, written independently of the
engine: ``ReadClient`` reads from a :class:`tftpd.transfer.Sender` (RRQ),
``WriteClient`` writes to a :class:`tftpd.transfer.Receiver` (WRQ).  Both
follow RFC 1350 with RFC 7440 windows: the reader acknowledges at the end of
each window, on the final block, on a gap (once) and on an old block again; the
writer sends a window from the oldest unacknowledged block after each new ACK
and after each of its own timeouts, never on a duplicate ACK.
"""

from __future__ import annotations

import errno
import heapq
import math
import os
import random
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from tftpd.packets import oack_packet
from tftpd.transfer import Receiver, Rto, Sender

Address = Tuple[Any, ...]

SERVER: Address = ("192.0.2.69", 50069)     # the transfer's socket (its TID)
CLIENT: Address = ("192.0.2.1", 40001)      # the peer that made the request
STRANGER: Address = ("192.0.2.1", 40002)    # same host, another port

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
_HDR = struct.Struct("!HH")
INF = math.inf


# --------------------------------------------------------------------------- packets

def opcode(packet: bytes) -> int:
    return packet[0] << 8 | packet[1]


def number(packet: bytes) -> int:
    """Block number of a DATA or ACK, code of an ERROR."""
    return packet[2] << 8 | packet[3]


def data(block: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(DATA, block) + payload


def ack(block: int) -> bytes:
    return _HDR.pack(ACK, block)


def error(code: int, message: bytes = b"") -> bytes:
    return _HDR.pack(ERROR, code) + message + b"\0"


def wire_number(index: int, rollover: int = 0) -> int:
    """The number block ``index`` (1 is the first) carries on the wire."""
    if index < 65536:
        return index
    if rollover == 1:
        return 1 + (index - 65536) % 65535
    return index & 0xFFFF


# --------------------------------------------------------------------------- files

class Recorder:
    """A ``transmit`` callback that keeps a copy of every datagram, as sendto would."""

    def __init__(self) -> None:
        self.sent: List[Tuple[bytes, Address]] = []

    def __call__(self, packet: Any, addr: Address) -> None:
        data = b"".join(packet) if isinstance(packet, tuple) else bytes(packet)   # sendmsg's pairs
        self.sent.append((data, addr))

    def take(self) -> List[bytes]:
        """The datagrams sent since the last take (all of them to the peer)."""
        out = [p for p, a in self.sent if a == CLIENT]
        assert len(out) == len(self.sent), f"datagrams to other addresses: {self.sent}"
        self.sent.clear()
        return out


class BytesSource:
    """A fast in-memory source of DATA packets."""

    def __init__(self, content: bytes, blksize: int) -> None:
        self.view = memoryview(content)
        self.blksize = blksize
        self.calls = 0

    def packet(self, index: int, number: int) -> bytes:
        self.calls += 1
        off = (index - 1) * self.blksize
        return struct.pack("!HH", 3, number) + self.view[off:off + self.blksize]


class BytesSink:
    """Collects what a receiver writes; can fail like a full disk."""

    def __init__(self, fail_after: Optional[int] = None, err: int = errno.ENOSPC,
                 fail_on_finish: bool = False) -> None:
        self.data = bytearray()
        self.writes = 0
        self.finished = 0
        self.fail_after = fail_after          # raise once this many bytes are stored
        self.err = err
        self.fail_on_finish = fail_on_finish

    def write(self, chunk: memoryview) -> None:
        if self.fail_after is not None and len(self.data) + len(chunk) > self.fail_after:
            raise OSError(self.err, os.strerror(self.err))
        self.writes += 1
        self.data += chunk

    def finish(self) -> None:
        if self.fail_on_finish:
            raise OSError(self.err, os.strerror(self.err))
        self.finished += 1


# --------------------------------------------------------------------------- the link

@dataclass(frozen=True)
class Schedule:
    """What the link does to datagrams.

    ``loss``, ``dup`` and ``reorder`` are probabilities drawn from a
    ``random.Random(seed)``; a reordered datagram is held back by one to four
    latencies, so the ones after it overtake it.  ``drop`` names datagrams to
    discard for certain: ``("server", 3)`` is the fourth datagram the server
    sends (counting from 0), ``("client", 0)`` the first one the client sends.
    """
    seed: int = 0
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    latency: float = 0.01
    drop: FrozenSet[Tuple[str, int]] = frozenset()


class Link:
    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.rng = random.Random(schedule.seed)
        self.random = self.rng.random
        self.noisy = bool(schedule.loss or schedule.dup or schedule.reorder)
        self.queue: List[Tuple[float, int, Address, Address, bytes]] = []
        self.seq = 0
        self.count: Dict[str, int] = {"server": 0, "client": 0}
        self.lost = 0
        self.duplicated = 0
        self.reordered = 0

    def put(self, when: float, src: Address, dst: Address, payload: bytes) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (when, self.seq, src, dst, payload))

    def send(self, side: str, src: Address, dst: Address, payload: bytes, now: float) -> None:
        s = self.schedule
        n = self.count[side]
        self.count[side] = n + 1
        if s.drop and (side, n) in s.drop:
            self.lost += 1
            return
        if not self.noisy:
            self.put(now + s.latency, src, dst, payload)
            return
        r = self.random
        if r() < s.loss:
            self.lost += 1
            return
        delay = s.latency
        if r() < s.reorder:
            self.reordered += 1
            delay += s.latency * (1 + 3 * r())
        self.put(now + delay, src, dst, payload)
        if r() < s.dup:
            self.duplicated += 1
            self.put(now + s.latency * (1 + 3 * r()), src, dst, payload)


# --------------------------------------------------------------------------- clients

class _Client:
    def __init__(self, sim: "Sim", blksize: int, windowsize: int, rollover: int,
                 expect_oack: bool, timeout: float, max_timeouts: int) -> None:
        self.sim = sim
        self.blksize = blksize
        self.window = windowsize
        self.rollover = rollover
        self.expect_oack = expect_oack
        self.timeout = timeout
        self.max_timeouts = max_timeouts
        self.deadline = INF
        self.timeouts = 0
        self.done = False             # finished its side of the protocol
        self.failed = False           # gave up after max_timeouts
        self.server_error: Optional[bytes] = None
        self.violations: List[str] = []
        self.oacks = 0

    def send(self, payload: bytes) -> None:
        self.sim.client_send(payload)

    def violation(self, what: str) -> None:
        self.violations.append(f"t={self.sim.now:.3f}: {what}")

    def _screen(self, packet: bytes, src: Address) -> Optional[int]:
        """The opcode of a datagram to act on; None after a stray or an ERROR."""
        if src != SERVER:
            self.violation(f"datagram from {src}")
            return None
        op = opcode(packet) if len(packet) >= 2 else -1
        if op == ERROR:
            self.server_error = packet
            self.stop()
            return None
        return op

    def stop(self) -> None:
        self.deadline = INF


class ReadClient(_Client):
    """Reads a file from a Sender."""

    def __init__(self, sim: "Sim", blksize: int = 512, windowsize: int = 1,
                 rollover: int = 0, expect_oack: bool = False, timeout: float = 0.5,
                 max_timeouts: int = 8, dally: float = 10.0) -> None:
        super().__init__(sim, blksize, windowsize, rollover, expect_oack, timeout, max_timeouts)
        self.data = bytearray()
        self.expected = 1             # index of the next block wanted
        self.count = 0                # in-order blocks since our last ACK
        self.gap_acked = False
        self.dally = dally
        self.dallying = False
        self.acks = 0

    def _ack(self) -> None:
        self.acks += 1
        self.count = 0
        self.send(ack(wire_number(self.expected - 1, self.rollover)))

    def start(self, now: float) -> None:
        self.deadline = now + self.timeout

    def receive(self, packet: bytes, src: Address, now: float) -> None:
        op = self._screen(packet, src)
        if op is None:
            return
        if op == OACK:
            self.oacks += 1
            if not self.expect_oack:
                self.violation("OACK to a request without options")
            if self.expected == 1:
                self._ack()           # ACK 0, again if the OACK came again
                self.deadline = now + self.timeout
            return                    # else a late copy: the link duplicated it
        if op != DATA or len(packet) < 4:
            self.violation(f"unexpected packet {packet[:8]!r}")
            return
        if len(packet) - 4 > self.blksize:
            self.violation(f"DATA of {len(packet) - 4} bytes, blksize {self.blksize}")
            return
        if self.expected == 1 and self.expect_oack and not self.oacks:
            self.violation("DATA before the OACK")
        n = number(packet)
        if self.dallying or self.done:
            self._ack()               # our final ACK was lost: say it again
            return
        if n == wire_number(self.expected, self.rollover):
            self.data += packet[4:]
            self.expected += 1
            self.count += 1
            self.timeouts = 0
            self.gap_acked = False
            if len(packet) - 4 < self.blksize:
                self._ack()
                self.done = True
                self.dallying = True
                self.deadline = now + self.dally
                return
            if self.count >= self.window:
                self._ack()
            self.deadline = now + self.timeout
            return
        old = {wire_number(self.expected - j, self.rollover)
               for j in range(1, min(self.expected, 2 * self.window + 2))}
        if n in old:
            self._ack()
        elif not self.gap_acked:
            self.gap_acked = True
            self._ack()

    def on_timer(self, now: float) -> None:
        if self.dallying:
            self.dallying = False
            self.stop()
            return
        self.timeouts += 1
        if self.timeouts >= self.max_timeouts:
            self.failed = True
            self.stop()
            return
        if self.expected > 1 or self.oacks:
            self._ack()
        # else: a real client would send its RRQ again, to the request port
        self.gap_acked = False
        self.deadline = now + self.timeout


class WriteClient(_Client):
    """Writes a file to a Receiver."""

    def __init__(self, sim: "Sim", content: bytes, blksize: int = 512, windowsize: int = 1,
                 rollover: int = 0, expect_oack: bool = False, timeout: float = 0.5,
                 max_timeouts: int = 8) -> None:
        super().__init__(sim, blksize, windowsize, rollover, expect_oack, timeout, max_timeouts)
        self.content = memoryview(content)
        self.blocks = len(content) // blksize + 1
        self.base = 1
        self.next = 1
        self.started = False
        self.data_sent = 0

    def start(self, now: float) -> None:
        self.deadline = now + self.timeout

    def _send_window(self, now: float) -> None:
        end = min(self.base + self.window, self.blocks + 1)
        b = self.blksize
        for i in range(self.next, end):
            self.data_sent += 1
            self.send(_HDR.pack(DATA, wire_number(i, self.rollover))
                      + self.content[(i - 1) * b:i * b])
        self.next = end
        self.deadline = now + self.timeout

    def receive(self, packet: bytes, src: Address, now: float) -> None:
        op = self._screen(packet, src)
        if op is None:
            return
        if self.done:
            return
        if op == OACK:
            self.oacks += 1
            if not self.expect_oack:
                self.violation("OACK to a request without options")
            if not self.started:
                self.started = True
                self.timeouts = 0
                self._send_window(now)
            return                       # an OACK again: our timer will resend
        if op != ACK or len(packet) != 4:
            self.violation(f"unexpected packet {packet[:8]!r}")
            return
        n = number(packet)
        if not self.started:
            if n != 0:
                self.violation(f"ACK {n} before ACK 0")
                return
            if self.expect_oack:
                self.violation("ACK 0 where an OACK was expected")
            self.started = True
            self.timeouts = 0
            self._send_window(now)
            return
        acked = -1
        for k in range(self.next - 1, self.base - 2, -1):
            if k >= 0 and wire_number(k, self.rollover) == n:
                acked = k
                break
        if acked < self.base:
            return                       # duplicate or stale: never resend on it
        self.base = acked + 1
        self.timeouts = 0
        if acked == self.blocks:
            self.done = True
            self.stop()
            return
        self.next = self.base
        self._send_window(now)

    def on_timer(self, now: float) -> None:
        self.timeouts += 1
        if self.timeouts >= self.max_timeouts:
            self.failed = True
            self.stop()
            return
        if not self.started:
            self.deadline = now + self.timeout   # would resend the WRQ
            return
        self.next = self.base
        self._send_window(now)


# --------------------------------------------------------------------------- simulation

class Sim:
    """One engine and one client joined by a link, on a fake clock.

    Datagrams reach the engine as memoryviews of one reused receive buffer, as
    the real driver hands them over; nothing reaches an engine that is done
    (its socket would be closed).
    """

    def __init__(self, schedule: Schedule = Schedule(), start: float = 1000.0) -> None:
        self.link = Link(schedule)
        self.now = start
        self.engine: Any = None
        self.client: Any = None
        self.server_sent: List[Tuple[float, Address, bytes]] = []
        self.client_sent: List[Tuple[float, bytes]] = []
        self.server_received: List[Tuple[float, Address, bytes]] = []
        self.after_close = 0
        self.events = 0
        self._buf = bytearray(65536 + 4)
        self._view = memoryview(self._buf)

    # the engine's transmit callback
    def transmit(self, packet: Any, addr: Address) -> None:
        payload = bytes(packet)
        self.server_sent.append((self.now, addr, payload))
        self.link.send("server", SERVER, addr, payload, self.now)

    def client_send(self, payload: bytes) -> None:
        self.client_sent.append((self.now, payload))
        self.link.send("client", CLIENT, SERVER, payload, self.now)

    def inject(self, when: float, src: Address, payload: bytes) -> None:
        """Deliver ``payload`` from ``src`` to the server's socket at ``when``."""
        self.link.put(when, src, SERVER, payload)

    def run(self, max_time: float = 3600.0, max_events: int = 5_000_000) -> "Sim":
        q = self.link.queue
        engine, client = self.engine, self.client
        pop = heapq.heappop
        buf, view = self._buf, self._view
        events = 0
        engine.start(self.now)
        client.start(self.now)
        while True:
            t_net = q[0][0] if q else INF
            t_srv = engine.deadline
            t_cli = client.deadline
            t = t_net if t_net <= t_srv else t_srv
            if t_cli < t:
                t = t_cli
            if t == INF:
                break
            events += 1
            if t - self.now < -1e-9:
                raise AssertionError(f"time went backwards: {t} < {self.now}")
            if t > max_time + 1000.0 or events > max_events:
                raise AssertionError(f"simulation did not settle: t={t}, events={events}")
            if t > self.now:
                self.now = t
            if t_net == t:
                _, _, src, dst, payload = pop(q)
                if dst == SERVER:
                    self.server_received.append((t, src, payload))
                    if engine.done:
                        self.after_close += 1
                        continue
                    n = len(payload)
                    buf[:n] = payload
                    engine.receive(view[:n], src, t)
                elif dst == CLIENT:
                    client.receive(payload, src, t)
                # anything else (ERROR 5 to a stranger) goes nowhere
            elif t_srv == t:
                engine.on_timer(t)
            else:
                client.on_timer(t)
        self.events = events
        return self

    # what the server sent, for assertions
    def sent_to_client(self) -> List[bytes]:
        return [p for _, a, p in self.server_sent if a == CLIENT]

    def data_numbers(self) -> List[int]:
        return [number(p) for p in self.sent_to_client() if opcode(p) == DATA]


def make_oack(**options: Any) -> bytes:
    return oack_packet(tuple((k.encode(), str(v).encode()) for k, v in options.items()))


def read_sim(content: bytes, *, blksize: int = 512, windowsize: int = 1, rollover: int = 0,
             oack: Optional[bytes] = None, schedule: Schedule = Schedule(),
             rto: float = 1.0, max_timeouts: int = 6, source: Any = None,
             client: Optional[Callable[["Sim"], Any]] = None, **client_kw: Any) -> Sim:
    """A Sender serving ``content`` to a ReadClient over the link (not yet run)."""
    sim = Sim(schedule)
    sim.engine = Sender(source if source is not None else BytesSource(content, blksize),
                        CLIENT, sim.transmit, blksize=blksize, windowsize=windowsize,
                        rollover=rollover, rto=Rto(rto), max_timeouts=max_timeouts, oack=oack)
    sim.client = (client(sim) if client is not None else
                  ReadClient(sim, blksize, windowsize, rollover, oack is not None, **client_kw))
    return sim


def write_sim(content: bytes, *, blksize: int = 512, windowsize: int = 1, rollover: int = 0,
              oack: Optional[bytes] = None, schedule: Schedule = Schedule(),
              rto: float = 1.0, max_timeouts: int = 6, sink: Any = None, dally: float = 2.0,
              **client_kw: Any) -> Sim:
    """A WriteClient sending ``content`` to a Receiver over the link (not yet run)."""
    sim = Sim(schedule)
    sim.engine = Receiver(sink if sink is not None else BytesSink(), CLIENT, sim.transmit,
                          blksize=blksize, windowsize=windowsize, rollover=rollover,
                          rto=Rto(rto), max_timeouts=max_timeouts, oack=oack, dally=dally)
    sim.client = WriteClient(sim, content, blksize, windowsize, rollover, oack is not None,
                             **client_kw)
    return sim
