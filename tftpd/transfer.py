"""The transfer engine: a sender (RRQ) and a receiver (WRQ) with no I/O.

A transfer is driven by three calls, as aioquic drives a connection:

* ``start(now)`` sends the first packet (OACK, first DATA or ACK 0);
* ``receive(datagram, addr, now)`` handles one datagram from any address;
* ``on_timer(now)`` is called once ``now >= deadline``.

Packets leave through the ``transmit(packet, addr)`` callback given to the
constructor, one per datagram: a buffer (a DATA packet is a memoryview of
the source's buffer, header included, so the driver hands it to ``sendto``
without copying) or, from a mapped source, a (header, payload) pair for one
``sendmsg``; the callback must be done with it when it returns.  Time is
whatever the caller says it is: tests move it by hand.

Both sides follow RFC 1350 with RFC 1123 4.2.3 (adaptive timeout with backoff,
no retransmission on a duplicate ACK), RFC 7440 windows (go-back-N from the
first block the peer did not acknowledge) and block numbers that wrap past
65535 (to 0, or to 1 with ``rollover=1``).
"""

from __future__ import annotations

import errno
import math
import struct

from .packets import ErrorCode, Opcode, error_packet

# Types are for mypy only: importing typing costs every inetd start ~4 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Generator, List, Optional, Protocol, Tuple, Union

    Address = Tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)
    Buffer = Union[bytes, bytearray, memoryview]
    Packet = Union[Buffer, Tuple[Buffer, Buffer]]    # one buffer, or header + payload
    Transmit = Callable[[Packet, Address], None]
else:
    Protocol = object          # Source and Sink: plain classes at run time

__all__ = ["Outcome", "Rto", "Sender", "Receiver", "Source", "Sink", "FIRST_REPLY_TIMEOUTS",
           "stray_reply"]

_DATA_HDR = struct.Struct("!HH")
_ERR_TID = error_packet(ErrorCode.UNKNOWN_TID, "Unknown transfer ID")

# A peer that has never answered gets its first reply (OACK or DATA 1 or
# ACK 0) at most this many times: a spoofed request cannot make the server
# send more than that many datagrams to its victim.
FIRST_REPLY_TIMEOUTS = 3

_INF = math.inf

MIN_RTO = 0.2
MAX_RTO = 64.0


SHRANK = "file shrank while being sent"


def send_failed(e: OSError) -> None:
    """A DATA send failed: EFAULT (a mapped page left the file) is raised as
    the read error it is; anything else (ENOBUFS, EPERM from a firewall...)
    is a lost datagram, which the timer resends."""
    if e.errno == errno.EFAULT:
        raise OSError(errno.EIO, SHRANK) from None


def wire_length(packet: Packet) -> int:
    """Bytes on the wire of a packet as sources give them (buffer or pair)."""
    if type(packet) is tuple:
        return len(packet[0]) + len(packet[1])
    return len(packet)


def stray_reply(data: Buffer) -> Optional[bytes]:
    """The answer to a datagram from another TID: ERROR 5, unless it is an
    ERROR itself (two servers must never trade errors)."""
    if len(data) >= 2 and data[0] == 0 and data[1] == Opcode.ERROR:
        return None
    return _ERR_TID


class Outcome:
    """How a transfer stands: one of these strings (not an enum: see
    packets.Opcode)."""
    RUNNING = "running"
    OK = "ok"
    TIMEOUT = "timeout"
    PEER_ERROR = "peer error"     # the peer sent ERROR (a tsize probe, an abort)
    ERROR = "error"               # we sent ERROR (bad packet, disk full, ...)


class Rto:
    """Retransmission timeout (RFC 1123 4.2.3.2 / RFC 6298 style).

    Starts at ``initial``; round-trip samples adapt it within
    [MIN_RTO, MAX_RTO]; each timeout doubles it.  A client's ``timeout``
    option makes it ``fixed``.  An ``initial`` beyond either bound (``-t``
    takes 0.01 to 255 s) widens that bound, so doubling never makes the
    timeout shorter than the one the administrator asked for.
    """

    __slots__ = ("value", "fixed", "srtt", "rttvar", "floor", "cap")

    def __init__(self, initial: float, fixed: bool = False,
                 floor: float = MIN_RTO) -> None:
        self.value = initial
        self.fixed = fixed
        # (conditionals, not min/max: this runs once per transfer, also per small file)
        self.floor = floor if floor < initial else initial
        self.cap = MAX_RTO if MAX_RTO > initial else initial
        self.srtt = -1.0
        self.rttvar = 0.0

    def sample(self, rtt: float) -> None:
        if self.fixed:
            return
        if self.srtt < 0:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar += 0.25 * (abs(self.srtt - rtt) - self.rttvar)
            self.srtt += 0.125 * (rtt - self.srtt)
        v = self.srtt + 4 * self.rttvar
        self.value = self.floor if v < self.floor else self.cap if v > self.cap else v

    def backoff(self) -> None:
        if not self.fixed:
            v = self.value * 2
            self.value = v if v < self.cap else self.cap


class Source(Protocol):
    """File data for a sender as DATA packets (index 1 is the first block).

    ``packet(index, number)`` is the DATA packet of block ``index`` with wire
    block number ``number`` (one buffer, or a (header, payload) tuple to be
    sent with one ``sendmsg``); a payload shorter than blksize ends the file.
    ``Sender.pump`` asks for the next window's first packet while it waits
    for the ACK (a source that reads in runs thereby reads ahead), so a
    packet must stay valid until the next call, whatever is sent meanwhile.
    A source may also offer ``run(index, number)``, the packets of blocks
    ``index``, ``index + 1``... that it holds, numbered from ``number`` (no
    wrap within), valid until its next call: the pump then indexes a list.
    """

    def packet(self, index: int, number: int) -> Packet: ...


class Sink(Protocol):
    """Where a receiver puts data; ``finish`` makes it durable and visible."""

    def write(self, data: memoryview) -> None: ...

    def finish(self) -> None: ...


class _Wire:
    """Block numbers on the wire: 16 bits, wrapping to 0 or (rollover=1) to 1."""

    __slots__ = ("modulus", "base")

    def __init__(self, rollover: int) -> None:
        self.base = 1 if rollover == 1 else 0
        self.modulus = 65535 if rollover == 1 else 65536

    def number(self, index: int) -> int:
        if index <= 65535:
            return index
        return (index - self.base) % self.modulus + self.base

    def distance(self, wire: int, index: int) -> int:
        """Steps forward from block ``index`` to the next block numbered ``wire``."""
        return (wire - self.base - (index - self.base)) % self.modulus


_WIRES = (_Wire(0), _Wire(1))     # (immutable: shared by every transfer)


class _Transfer:
    """What a sender and a receiver share: peer check, timer, outcome."""

    def __init__(self, peer: Address, transmit: Transmit, rto: Rto,
                 max_timeouts: int, rollover: int, first: Optional[bytes]) -> None:
        self.peer = peer
        self.transmit = transmit
        self.rto = rto
        most = self.max_timeouts = max_timeouts if max_timeouts > 1 else 1
        self.first_timeouts = most if most < FIRST_REPLY_TIMEOUTS else FIRST_REPLY_TIMEOUTS
        self.wire = _WIRES[rollover == 1]
        self.first = first              # OACK bytes, if options were acked
        self.deadline = math.inf
        self.timeouts = 0
        self.answered = False           # has the peer ever sent us a valid packet
        # when we sent what the peer first answered (its answer came after)
        self.answered_after: Optional[float] = None
        self.retransmitted = False      # Karn: no RTT sample after a resend
        self.sent_at = 0.0
        self.outcome = Outcome.RUNNING
        self.message = ""               # why it ended, for the log
        self.completed_at: Optional[float] = None
        self.retransmits = 0

    @property
    def done(self) -> bool:
        return self.deadline == math.inf

    @property
    def all_sent(self) -> bool:
        """Is every block out, so that only the peer's last ACKs are awaited?"""
        return False

    def _finish(self, outcome: str, message: str = "",
                error: Optional[Tuple[int, str]] = None) -> None:
        if error is not None:
            self.transmit(error_packet(error[0], error[1]), self.peer)
        if self.outcome == Outcome.RUNNING:
            self.outcome = outcome
            self.message = message
        self.deadline = math.inf

    def abort(self, code: int, message: str) -> None:
        """End the transfer with an ERROR to the peer (e.g. on shutdown)."""
        if self.outcome != Outcome.RUNNING:
            self.deadline = math.inf      # dallying after success: just stop
        elif not self.done:
            self._finish(Outcome.ERROR, message, (code, message))

    def _stray(self, data: Buffer, addr: Address) -> None:
        """A datagram from another TID: answer ERROR 5 unless it is an ERROR."""
        reply = stray_reply(data)
        if reply is not None:
            self.transmit(reply, addr)

    def _peer_error(self, data: Buffer) -> None:
        code = data[2] << 8 | data[3] if len(data) >= 4 else 0
        text = bytes(data[4:]).split(b"\0", 1)[0].decode("utf-8", "replace")
        self._finish(Outcome.PEER_ERROR, f"peer sent error {code}: {text[:120]}")

    def _illegal(self, what: str) -> None:
        self._finish(Outcome.ERROR, what, (ErrorCode.ILLEGAL_OPERATION, what))

    def _timed_out(self) -> bool:
        """Count one timeout; True if the transfer is abandoned."""
        self.timeouts += 1
        limit = self.max_timeouts if self.answered else self.first_timeouts
        if self.timeouts >= limit:
            self._finish(Outcome.TIMEOUT, f"no answer after {self.timeouts} timeouts")
            return True
        self.rto.backoff()
        self.retransmitted = True
        self.retransmits += 1
        return False


class Sender(_Transfer):
    """Serves a read request: sends DATA, receives ACK.

    ``receive`` handles a steady-state ACK inline (the per-block path: no
    further calls but the source, the RTT sample and ``transmit``); every
    other case goes through ``_other``.
    """

    def __init__(self, source: Source, peer: Address, transmit: Transmit, *,
                 blksize: int = 512, windowsize: int = 1, rollover: int = 0,
                 rto: Rto, max_timeouts: int = 6, oack: Optional[bytes] = None) -> None:
        super().__init__(peer, transmit, rto, max_timeouts, rollover, oack)
        self.source = source
        self.blksize = blksize
        self.window = windowsize
        self.base = 1          # oldest block not yet acknowledged
        self.next = 1          # next block to send
        self.last = 0          # index of the final (short) block, once known
        self.last_len = 0
        self.waiting_oack = oack is not None
        self.modulus = self.wire.modulus

    @property
    def all_sent(self) -> bool:
        # ``last`` is set just before the final block goes out, so this is
        # true before the peer can answer it (the request loop asks while
        # this thread may still be inside that send)
        return self.last > 0

    @property
    def bytes(self) -> int:
        """File bytes the peer has acknowledged."""
        if self.last and self.base > self.last:
            return (self.last - 1) * self.blksize + self.last_len
        return (self.base - 1) * self.blksize

    def start(self, now: float) -> None:
        if self.waiting_oack:
            assert self.first is not None
            self.transmit(self.first, self.peer)
            self.sent_at = now
            self.deadline = now + self.rto.value
        else:
            self._send_window(now)

    def _send_window(self, now: float) -> None:
        """Send every block from ``next`` up to the end of the window."""
        end = self.base + self.window
        if self.last and end > self.last + 1:
            end = self.last + 1
        index = self.next
        if index >= end:
            return
        packet, transmit, peer = self.source.packet, self.transmit, self.peer
        full = self.blksize + 4
        try:
            while index < end:
                pkt = packet(index, index if index <= 65535 else self.wire.number(index))
                n = wire_length(pkt)
                if n < full:              # (set before it goes: see all_sent)
                    self.last = index
                    self.last_len = n - 4
                transmit(pkt, peer)
                index += 1
                if n < full:
                    break
        except OSError as e:
            self._finish(Outcome.ERROR, f"read failed: {e.strerror or e}",
                         (ErrorCode.UNDEFINED, "Read error"))
            return
        self.next = index
        self.sent_at = now
        self.deadline = now + self.rto.value

    def receive(self, data: Buffer, addr: Address, now: float) -> None:
        if (addr != self.peer or len(data) < 4 or data[1] != 4 or data[0]
                or self.waiting_oack or self.deadline == _INF):
            self._other(data, addr, now)
            return
        # An ACK in the data phase.
        base = self.base
        acked = base + ((data[2] << 8 | data[3]) - base) % self.modulus
        if acked >= self.next:
            return    # duplicate or future ACK: never retransmit on it (RFC 1123)
        rto = self.rto
        if self.retransmitted:
            self.retransmitted = False
        else:
            rto.sample(now - self.sent_at)
        if not self.answered:
            self.answered = True
            self.answered_after = self.sent_at
        self.timeouts = 0
        self.deadline = now + rto.value
        self.base = acked + 1
        if acked == self.last:
            self.completed_at = now
            self._finish(Outcome.OK)
            return
        if acked + 1 < self.next:
            self.next = acked + 1        # the peer reported a gap: go back
        self._send_window(now)

    def pump(self, recv: Callable[[], int], send: Callable[[Any], object],
             buf: bytearray, clock: Callable[[], float]) -> int:
        """The per-block path, for a driver whose socket hears only the peer.

        Reads datagrams into ``buf`` with ``recv()`` (which blocks for at most
        the current timeout and raises when it expires) and answers each ACK of
        a whole window with the next window through ``send(packet)`` (to the
        peer: a write on the connected socket, gathered for a source whose
        ``gathered`` is true), all without returning and with
        the transfer's state in local variables: this is ``_ack`` and
        ``_send_window`` for the case that is nearly every block, written out
        so that a block costs no Python call but ``source.packet``.

        Returns the length of a datagram it leaves in ``buf`` for ``receive``
        (anything but such an ACK: an ERROR, a gap, the final ACK, a duplicate
        ...), or -1 when the driver must re-arm its timer (the retransmission
        timeout changed).  Any state in which this shortcut does not apply
        (waiting for ACK 0, after a timeout, ...) hands the first datagram
        straight back.
        """
        try:
            next(self.steps(recv, send, buf, clock, False))
        except StopIteration as e:
            return e.value        # type: ignore[no-any-return]
        raise AssertionError("steps() waited without being asked to")

    def steps(self, recv: Callable[[], int], send: Callable[[Any], object],
              buf: bytearray, clock: Callable[[], float],
              wait: bool) -> Generator[None, None, int]:
        """``pump`` as a generator, for a multiplexer (``wait`` true): it
        yields before each ``recv()`` until the socket is readable, with
        ``deadline`` current there (for the multiplexer's timer), and returns
        what ``pump`` returns.  Closed while it waits (the timer
        expired), it writes the state back as ``pump`` does on returning.
        Without ``wait`` it never yields: ``pump`` is that case."""
        rto = self.rto
        if (self.waiting_oack or self.retransmitted or not self.answered
                or self.deadline == _INF or self.last):
            if wait:
                yield
            return recv()
        base, nxt, window, modulus = self.base, self.next, self.window, self.modulus
        wrap = self.wire.base
        sent_at = self.sent_at
        fixed, floor, cap = rto.fixed, rto.floor, rto.cap
        srtt, rttvar, value = rto.srtt, rto.rttvar, rto.value
        v = value
        source: Any = self.source
        run = getattr(source, "run", None)
        if run is None:
            packet = source.packet

            def run(index: int, number: int) -> List[Packet]:
                return [packet(index, number)]
        size = wire_length if getattr(source, "gathered", False) else len
        full = self.blksize + 4
        last = 0
        moved = False
        pack = _DATA_HDR.pack
        head = memoryview(buf)[:4]
        wire_number = self.wire.number                  # (per run; inline per window below)
        expect = pack(4, wire_number(nxt - 1))          # the ACK that moves the window
        pkts: Any = ()            # the packets made of blocks lo .. hi - 1
        lo = hi = 0
        failed: Optional[OSError] = None
        try:
            while True:
                if wait:
                    self.deadline = sent_at + v   # (for the multiplexer's timer)
                    yield
                n = recv()
                if n != 4 or head != expect:
                    return n          # not that ACK (a duplicate, a gap...): the general path
                # The block's critical path is read ACK -> send DATA: the
                # packets are made a run at a time, the next window's first
                # before the ACK comes, and the round trip is sampled once
                # the window is out.
                moved = True
                base = index = nxt
                end = base + window
                try:
                    while index < end:
                        if index >= hi:
                            pkts = run(index, wire_number(index))
                            lo, hi = index, index + len(pkts)
                        pkt = pkts[index - lo]
                        n = size(pkt)
                        if n < full:          # the final block: known before it goes
                            last = self.last = index      # (see all_sent)
                            self.last_len = n - 4
                        try:
                            send(pkt)
                        except OSError as e:
                            send_failed(e)
                        index += 1
                        if last:
                            break
                except OSError as e:
                    failed = e
                nxt = index
                now = clock()
                index -= 1            # the last block sent
                expect = pack(4, index if index <= 65535 else (index - wrap) % modulus + wrap)
                if not fixed:         # Rto.sample (RFC 6298)
                    rtt = now - sent_at
                    if srtt < 0:
                        srtt, rttvar = rtt, rtt / 2
                    else:
                        rtt -= srtt
                        rttvar += 0.25 * ((rtt if rtt > 0 else -rtt) - rttvar)
                        srtt += 0.125 * rtt
                    v = srtt + 4 * rttvar
                    v = floor if v < floor else cap if v > cap else v
                sent_at = now
                if failed is not None:
                    self._finish(Outcome.ERROR, f"read failed: {failed.strerror or failed}",
                                 (ErrorCode.UNDEFINED, "Read error"))
                    return -1
                if last or v != value:
                    return -1         # the end is in flight, or the timer moved
                if nxt >= hi:         # the next window's first packet, while the peer works
                    try:
                        pkts = run(nxt, wire_number(nxt))
                        lo, hi = nxt, nxt + len(pkts)
                    except OSError:
                        pass          # made again when due: the error is reported then
        finally:
            if moved:                 # write the state back
                self.base, self.next, self.sent_at = base, nxt, sent_at
                if not fixed:
                    rto.srtt, rto.rttvar, rto.value = srtt, rttvar, v
                if self.deadline != _INF:     # (timeouts is 0: pump starts after an answer)
                    self.deadline = sent_at + v

    def _other(self, data: Buffer, addr: Address, now: float) -> None:
        if addr != self.peer:
            self._stray(data, addr)
            return
        if self.done:
            return
        n = len(data)
        if n >= 2 and data[0] == 0 and data[1] == 5:
            self._peer_error(data)    # even a truncated ERROR is never answered
            return
        if n >= 4 and data[0] == 0 and data[1] == 4:     # waiting for ACK 0
            if data[2] == 0 and data[3] == 0:
                self.waiting_oack = False
                if self.retransmitted:
                    self.retransmitted = False
                else:
                    self.rto.sample(now - self.sent_at)
                self.answered = True
                self.answered_after = self.sent_at
                self.timeouts = 0
                self.deadline = now + self.rto.value
                self._send_window(now)
            return                       # not the ACK of our OACK: ignore
        self._illegal("Illegal TFTP operation: expected ACK")

    def on_timer(self, now: float) -> None:
        if now < self.deadline or self._timed_out():
            return
        if self.waiting_oack:
            assert self.first is not None
            self.transmit(self.first, self.peer)
            self.sent_at = now
            self.deadline = now + self.rto.value
        else:
            self.next = self.base
            self._send_window(now)


class Receiver(_Transfer):
    """Serves a write request: receives DATA, sends ACK; dallies at the end."""

    def __init__(self, sink: Sink, peer: Address, transmit: Transmit, *,
                 blksize: int = 512, windowsize: int = 1, rollover: int = 0,
                 rto: Rto, max_timeouts: int = 6, oack: Optional[bytes] = None,
                 dally: float = 2.0) -> None:
        super().__init__(peer, transmit, rto, max_timeouts, rollover, oack)
        self.sink = sink
        self.blksize = blksize
        self.window = windowsize
        self.received = 0            # last block written, in order
        self.unacked = 0             # blocks received since our last ACK
        self.gap_reported = False
        self.dally = dally
        self.dallying = False
        self.reacks = 0
        self.bytes = 0

    def _send_ack(self, now: float) -> None:
        if self.received == 0 and self.first is not None:
            self.transmit(self.first, self.peer)
        else:
            self.transmit(_DATA_HDR.pack(4, self.wire.number(self.received)), self.peer)
        self.unacked = 0
        self.sent_at = now

    def start(self, now: float) -> None:
        self._send_ack(now)
        self.deadline = now + self.rto.value

    def receive(self, data: Buffer, addr: Address, now: float) -> None:
        if addr != self.peer:
            self._stray(data, addr)
            return
        if self.done:
            return
        n = len(data)
        if n >= 4 and data[0] == 0:
            op = data[1]
            if op == 3:
                self._data(data, n, now)
                return
            if op == 5:
                if not self.dallying:
                    self._peer_error(data)
                return
        if self.dallying:
            return
        if n >= 2 and data[0] == 0 and data[1] == 5:
            self._peer_error(data)    # a truncated ERROR: still never answer it
            return
        self._illegal("Illegal TFTP operation: expected DATA")

    def _data(self, data: Buffer, n: int, now: float) -> None:
        if n - 4 > self.blksize:
            if not self.dallying:
                self._illegal("Illegal TFTP operation: DATA larger than blksize")
            return
        wire = data[2] << 8 | data[3]
        d = self.wire.distance(wire, self.received + 1)
        if self.dallying:
            if d != 0 and self.reacks < self.max_timeouts:   # the last block again
                self.reacks += 1
                self._send_ack(now)
            return
        if d == 0:
            if not self.retransmitted and self.unacked == 0:
                self.rto.sample(now - self.sent_at)
            self.retransmitted = False
            if not self.answered:
                self.answered = True
                self.answered_after = self.sent_at
            self.timeouts = 0
            self.gap_reported = False
            payload = memoryview(data)[4:n] if not isinstance(data, memoryview) else data[4:n]
            try:
                self.sink.write(payload)
                self.received += 1
                self.bytes += n - 4
                if n - 4 < self.blksize:
                    self.sink.finish()
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._finish(Outcome.ERROR, "disk full",
                                 (ErrorCode.DISK_FULL, "Disk full or allocation exceeded"))
                else:
                    self._finish(Outcome.ERROR, f"write failed: {e.strerror or e}",
                                 (ErrorCode.UNDEFINED, "Write failed"))
                return
            if n - 4 < self.blksize:
                # Complete before the final ACK leaves: the client may send its
                # next request the moment it arrives.
                self.completed_at = now
                self.outcome = Outcome.OK
                self.dallying = True
                self.deadline = now + self.dally
                self._send_ack(now)
                return
            self.unacked += 1
            if self.unacked >= self.window:
                self._send_ack(now)
            self.deadline = now + self.rto.value
        elif d < self.wire.modulus // 2:
            # A block from beyond a gap: report what we have, once per gap.
            if not self.gap_reported:
                self.gap_reported = True
                self._send_ack(now)
                self.deadline = now + self.rto.value
        else:
            # An old block again: our ACK was lost; acknowledge it again.
            self._send_ack(now)

    def on_timer(self, now: float) -> None:
        if now < self.deadline:
            return
        if self.dallying:
            self.deadline = math.inf
            return
        if self._timed_out():
            return
        self.gap_reported = False
        self._send_ack(now)
        self.deadline = now + self.rto.value

