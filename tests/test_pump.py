"""Sender.pump, the per-block path for a connected socket, against the general path.

``pump`` handles the steady state of an RRQ (each ACK of a whole window) with
the transfer's state in local variables and hands everything else back to the
driver.  These tests drive two identical senders through the same datagrams
and timeouts on a fake clock, one through ``receive``/``on_timer`` only, the
other as ``worker.drive`` does on a connected socket (``pump``, then
``receive`` for what it hands back), and require the same datagrams sent in
answer to each event, and the same state in the end (inside ``pump`` the
state lives in local variables: it is written back when ``pump`` returns).
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from typing import Any, Callable, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from link import CLIENT, BytesSource, Recorder, ack, error, make_oack
from tftpd import files
from tftpd.transfer import Outcome, Rto, Sender

Event = Tuple[str, float, bytes]      # ("dgram", time, bytes) or ("timeout", 0.0, b"")


class GatheredSource(BytesSource):
    """Packets as (header, payload) pairs, as tftpd.files.MappedSource gives them."""

    gathered = True

    def packet(self, index: int, number: int) -> Tuple[bytes, memoryview]:   # type: ignore[override]
        self.calls += 1
        off = (index - 1) * self.blksize
        return struct.pack("!HH", 3, number), self.view[off:off + self.blksize]


def file_source(body: bytes, blksize: int) -> files.FileSource:
    """The server's own source of a file read in runs (``run()``), over a
    temporary file holding ``body``."""
    with tempfile.TemporaryFile() as f:
        f.write(body)
        f.flush()
        fd = os.dup(f.fileno())       # the source outlives the file object
    return files.FileSource(fd, blksize, len(body))


def make(body: bytes, blksize: int, windowsize: int, rollover: int, fixed: bool,
         oack: bool, kind: str = "buffers") -> Tuple[Sender, Recorder]:
    rec = Recorder()
    rto = Rto(0.5, fixed=True) if fixed else Rto(1.0)
    source: Any
    if kind == "runs":
        source = file_source(body, blksize)
    else:
        source = (GatheredSource if kind == "pairs" else BytesSource)(body, blksize)
    return Sender(source, CLIENT, rec, blksize=blksize,
                  windowsize=windowsize, rollover=rollover, rto=rto,
                  oack=make_oack(blksize=blksize) if oack else None), rec


def state(s: Sender) -> Tuple[Any, ...]:
    r = s.rto
    return (s.base, s.next, s.last, s.last_len, s.deadline, s.sent_at, s.timeouts,
            s.retransmitted, s.answered, s.waiting_oack, s.outcome, s.message,
            s.completed_at, r.value, r.srtt, r.rttvar)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def mark(rec: Recorder, i: int) -> None:
    """Note in the record that event ``i`` happens here."""
    rec.sent.append((b"event", ("#", i)))


def general(s: Sender, rec: Recorder, events: List[Event],
            deadlines: Optional[List[float]] = None) -> None:
    """Drive ``s`` through ``receive``/``on_timer`` only; ``deadlines``
    gets the deadline before each event."""
    s.start(0.0)
    for i, (kind, t, dgram) in enumerate(events):
        if s.done:
            break
        if deadlines is not None:
            deadlines.append(s.deadline)
        mark(rec, i)
        if kind == "timeout":
            s.on_timer(s.deadline)
        else:
            s.receive(memoryview(dgram), CLIENT, t)


def pumped(s: Sender, rec: Recorder, events: List[Event], stepped: bool = False,
           deadlines: Optional[List[float]] = None) -> None:
    """Drive ``s`` as worker.drive does on a connected socket: ``recv``
    replays the events (a datagram is copied into the buffer, a timeout
    raises as SO_RCVTIMEO does).  ``stepped``: through ``steps`` as the
    multiplexer does, which resumes it after each yield, and closes it
    there when the timer expires (a timeout event next); at each yield the
    sender's deadline must be the one ``deadlines`` (from ``general``) has
    for the next event, as the multiplexer's timer reads it there."""
    clock = Clock()
    buf = bytearray(1024)
    pending = list(enumerate(events))
    send: Callable[[Any], None] = lambda packet: rec(packet, CLIENT)   # noqa: E731

    def recv() -> int:
        if not pending:
            raise LookupError("no more events")
        i, (kind, t, dgram) = pending.pop(0)
        mark(rec, i)
        if kind == "timeout":
            raise BlockingIOError(errno.EAGAIN, "timed out")
        clock.now = t
        buf[:len(dgram)] = dgram
        return len(dgram)

    def stepping() -> int:
        steps = s.steps(recv, send, buf, clock, True)
        try:
            while True:
                next(steps)                     # waiting to read: the deadline is current
                if pending and deadlines is not None and pending[0][0] < len(deadlines):
                    assert s.deadline == deadlines[pending[0][0]]
                if pending and pending[0][1][0] == "timeout":
                    i, _ = pending.pop(0)
                    mark(rec, i)
                    steps.close()
                    raise BlockingIOError(errno.EAGAIN, "timed out")
        except StopIteration as e:
            return e.value                      # type: ignore[no-any-return]

    s.start(0.0)
    try:
        while not s.done:
            try:
                n = stepping() if stepped else s.pump(recv, send, buf, clock)
            except BlockingIOError:
                clock.now = s.deadline
                s.on_timer(s.deadline)
                continue
            if n >= 0:
                s.receive(memoryview(buf)[:n], CLIENT, clock.now)
    except LookupError:
        pass


KINDS = ["next"] * 12 + ["dup", "gap", "future", "error", "junk", "long", "timeout", "ack0"]


@st.composite
def scenario(draw: Any) -> Tuple[Tuple[Any, ...], List[Event]]:
    blksize = draw(st.sampled_from([1, 3, 8]))
    size = draw(st.integers(0, 40))
    windowsize = draw(st.sampled_from([1, 1, 2, 4]))
    fixed = draw(st.booleans())
    oack = draw(st.booleans())
    body = bytes(draw(st.binary(min_size=size, max_size=size)))
    setup = (body, blksize, windowsize, 0, fixed, oack)
    # The events are chosen against a reference sender as it goes, so that
    # most of them are the ACK that moves the window.
    ref, _ = make(*setup)
    ref.start(0.0)
    t = 0.0
    events: List[Event] = []
    for _ in range(draw(st.integers(1, 60))):
        if ref.done:
            break
        kind = draw(st.sampled_from(KINDS))
        t += draw(st.sampled_from([0.0001, 0.003, 0.02, 0.05]))
        if kind == "timeout":
            events.append(("timeout", 0.0, b""))
            ref.on_timer(ref.deadline)
            t = ref.deadline
            continue
        if kind == "next":
            dgram = ack((ref.next - 1) & 0xFFFF if not ref.waiting_oack else 0)
        elif kind == "dup":
            dgram = ack((ref.base - 1) & 0xFFFF)
        elif kind == "gap":
            dgram = ack((ref.base + draw(st.integers(0, 3))) & 0xFFFF)
        elif kind == "future":
            dgram = ack((ref.next + draw(st.integers(0, 3))) & 0xFFFF)
        elif kind == "error":
            dgram = error(draw(st.integers(0, 8)), b"stop")
        elif kind == "junk":
            dgram = draw(st.binary(max_size=6))
        elif kind == "long":
            dgram = ack((ref.next - 1) & 0xFFFF) + b"\0"
        else:
            dgram = ack(0)
        events.append(("dgram", t, dgram))
        ref.receive(memoryview(dgram), CLIENT, t)
    return setup, events


@pytest.mark.parametrize("stepped", [False, True], ids=["pump", "steps"])
@pytest.mark.parametrize("kind", ["buffers", "pairs", "runs"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=scenario())
def test_pump_behaves_exactly_as_the_general_path(case: Tuple[Tuple[Any, ...], List[Event]],
                                                  kind: str, stepped: bool) -> None:
    """... also when the pumped sender's source gives (header, payload) pairs
    (a mapped file), or runs of packets numbered at once (a file read in
    runs): the same datagrams, byte for byte; and so does ``steps`` as the
    multiplexer drives it, closed where the timer expires."""
    setup, events = case
    a, rec_a = make(*setup)
    b, rec_b = make(*setup, kind=kind)
    deadlines: List[float] = []
    try:
        general(a, rec_a, events, deadlines)
        pumped(b, rec_b, events, stepped, deadlines)
        assert rec_b.sent == rec_a.sent
        assert state(b) == state(a)
    finally:
        if kind == "runs":
            os.close(b.source.fd)


@pytest.mark.parametrize("rollover", [0, 1])
@pytest.mark.parametrize("windowsize", [1, 3])
@pytest.mark.parametrize("kind", ["buffers", "runs"])
def test_pump_follows_block_numbers_past_65535(rollover: int, windowsize: int, kind: str) -> None:
    """70,000 blocks of one byte: the wire numbers wrap to 0 (or 1) once
    (read in runs: a run that would cross 65535 stops there)."""
    body = bytes(i & 0xFF for i in range(70_000))
    a, rec_a = make(body, 1, windowsize, rollover, False, False)
    b, rec_b = make(body, 1, windowsize, rollover, False, False, kind=kind)
    a.start(0.0)
    t = 0.0
    events: List[Event] = []
    while not a.done:
        t += 0.0001
        dgram = ack(a.wire.number(a.next - 1))
        events.append(("dgram", t, dgram))
        a.receive(memoryview(dgram), CLIENT, t)
    assert a.outcome == Outcome.OK and a.bytes == len(body)
    pumped(b, rec_b, events)
    assert b.outcome == Outcome.OK and b.bytes == len(body)
    sent = [p for p, addr in rec_b.sent if addr == CLIENT]
    assert sent == [p for p, _ in rec_a.sent]
    assert state(b) == state(a)
    numbers = [p[2] << 8 | p[3] for p in sent]
    assert numbers[65534:65537] == ([65535, 0, 1] if rollover == 0 else [65535, 1, 2])


class FailingSource(BytesSource):
    def __init__(self, content: bytes, blksize: int, fail_at: int) -> None:
        super().__init__(content, blksize)
        self.fail_at = fail_at

    def packet(self, index: int, number: int) -> bytes:
        if index == self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        return super().packet(index, number)


def test_pump_read_error_ends_with_error_0_as_the_general_path_does() -> None:
    results = []
    for use_pump in (False, True):
        rec = Recorder()
        s = Sender(FailingSource(bytes(100), 8, 5), CLIENT, rec, blksize=8, rto=Rto(1.0))
        events: List[Event] = [("dgram", 0.001 * i, ack(i)) for i in range(1, 6)]
        (pumped if use_pump else general)(s, rec, events)
        results.append((rec.sent, s.outcome, s.message, s.done))
    assert results[0] == results[1]
    sent, outcome, message, done = results[1]
    assert outcome == Outcome.ERROR and "read failed" in message and done
    assert sent[-1][0].startswith(b"\x00\x05\x00\x00")   # ERROR 0 "Read error"
    assert sum(addr == CLIENT for _, addr in sent) == 5     # DATA 1-4, then the ERROR


def test_pump_leaves_everything_but_a_window_ack_to_the_general_path() -> None:
    """Before the peer has answered (ACK 0 of the OACK is due), pump reads one
    datagram and hands it back untouched."""
    s, rec = make(bytes(50), 8, 1, 0, False, True)
    s.start(0.0)
    before = state(s)
    buf = bytearray(16)
    n = s.pump(lambda: (buf.__setitem__(slice(0, 4), ack(0)), 4)[1], lambda p: None, buf,
               Clock())
    assert n == 4 and bytes(buf[:4]) == ack(0)
    assert state(s) == before
    assert [p[1] for p, _ in rec.sent] == [6]          # only the OACK so far


def pump_logged(s: Sender, acks: List[int], log: List[Tuple[str, Any]]) -> None:
    """Pump ``s`` through the ACKs of ``acks``, then a timeout, logging each
    ("recv", number) and each ("send", block number) in ``log``."""
    buf = bytearray(16)
    pending = iter(acks)

    def recv() -> int:
        number = next(pending, None)
        log.append(("recv", number))
        if number is None:
            raise BlockingIOError(errno.EAGAIN, "timed out")
        buf[:4] = ack(number)
        return 4

    def send(packet: Any) -> None:
        log.append(("send", packet[2] << 8 | packet[3]))

    with pytest.raises(BlockingIOError):
        s.pump(recv, send, buf, Clock())


@pytest.mark.parametrize("windowsize", [1, 4])
def test_pump_makes_the_next_packet_before_it_waits(windowsize: int) -> None:
    """Between sending a window and reading its ACK, pump already asks the
    source for the next window's first packet (a file is read ahead, off the
    ACK -> DATA path), and sends that very packet when the ACK comes."""
    w = windowsize
    log: List[Tuple[str, Any]] = []

    class Logged(BytesSource):
        def packet(self, index: int, number: int) -> bytes:
            log.append(("make", index))
            return super().packet(index, number)

    s = Sender(Logged(bytes(100), 4), CLIENT, Recorder(), blksize=4, windowsize=w,
               rto=Rto(1.0))
    s.start(0.0)
    s.receive(memoryview(ack(w)), CLIENT, 0.001)       # answered: pump applies from here
    log.clear()
    pump_logged(s, [2 * w, 3 * w], log)
    window = [e for i in range(2 * w + 1, 3 * w + 1) for e in (("make", i), ("send", i))]
    assert log[:1 + 2 * w] == [("recv", 2 * w)] + window
    assert log[1 + 2 * w:4 + 2 * w] == [("make", 3 * w + 1), ("recv", 3 * w), ("send", 3 * w + 1)]
    assert log[-2:] == [("make", 4 * w + 1), ("recv", None)]
    assert log.count(("make", 3 * w + 1)) == 1


def test_pump_reads_a_run_ahead_of_the_ack_that_needs_it() -> None:
    """With a source that reads in runs, pump asks for the next run as soon
    as the window sent ends the current one (before it waits for the ACK), and
    within a run sends without asking."""
    log: List[Tuple[str, Any]] = []

    class Runs(BytesSource):
        def run(self, index: int, number: int) -> List[bytes]:
            log.append(("run", index))
            return [self.packet(index + i, number + i) for i in range(2)]

    s = Sender(Runs(bytes(100), 4), CLIENT, Recorder(), blksize=4, rto=Rto(1.0))
    s.start(0.0)
    s.receive(memoryview(ack(1)), CLIENT, 0.001)          # answered: pump applies from here
    log.clear()
    pump_logged(s, [2, 3, 4], log)
    assert log == [("recv", 2), ("run", 3), ("send", 3), ("recv", 3), ("send", 4),
                   ("run", 5), ("recv", 4), ("send", 5), ("recv", None)]
