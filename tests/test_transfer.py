"""The sans-IO engine: Sender (RRQ) and Receiver (WRQ) on a fake clock.

Scripted tests call ``start``/``receive``/``on_timer`` by hand and look at the
exact datagrams a ``Recorder`` kept; property tests join an engine to a
scripted client over the seeded lossy link of ``link.py``.
"""

from __future__ import annotations

import errno
import math
import os
from typing import Any, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from link import (
    ACK, CLIENT, DATA, OACK, STRANGER,
    BytesSink, BytesSource, Recorder, Schedule, Sim,
    ack, data, error, make_oack, number, opcode, read_sim, wire_number, write_sim,
)
from tftpd.transfer import FIRST_REPLY_TIMEOUTS, MAX_RTO, MIN_RTO, Outcome, Receiver, Rto, Sender

ERR_TID = b"\x00\x05\x00\x05Unknown transfer ID\x00"
ERR_DISK_FULL = b"\x00\x05\x00\x03Disk full or allocation exceeded\x00"
OACK_PKT = make_oack(blksize=8)


def content(n: int, seed: int = 0) -> bytes:
    """Deterministic bytes where every block differs from its neighbours."""
    return bytes((i * 7 + (i >> 8) * 13 + seed) & 0xFF for i in range(n))


def sender(body: bytes = b"", blksize: int = 8, rec: Any = None, **kw: Any) -> Sender:
    kw.setdefault("rto", Rto(1.0))
    return Sender(BytesSource(body, blksize), CLIENT, rec if rec is not None else Recorder(),
                  blksize=blksize, **kw)


def receiver(sink: Any = None, blksize: int = 8, rec: Any = None, **kw: Any) -> Receiver:
    kw.setdefault("rto", Rto(1.0))
    return Receiver(sink if sink is not None else BytesSink(), CLIENT,
                    rec if rec is not None else Recorder(), blksize=blksize, **kw)


def run_timers(engine: Any, rec: Recorder, limit: int = 100) -> List[tuple]:
    """Fire the engine's timer until it is done; (time, datagrams) of each firing."""
    out = []
    for _ in range(limit):
        if engine.done:
            return out
        t = engine.deadline
        engine.on_timer(t)
        out.append((t, rec.take()))
    raise AssertionError("engine never gave up")


# --------------------------------------------------------------------------- Rto

def test_rto_starts_at_initial_and_doubles_up_to_the_cap() -> None:
    rto = Rto(1.0)
    assert rto.value == 1.0
    seen = []
    for _ in range(9):
        rto.backoff()
        seen.append(rto.value)
    assert seen == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 64.0, 64.0, 64.0]
    assert MAX_RTO == 64.0


def test_rto_adapts_to_samples_rfc6298() -> None:
    rto = Rto(1.0)
    rto.sample(0.3)                       # srtt 0.3, rttvar 0.15
    assert rto.value == pytest.approx(0.3 + 4 * 0.15)
    rto.sample(0.1)                       # rttvar 0.1625, srtt 0.275
    assert rto.value == pytest.approx(0.275 + 4 * 0.1625)


def test_rto_is_clamped_to_floor_and_cap() -> None:
    rto = Rto(1.0)
    rto.sample(0.001)
    assert rto.value == MIN_RTO
    rto.sample(100.0)
    assert rto.value == MAX_RTO
    fast = Rto(0.05)                      # -t below the floor lowers the floor
    fast.sample(0.001)
    assert fast.value == 0.05


@pytest.mark.parametrize("initial", [64.0, 100.0, 255.0])
def test_backoff_never_shortens_a_long_initial_timeout(initial: float) -> None:
    """-t may exceed 64 s; doubling must not bring the timeout below it."""
    rto = Rto(initial)
    rto.backoff()
    assert rto.value == initial
    rto.sample(1000.0)
    assert rto.value == initial


def test_fixed_rto_ignores_samples_and_backoff() -> None:
    rto = Rto(3.0, fixed=True)
    rto.sample(0.01)
    rto.backoff()
    rto.backoff()
    assert rto.value == 3.0


# --------------------------------------------------------------------------- first reply

FIRST_PACKETS = {
    "sender-data": (lambda rec: sender(content(20), rec=rec), data(1, content(8))),
    "sender-oack": (lambda rec: sender(content(20), rec=rec, oack=OACK_PKT), OACK_PKT),
    "receiver-ack": (lambda rec: receiver(rec=rec), ack(0)),
    "receiver-oack": (lambda rec: receiver(rec=rec, oack=OACK_PKT), OACK_PKT),
}


@pytest.mark.parametrize("kind", sorted(FIRST_PACKETS))
def test_silent_peer_gets_first_reply_exactly_first_reply_timeouts_times(kind: str) -> None:
    make, first = FIRST_PACKETS[kind]
    rec = Recorder()
    engine = make(rec)
    engine.start(100.0)
    assert rec.take() == [first]
    firings = run_timers(engine, rec)
    sends = 1 + sum(len(p) for _, p in firings)
    assert sends == FIRST_REPLY_TIMEOUTS
    assert all(p in ([first], []) for _, p in firings)
    assert firings[-1][1] == []           # the last timeout sends nothing
    assert engine.outcome == Outcome.TIMEOUT and engine.done
    # backoff: 1 s, then 2 s, then 4 s
    assert [t for t, _ in firings] == [101.0, 103.0, 107.0]
    assert FIRST_REPLY_TIMEOUTS < 6       # fewer than the default -x


SMALL_X = {
    "sender-data": lambda rec: sender(content(20), rec=rec, max_timeouts=2),
    "sender-oack": lambda rec: sender(content(20), rec=rec, max_timeouts=2, oack=OACK_PKT),
    "receiver-ack": lambda rec: receiver(rec=rec, max_timeouts=2),
    "receiver-oack": lambda rec: receiver(rec=rec, max_timeouts=2, oack=OACK_PKT),
}


@pytest.mark.parametrize("kind", sorted(SMALL_X))
def test_small_max_timeouts_also_limits_the_first_reply(kind: str) -> None:
    rec = Recorder()
    engine = SMALL_X[kind](rec)
    engine.start(0.0)
    sends = len(rec.take()) + sum(len(p) for _, p in run_timers(engine, rec))
    assert sends == 2
    assert engine.outcome == Outcome.TIMEOUT


@pytest.mark.parametrize("x", [1, 2, 3, 6, 10])
def test_after_the_peer_answered_max_timeouts_governs_sender(x: int) -> None:
    rec = Recorder()
    s = sender(content(40), rec=rec, max_timeouts=x)
    s.start(0.0)
    assert rec.take() == [data(1, content(40)[:8])]
    s.receive(ack(1), CLIENT, 0.5)
    block2 = data(2, content(40)[8:16])
    assert rec.take() == [block2]
    firings = run_timers(s, rec)
    assert 1 + sum(len(p) for _, p in firings) == x
    assert all(p in ([block2], []) for _, p in firings)
    assert s.outcome == Outcome.TIMEOUT


@pytest.mark.parametrize("x", [1, 2, 3, 6, 10])
def test_after_the_peer_answered_max_timeouts_governs_receiver(x: int) -> None:
    rec = Recorder()
    r = receiver(rec=rec, max_timeouts=x)
    r.start(0.0)
    assert rec.take() == [ack(0)]
    r.receive(data(1, b"12345678"), CLIENT, 0.5)
    assert rec.take() == [ack(1)]
    firings = run_timers(r, rec)
    assert 1 + sum(len(p) for _, p in firings) == x
    assert all(p in ([ack(1)], []) for _, p in firings)
    assert r.outcome == Outcome.TIMEOUT
    assert r.sink.finished == 0


def test_retransmission_timer_doubles_after_answer() -> None:
    rec = Recorder()
    s = sender(content(40), rec=rec, max_timeouts=6, rto=Rto(1.0, floor=1.0))
    s.start(0.0)
    s.receive(ack(1), CLIENT, 0.0)        # sample 0 -> clamped to the floor, 1 s
    rec.take()
    assert s.deadline == 1.0
    firings = run_timers(s, rec)
    assert [t for t, _ in firings] == [1.0, 3.0, 7.0, 15.0, 31.0, 63.0]


def test_backoff_is_capped_at_max_rto() -> None:
    rec = Recorder()
    s = sender(content(40), rec=rec, max_timeouts=6, rto=Rto(40.0))
    s.start(0.0)
    firings = run_timers(s, rec)
    assert [t for t, _ in firings] == [40.0, 104.0, 168.0]


def test_fixed_timeout_option_means_no_backoff() -> None:
    rec = Recorder()
    s = sender(content(40), rec=rec, max_timeouts=5, rto=Rto(2.0, fixed=True))
    s.start(0.0)
    s.receive(ack(1), CLIENT, 0.01)
    rec.take()
    firings = run_timers(s, rec)
    assert [t for t, _ in firings] == pytest.approx([2.01, 4.01, 6.01, 8.01, 10.01])


def test_sender_adapts_timeout_to_round_trip_samples() -> None:
    rec = Recorder()
    s = sender(content(40), rec=rec)
    s.start(10.0)
    s.receive(ack(1), CLIENT, 10.3)
    assert s.rto.value == pytest.approx(0.9)
    assert s.deadline == pytest.approx(10.3 + 0.9)
    s.receive(ack(2), CLIENT, 10.4)
    assert s.rto.value == pytest.approx(0.275 + 4 * 0.1625)
    assert s.deadline == pytest.approx(10.4 + 0.925)


def test_sender_karn_no_sample_from_a_retransmitted_block() -> None:
    rec = Recorder()
    s = sender(content(40), rec=rec)
    s.start(0.0)
    s.on_timer(1.0)                        # DATA 1 again, rto 2
    assert rec.take() == [data(1, content(40)[:8])] * 2
    s.receive(ack(1), CLIENT, 1.05)        # ambiguous: no sample
    assert s.rto.srtt < 0 and s.rto.value == 2.0
    assert s.deadline == pytest.approx(1.05 + 2.0)
    s.receive(ack(2), CLIENT, 1.15)        # DATA 2 was sent once: sample 0.1
    assert s.rto.srtt == pytest.approx(0.1)
    assert s.rto.value == pytest.approx(0.3)


def test_receiver_adapts_and_follows_karn() -> None:
    rec = Recorder()
    r = receiver(rec=rec)
    r.start(0.0)
    r.on_timer(1.0)                        # ACK 0 again: no sample from DATA 1
    r.receive(data(1, b"abcdefgh"), CLIENT, 1.2)
    assert r.rto.srtt < 0 and r.rto.value == 2.0
    r.receive(data(2, b"abcdefgh"), CLIENT, 1.5)   # answers ACK 1 sent at 1.2
    assert r.rto.srtt == pytest.approx(0.3)
    assert r.rto.value == pytest.approx(0.9)
    assert r.deadline == pytest.approx(1.5 + 0.9)
    assert rec.take() == [ack(0), ack(0), ack(1), ack(2)]


# --------------------------------------------------------------------------- Sorcerer's Apprentice

def test_duplicate_ack_never_retransmits() -> None:
    body = content(40)
    rec = Recorder()
    s = sender(body, rec=rec)
    s.start(0.0)
    s.receive(ack(1), CLIENT, 0.1)
    assert rec.take() == [data(1, body[:8]), data(2, body[8:16])]
    deadline = s.deadline
    for t in (0.2, 0.3, 0.4):
        s.receive(ack(1), CLIENT, t)
        s.receive(ack(0), CLIENT, t)
    assert rec.take() == []
    assert s.deadline == deadline


def test_sorcerers_apprentice_delayed_ack() -> None:
    """RFC 1123 4.2.3.1: the late ACK and the ACK of the resend each move on once."""
    body = content(50)
    rec = Recorder()
    s = sender(body, rec=rec)
    s.start(0.0)
    s.on_timer(1.0)                          # ACK 1 is late: DATA 1 again
    s.receive(ack(1), CLIENT, 1.1)           # the late ACK: DATA 2
    s.receive(ack(1), CLIENT, 1.2)           # the ACK of the resent DATA 1: nothing
    s.receive(ack(2), CLIENT, 1.3)           # DATA 3
    s.receive(ack(2), CLIENT, 1.4)           # duplicate again: nothing
    s.receive(ack(3), CLIENT, 1.5)
    blocks = [number(p) for p in rec.take() if opcode(p) == DATA]
    assert blocks == [1, 1, 2, 3, 4]


@pytest.mark.parametrize("windowsize", [1, 4, 16])
def test_duplicated_link_no_data_sent_on_duplicate_ack(windowsize: int) -> None:
    body = content(8 * 50 + 3)
    sim = read_sim(body, blksize=8, windowsize=windowsize,
                   schedule=Schedule(seed=7, dup=1.0))
    sends_on_dup = watch_duplicate_acks(sim)
    sim.run()
    assert sim.engine.outcome == Outcome.OK
    assert bytes(sim.client.data) == body
    assert sends_on_dup == []
    if windowsize == 1:
        assert sim.data_numbers() == list(range(1, 52))   # every block exactly once


def watch_duplicate_acks(sim: Sim) -> List[tuple]:
    """Record every transmission the engine makes while handling an ACK it saw before."""
    seen: set = set()
    bad: List[tuple] = []
    engine = sim.engine
    inner = engine.receive

    def receive(view: Any, addr: Any, now: float) -> None:
        pkt = bytes(view)
        before = len(sim.server_sent)
        inner(view, addr, now)
        if addr == CLIENT and len(pkt) == 4 and opcode(pkt) == ACK:
            if pkt in seen and len(sim.server_sent) != before:
                bad.append((now, pkt, sim.server_sent[before:]))
            seen.add(pkt)
    engine.receive = receive
    return bad


def test_sender_waits_for_ack_0_of_its_oack() -> None:
    body = content(20)
    rec = Recorder()
    s = sender(body, rec=rec, oack=OACK_PKT)
    s.start(0.0)
    assert rec.take() == [OACK_PKT]
    for wrong in (1, 2, 65535):
        s.receive(ack(wrong), CLIENT, 0.1)
    assert rec.take() == [] and s.deadline == 1.0
    s.receive(ack(0), CLIENT, 0.2)
    assert rec.take() == [data(1, body[:8])]
    s.receive(ack(0), CLIENT, 0.3)            # ACK 0 again: a duplicate now
    assert rec.take() == []


def test_receiver_reacks_an_old_block_at_once() -> None:
    """Our ACK was lost and the peer resent: answer now, not at our next timeout."""
    rec = Recorder()
    r = receiver(rec=rec)
    r.start(0.0)
    r.receive(data(1, b"12345678"), CLIENT, 0.1)
    r.receive(data(2, b"abcdefgh"), CLIENT, 0.2)
    assert rec.take() == [ack(0), ack(1), ack(2)]
    deadline = r.deadline
    r.receive(data(2, b"abcdefgh"), CLIENT, 0.3)
    r.receive(data(1, b"12345678"), CLIENT, 0.3)
    assert rec.take() == [ack(2), ack(2)]
    assert bytes(r.sink.data) == b"12345678abcdefgh" and r.deadline == deadline


# --------------------------------------------------------------------------- stray TIDs

@pytest.mark.parametrize("stray", [STRANGER, ("192.0.2.99", CLIENT[1]), ("192.0.2.99", 40002)])
def test_packet_from_another_tid_gets_error_5_and_transfer_goes_on(stray: tuple) -> None:
    body = content(20)
    rec = Recorder()
    s = sender(body, rec=rec)
    s.start(0.0)
    rec.take()
    deadline = s.deadline
    s.receive(ack(1), stray, 0.1)
    s.receive(b"\x00\x01junk\x00octet\x00", stray, 0.1)
    s.receive(b"x", stray, 0.1)
    assert rec.sent == [(ERR_TID, stray)] * 3
    rec.sent.clear()
    s.receive(error(0, b"bye"), stray, 0.1)  # an ERROR is never answered
    assert rec.sent == []
    assert s.outcome == Outcome.RUNNING and s.deadline == deadline and s.base == 1
    s.receive(ack(1), CLIENT, 0.2)
    s.receive(ack(2), CLIENT, 0.3)
    s.receive(ack(3), CLIENT, 0.4)
    assert rec.take() == [data(2, body[8:16]), data(3, body[16:])]
    assert s.outcome == Outcome.OK and s.bytes == 20


def test_receiver_answers_stray_with_error_5() -> None:
    rec = Recorder()
    r = receiver(rec=rec)
    r.start(0.0)
    rec.take()
    r.receive(data(1, b"evilevil"), STRANGER, 0.1)
    assert rec.sent == [(ERR_TID, STRANGER)]
    assert bytes(r.sink.data) == b""
    rec.sent.clear()
    r.receive(data(1, b"good"), CLIENT, 0.2)
    assert rec.take() == [ack(1)]
    assert r.outcome == Outcome.OK and bytes(r.sink.data) == b"good"


@pytest.mark.parametrize("direction", ["read", "write"])
def test_strays_during_a_lossy_transfer(direction: str) -> None:
    body = content(8 * 30 + 5)
    schedule = Schedule(seed=3, loss=0.1, dup=0.05, reorder=0.1)
    make = read_sim if direction == "read" else write_sim
    sim = make(body, blksize=8, windowsize=4, schedule=schedule, oack=make_oack(blksize=8))
    for i in range(20):
        sim.inject(sim.now + 0.005 + i * 0.004, STRANGER,
                   ack(i) if direction == "read" else data(i, b"strangers"))
    sim.run()
    assert sim.engine.outcome == Outcome.OK
    got = bytes(sim.client.data) if direction == "read" else bytes(sim.engine.sink.data)
    assert got == body
    to_stranger = [p for _, a, p in sim.server_sent if a == STRANGER]
    assert to_stranger == [ERR_TID] * 20


# --------------------------------------------------------------------------- peer errors

PEER_ERRORS = [
    error(0, b"tsize probe"),
    error(8, b""),
    error(1, b"\xff\xfe not utf-8"),
    b"\x00\x05\x00\x02no terminating NUL",
    b"\x00\x05\x00\x00",
    b"\x00\x05\x00",
    b"\x00\x05",
]


@pytest.mark.parametrize("err", PEER_ERRORS)
@pytest.mark.parametrize("acks", [0, 1, 3])
@pytest.mark.parametrize("with_oack", [False, True])
def test_peer_error_ends_sender_quietly(err: bytes, acks: int, with_oack: bool) -> None:
    body = content(100)
    rec = Recorder()
    s = sender(body, rec=rec, oack=OACK_PKT if with_oack else None)
    s.start(0.0)
    if with_oack and acks:
        s.receive(ack(0), CLIENT, 0.01)
    for i in range(1, acks):
        s.receive(ack(i), CLIENT, 0.01 * i + 0.01)
    rec.take()
    s.receive(err, CLIENT, 1.0 - 0.001)
    assert rec.sent == []
    assert s.outcome == Outcome.PEER_ERROR and s.done
    s.on_timer(5.0)
    s.receive(ack(acks), CLIENT, 5.0)
    assert rec.sent == []


@pytest.mark.parametrize("err", PEER_ERRORS)
@pytest.mark.parametrize("blocks", [0, 1, 3])
@pytest.mark.parametrize("with_oack", [False, True])
def test_peer_error_ends_receiver_quietly(err: bytes, blocks: int, with_oack: bool) -> None:
    rec = Recorder()
    sink = BytesSink()
    r = receiver(sink, rec=rec, oack=OACK_PKT if with_oack else None)
    r.start(0.0)
    for i in range(1, blocks + 1):
        r.receive(data(i, b"12345678"), CLIENT, 0.01 * i)
    rec.take()
    r.receive(err, CLIENT, 0.5)
    assert rec.sent == []
    assert r.outcome == Outcome.PEER_ERROR and r.done
    assert sink.finished == 0 and bytes(sink.data) == b"12345678" * blocks


def test_pxe_tsize_probe_after_oack() -> None:
    """Boot ROM: RRQ with tsize, OACK, then ERROR 0 instead of ACK 0."""
    rec = Recorder()
    oack = make_oack(tsize=20, blksize=1456)
    s = sender(content(20), rec=rec, oack=oack)
    s.start(0.0)
    assert rec.take() == [oack]
    s.receive(b"\x00\x05\x00\x00TFTP Aborted\x00", CLIENT, 0.002)
    assert rec.sent == []
    assert s.outcome == Outcome.PEER_ERROR
    assert "TFTP Aborted" in s.message


def test_peer_error_while_receiver_dallies_keeps_ok() -> None:
    rec = Recorder()
    r = receiver(rec=rec)
    r.start(0.0)
    r.receive(data(1, b"end"), CLIENT, 0.1)
    r.receive(error(0, b"whatever"), CLIENT, 0.2)
    assert r.outcome == Outcome.OK
    assert rec.take() == [ack(0), ack(1)]


# --------------------------------------------------------------------------- malformed

SENDER_MALFORMED = [
    b"", b"\x00", b"\x00\x04", b"\x00\x04\x00", b"\x01\x04\x00\x01", b"\xff\xff\xff\xff",
    data(1, b"data to a sender"), b"\x00\x01file\x00octet\x00", b"\x00\x02file\x00octet\x00",
    b"\x00\x06", b"\x00\x06blksize\x00512\x00", b"\x00\x07\x00\x00", b"\x00\x00\x00\x01",
]
RECEIVER_MALFORMED = [
    b"", b"\x00", b"\x00\x03", b"\x00\x03\x00", b"\x03\x03\x00\x01", ack(0), ack(1),
    b"\x00\x01file\x00octet\x00", b"\x00\x06", b"\x00\x08\x00\x01",
    data(1, b"123456789"),                # larger than blksize 8
]


def assert_single_error_4(rec: Recorder) -> None:
    sent = rec.take()
    assert len(sent) == 1
    pkt = sent[0]
    assert pkt[:4] == b"\x00\x05\x00\x04" and pkt.endswith(b"\x00")
    assert b"\x00" not in pkt[4:-1] and len(pkt) > 5


@pytest.mark.parametrize("bad", SENDER_MALFORMED)
@pytest.mark.parametrize("answered", [False, True])
def test_malformed_packet_to_sender_gets_error_4(bad: bytes, answered: bool) -> None:
    rec = Recorder()
    s = sender(content(40), rec=rec)
    s.start(0.0)
    if answered:
        s.receive(ack(1), CLIENT, 0.1)
    rec.take()
    s.receive(bad, CLIENT, 0.2)
    assert_single_error_4(rec)
    assert s.outcome == Outcome.ERROR and s.done
    s.receive(ack(2), CLIENT, 0.3)
    s.on_timer(10.0)
    assert rec.sent == []


@pytest.mark.parametrize("bad", RECEIVER_MALFORMED)
def test_malformed_packet_to_receiver_gets_error_4(bad: bytes) -> None:
    rec = Recorder()
    sink = BytesSink()
    r = receiver(sink, rec=rec)
    r.start(0.0)
    r.receive(data(1, b"12345678"), CLIENT, 0.1)
    rec.take()
    r.receive(bad, CLIENT, 0.2)
    assert_single_error_4(rec)
    assert r.outcome == Outcome.ERROR and r.done
    assert sink.finished == 0 and bytes(sink.data) == b"12345678"


def test_long_ack_is_accepted() -> None:
    """Some boot ROMs pad their ACKs; the first four bytes are what counts."""
    body = content(20)
    rec = Recorder()
    s = sender(body, rec=rec)
    s.start(0.0)
    s.receive(ack(1) + b"\x00" * 8, CLIENT, 0.1)
    assert rec.take()[-1] == data(2, body[8:16])


# --------------------------------------------------------------------------- windows

def test_sender_window_go_back_on_gap_and_timeout() -> None:
    body = content(8 * 10 + 3)
    blocks = [body[i:i + 8] for i in range(0, len(body), 8)]
    rec = Recorder()
    s = sender(body, rec=rec, windowsize=4)

    def sent() -> List[int]:
        out = rec.take()
        for p in out:
            assert opcode(p) == DATA and p[4:] == blocks[number(p) - 1]
        return [number(p) for p in out]

    s.start(0.0)
    assert sent() == [1, 2, 3, 4]
    s.receive(ack(1), CLIENT, 0.1)           # block 2 lost: go back
    assert sent() == [2, 3, 4, 5]
    s.receive(ack(1), CLIENT, 0.11)          # duplicate of that ACK
    assert sent() == []
    s.receive(ack(5), CLIENT, 0.2)
    assert sent() == [6, 7, 8, 9]
    s.on_timer(s.deadline)                   # whole window lost
    assert sent() == [6, 7, 8, 9]
    s.receive(ack(9), CLIENT, 3.0)
    assert sent() == [10, 11]                # 11 is the short last block
    s.receive(ack(10), CLIENT, 3.1)
    assert sent() == [11]
    assert s.outcome == Outcome.RUNNING
    s.receive(ack(11), CLIENT, 3.2)
    assert sent() == []
    assert s.outcome == Outcome.OK and s.bytes == len(body)


def test_sender_window_with_empty_final_block() -> None:
    body = content(32)
    rec = Recorder()
    s = sender(body, rec=rec, windowsize=16)
    s.start(0.0)
    out = rec.take()
    assert out == [data(1, body[:8]), data(2, body[8:16]), data(3, body[16:24]),
                   data(4, body[24:]), data(5)]
    s.receive(ack(5), CLIENT, 0.1)
    assert s.outcome == Outcome.OK and s.bytes == 32


def test_receiver_window_acks_per_window_and_once_per_gap() -> None:
    blocks = [bytes([65 + i]) * 8 for i in range(6)]
    rec = Recorder()
    sink = BytesSink()
    r = receiver(sink, rec=rec, windowsize=4)
    r.start(0.0)
    assert rec.take() == [ack(0)]
    r.receive(data(1, blocks[0]), CLIENT, 0.1)
    assert rec.take() == []
    r.receive(data(3, blocks[2]), CLIENT, 0.1)   # 2 is missing
    assert rec.take() == [ack(1)]
    r.receive(data(4, blocks[3]), CLIENT, 0.1)   # same gap: no second ACK
    assert rec.take() == []
    assert bytes(sink.data) == blocks[0]         # nothing beyond the gap was written
    for i in (2, 3, 4):
        r.receive(data(i, blocks[i - 1]), CLIENT, 0.2)
    assert rec.take() == []
    r.receive(data(5, blocks[4]), CLIENT, 0.2)
    assert rec.take() == [ack(5)]
    r.receive(data(6, b"end"), CLIENT, 0.3)      # short: ACK at once
    assert rec.take() == [ack(6)]
    assert bytes(sink.data) == b"".join(blocks[:5]) + b"end"
    assert sink.finished == 1 and r.outcome == Outcome.OK and r.bytes == 43


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_receiver_writes_only_in_order_prefix(draw: Any) -> None:
    n = draw.draw(st.integers(1, 12), label="blocks")
    window = draw.draw(st.sampled_from([1, 2, 4, 16]), label="window")
    body = content(8 * (n - 1) + draw.draw(st.integers(0, 7), label="tail"))
    rec = Recorder()
    sink = BytesSink()
    r = receiver(sink, rec=rec, windowsize=window)
    r.start(0.0)
    order = draw.draw(st.lists(st.integers(0, n + 2), max_size=60), label="order")
    t = 0.0
    written = 0
    for i in order + list(range(1, n + 1)):
        t += 0.01
        payload = body[(i - 1) * 8:i * 8] if i >= 1 else b"junkjunk"
        r.receive(data(i, payload), CLIENT, t)
        assert r.outcome in (Outcome.RUNNING, Outcome.OK)
        assert bytes(sink.data) == body[:len(sink.data)]
        assert len(sink.data) >= written
        written = len(sink.data)
        assert sink.finished == (1 if r.outcome == Outcome.OK else 0)
    assert r.outcome == Outcome.OK and bytes(sink.data) == body
    for p in rec.take():
        assert opcode(p) == ACK


# --------------------------------------------------------------------------- dally

def test_receiver_dallies_and_reacks_final_data() -> None:
    rec = Recorder()
    sink = BytesSink()
    r = receiver(sink, rec=rec, dally=2.0, max_timeouts=3)
    r.start(0.0)
    r.receive(data(1, b"12345678"), CLIENT, 0.1)
    r.receive(data(2, b"end"), CLIENT, 0.2)
    assert rec.take() == [ack(0), ack(1), ack(2)]
    assert r.outcome == Outcome.OK and not r.done and r.deadline == pytest.approx(2.2)
    assert r.completed_at == 0.2
    r.receive(data(2, b"end"), CLIENT, 1.0)       # our ACK 2 was lost
    assert rec.take() == [ack(2)]
    r.receive(data(1, b"12345678"), CLIENT, 1.1)  # an old one too
    assert rec.take() == [ack(2)]
    r.receive(data(3, b"more"), CLIENT, 1.2)      # nothing beyond the end
    assert rec.take() == []
    assert bytes(sink.data) == b"12345678end" and sink.finished == 1
    r.on_timer(1.5)                               # too early: nothing
    assert not r.done
    r.on_timer(2.2)
    assert r.done and r.outcome == Outcome.OK and rec.take() == []


def test_receiver_dally_reacks_are_bounded() -> None:
    rec = Recorder()
    r = receiver(rec=rec, dally=100.0, max_timeouts=3)
    r.start(0.0)
    r.receive(data(1, b"x"), CLIENT, 0.1)
    rec.take()
    for i in range(10):
        r.receive(data(1, b"x"), CLIENT, 0.2 + i)
    assert rec.take() == [ack(1)] * 3


# --------------------------------------------------------------------------- file errors

@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("fail_after", [0, 8, 20])
def test_disk_full_during_write_is_error_3(err: int, fail_after: int) -> None:
    rec = Recorder()
    sink = BytesSink(fail_after=fail_after, err=err)
    r = receiver(sink, rec=rec)
    r.start(0.0)
    rec.take()
    t = 0.0
    for i in range(1, 10):
        t += 0.1
        r.receive(data(i, content(8, i)), CLIENT, t)
        if r.done:
            break
    sent = rec.take()
    assert sent[-1] == ERR_DISK_FULL
    assert sent[:-1] == [ack(k) for k in range(1, len(sent))]
    assert len(sink.data) <= fail_after
    assert r.outcome == Outcome.ERROR and r.done and sink.finished == 0
    r.receive(data(i + 1, b"x"), CLIENT, t + 0.1)
    assert rec.sent == []


def test_disk_full_at_finish_is_error_3() -> None:
    rec = Recorder()
    sink = BytesSink(fail_on_finish=True)
    r = receiver(sink, rec=rec)
    r.start(0.0)
    r.receive(data(1, b"short"), CLIENT, 0.1)
    assert rec.take() == [ack(0), ERR_DISK_FULL]
    assert r.outcome == Outcome.ERROR and r.done


def test_other_write_error_is_error_0() -> None:
    rec = Recorder()
    r = receiver(BytesSink(fail_after=0, err=errno.EIO), rec=rec)
    r.start(0.0)
    r.receive(data(1, b"x"), CLIENT, 0.1)
    sent = rec.take()
    assert sent[0] == ack(0) and sent[1][:4] == b"\x00\x05\x00\x00" and len(sent) == 2
    assert r.outcome == Outcome.ERROR


class FailingSource:
    def __init__(self, body: bytes, fail_at: int) -> None:
        self.inner = BytesSource(body, 8)
        self.fail_at = fail_at

    def packet(self, index: int, number: int) -> Any:
        if index >= self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        return self.inner.packet(index, number)


def test_read_error_ends_sender_with_error_0() -> None:
    body = content(40)
    rec = Recorder()
    s = Sender(FailingSource(body, 3), CLIENT, rec, blksize=8, rto=Rto(1.0))
    s.start(0.0)
    s.receive(ack(1), CLIENT, 0.1)
    s.receive(ack(2), CLIENT, 0.2)
    sent = rec.take()
    assert sent[:2] == [data(1, body[:8]), data(2, body[8:16])]
    assert sent[2][:4] == b"\x00\x05\x00\x00" and len(sent) == 3
    assert s.outcome == Outcome.ERROR and s.done


# --------------------------------------------------------------------------- abort

def test_abort_running_transfer_sends_error() -> None:
    rec = Recorder()
    s = sender(content(40), rec=rec)
    s.start(0.0)
    rec.take()
    s.abort(0, "Server shutting down")
    assert rec.take() == [b"\x00\x05\x00\x00Server shutting down\x00"]
    assert s.outcome == Outcome.ERROR and s.done
    s.abort(0, "again")
    assert rec.take() == []


def test_abort_while_dallying_is_quiet() -> None:
    rec = Recorder()
    r = receiver(rec=rec)
    r.start(0.0)
    r.receive(data(1, b"x"), CLIENT, 0.1)
    rec.take()
    r.abort(0, "Server shutting down")
    assert rec.take() == [] and r.done and r.outcome == Outcome.OK


# --------------------------------------------------------------------------- whole transfers

def test_empty_file_is_one_empty_data() -> None:
    rec = Recorder()
    s = sender(b"", rec=rec, blksize=512)
    s.start(0.0)
    assert rec.take() == [data(1)]
    s.receive(ack(1), CLIENT, 0.1)
    assert s.outcome == Outcome.OK and s.bytes == 0


SIZES_512 = [0, 1, 511, 512, 513, 1024, 1025, 512 * 7, 512 * 7 + 100]


@pytest.mark.parametrize("size", SIZES_512)
@pytest.mark.parametrize("windowsize", [1, 4, 16])
def test_clean_link_exact_bytes_both_ways(size: int, windowsize: int) -> None:
    body = content(size)
    oack = make_oack(windowsize=windowsize) if windowsize > 1 else None
    blocks = size // 512 + 1
    r = read_sim(body, windowsize=windowsize, oack=oack).run()
    assert r.engine.outcome == Outcome.OK and bytes(r.client.data) == body
    assert r.data_numbers() == list(range(1, blocks + 1))     # nothing resent
    assert r.engine.bytes == size and r.client.violations == []
    w = write_sim(body, windowsize=windowsize, oack=oack).run()
    assert w.engine.outcome == Outcome.OK and bytes(w.engine.sink.data) == body
    assert w.engine.sink.finished == 1 and w.engine.bytes == size
    assert w.client.done and w.client.data_sent == blocks and w.client.violations == []
    replies = w.sent_to_client()
    assert replies[0] == (oack or ack(0))
    assert [number(p) for p in replies[1:]] == [
        b for b in range(1, blocks + 1) if b % windowsize == 0 or b == blocks]


BLKSIZES = [8, 512, 1428]


@st.composite
def transfer_case(draw: Any) -> tuple:
    blksize = draw(st.sampled_from(BLKSIZES), label="blksize")
    windowsize = draw(st.sampled_from([1, 4, 16]), label="windowsize")
    k = draw(st.integers(0, 40 if blksize == 8 else 6))
    size = draw(st.sampled_from([0, 1, 511, 512, 513, k * blksize, k * blksize + 1,
                                 max(0, k * blksize - 1)]), label="size")
    seed = draw(st.integers(0, 2 ** 32 - 1), label="seed")
    return blksize, windowsize, size, seed


LOSSY = dict(loss=0.10, dup=0.05, reorder=0.10)
MAX_TIMEOUTS = 6


def _bounded_failure(sim: Sim) -> None:
    """A TIMEOUT: the last packet was sent at most max_timeouts times after
    the client last reached the server, and the engine gave up in bounded time."""
    engine = sim.engine
    assert engine.timeouts == (MAX_TIMEOUTS if engine.answered else FIRST_REPLY_TIMEOUTS)
    heard = max((t for t, a, _ in sim.server_received if a == CLIENT), default=-math.inf)
    last = sim.server_sent[-1][2]
    resent = [t for t, a, p in sim.server_sent if p == last and t > heard]
    assert 1 <= len(resent) <= MAX_TIMEOUTS
    assert sim.server_sent[-1][0] - max(heard, 1000.0) <= MAX_TIMEOUTS * MAX_RTO


def oack_for(blksize: int, windowsize: int) -> Any:
    """The OACK a server sends for these options (None: no options)."""
    opts = {k: v for k, v, default in (("blksize", blksize, 512),
                                       ("windowsize", windowsize, 1)) if v != default}
    return make_oack(**opts) if opts else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transfer_case())
def test_lossy_link_read_exact_bytes_or_clean_timeout(case: tuple) -> None:
    blksize, windowsize, size, seed = case
    body = content(size, seed & 0xFF)
    sim = read_sim(body, blksize=blksize, windowsize=windowsize,
                   oack=oack_for(blksize, windowsize),
                   schedule=Schedule(seed=seed, **LOSSY), max_timeouts=MAX_TIMEOUTS)
    sends_on_dup = watch_duplicate_acks(sim)
    sim.run()
    engine, client = sim.engine, sim.client
    assert client.violations == []
    assert sends_on_dup == []
    kinds = [opcode(p) for p in sim.sent_to_client()]
    if DATA in kinds:                     # the OACK only ever before the first DATA
        assert OACK not in kinds[kinds.index(DATA):]
    assert bytes(client.data) == body[:len(client.data)]
    assert engine.outcome in (Outcome.OK, Outcome.TIMEOUT)
    if engine.outcome == Outcome.OK:
        assert client.done and bytes(client.data) == body and engine.bytes == size
    else:
        _bounded_failure(sim)
    if client.done:
        assert bytes(client.data) == body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transfer_case())
def test_lossy_link_write_exact_bytes_or_clean_timeout(case: tuple) -> None:
    blksize, windowsize, size, seed = case
    body = content(size, seed & 0xFF)
    sim = write_sim(body, blksize=blksize, windowsize=windowsize,
                    oack=oack_for(blksize, windowsize),
                    schedule=Schedule(seed=seed, **LOSSY), max_timeouts=MAX_TIMEOUTS)
    sim.run()
    engine, client = sim.engine, sim.client
    sink = engine.sink
    assert client.violations == []
    assert bytes(sink.data) == body[:len(sink.data)]
    assert engine.outcome in (Outcome.OK, Outcome.TIMEOUT)
    if engine.outcome == Outcome.OK:
        assert bytes(sink.data) == body and sink.finished == 1 and engine.bytes == size
    else:
        assert sink.finished == 0
        _bounded_failure(sim)
    if client.done:                       # it saw the final ACK
        assert engine.outcome == Outcome.OK


# --------------------------------------------------------------------------- block number wrap

WRAP_BLOCKS = 65536 + 5


@pytest.mark.parametrize("rollover", [0, 1])
def test_sender_block_numbers_wrap(rollover: int) -> None:
    body = content(8 * (WRAP_BLOCKS - 1) + 3)
    sim = read_sim(body, blksize=8, windowsize=16, rollover=rollover,
                   oack=make_oack(blksize=8, windowsize=16, rollover=rollover)).run()
    assert sim.engine.outcome == Outcome.OK
    assert bytes(sim.client.data) == body
    numbers = sim.data_numbers()
    assert len(numbers) == WRAP_BLOCKS
    assert numbers[65533:65539] == ([65534, 65535, 0, 1, 2, 3] if rollover == 0
                                    else [65534, 65535, 1, 2, 3, 4])
    assert numbers == [wire_number(i, rollover) for i in range(1, WRAP_BLOCKS + 1)]
    assert sim.engine.bytes == len(body)


@pytest.mark.parametrize("rollover", [0, 1])
def test_receiver_block_numbers_wrap(rollover: int) -> None:
    body = content(8 * (WRAP_BLOCKS - 1))        # ends with an empty block
    sim = write_sim(body, blksize=8, windowsize=16, rollover=rollover,
                    oack=make_oack(blksize=8, windowsize=16, rollover=rollover)).run()
    assert sim.engine.outcome == Outcome.OK
    assert bytes(sim.engine.sink.data) == body and sim.engine.sink.finished == 1
    acks = [number(p) for p in sim.sent_to_client()[1:]]
    expected = [wire_number(i, rollover) for i in range(16, WRAP_BLOCKS + 1, 16)]
    assert acks == expected + [wire_number(WRAP_BLOCKS, rollover)]


def test_wrap_with_losses_at_the_wrap() -> None:
    """Window 1: datagram n is block n+1, so the drops hit blocks 65536 and 65537."""
    body = content(8 * (WRAP_BLOCKS - 1) + 1)
    drops = frozenset({("server", 65535), ("client", 65536)})
    sim = read_sim(body, blksize=8, schedule=Schedule(drop=drops),
                   oack=None, rto=0.5).run()
    assert sim.engine.outcome == Outcome.OK and bytes(sim.client.data) == body
    numbers = sim.data_numbers()
    assert numbers.count(0) == 2 and numbers.count(1) == 3   # each lost once, 1 also at start
    w = write_sim(body, blksize=8, schedule=Schedule(drop=frozenset(
        {("client", 65535), ("server", 65537)}))).run()
    assert w.engine.outcome == Outcome.OK and bytes(w.engine.sink.data) == body


# --------------------------------------------------------------------------- real files

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([8, 13, 512]), st.sampled_from([1, 4, 16]), st.booleans(),
       st.integers(0, 2 ** 32 - 1), st.integers(0, 3000))
def test_real_files_through_a_lossy_link(blksize: int, windowsize: int, text: bool,
                                         seed: int, size: int) -> None:
    """FileSource/NetasciiSource (views into one reused buffer, re-read on a
    go-back) behind a Sender, and AtomicFile/NetasciiSink behind a Receiver."""
    import tempfile
    from unittest import mock

    from tftpd import files, netascii
    body = bytes(b"ab\r\n\n\r\0x"[(i * 5 + seed) % 8] for i in range(size))
    wire = netascii.encode(body) if text else body
    opts = make_oack(blksize=blksize, windowsize=windowsize)
    schedule = Schedule(seed=seed, **LOSSY)
    with tempfile.TemporaryDirectory() as d, mock.patch.object(files, "READ_CHUNK", 3 * blksize):
        path = os.path.join(d, "f")
        with open(path, "wb") as f:
            f.write(body)
        fd = os.open(path, os.O_RDONLY)
        try:
            src = (files.NetasciiSource(fd, blksize, windowsize) if text
                   else files.FileSource(fd, blksize, size))
            sim = read_sim(b"", blksize=blksize, windowsize=windowsize, oack=opts,
                           schedule=schedule, source=src).run()
            got = bytes(sim.client.data)
            assert got == wire[:len(got)]
            if sim.engine.outcome == Outcome.OK:
                assert got == wire
            if text:
                assert netascii.encoded_size(fd) == len(wire)
        finally:
            os.close(fd)
        target = os.path.join(d, "up")
        atomic = files.AtomicFile(target, 0o644)
        sink = files.NetasciiSink(atomic) if text else atomic
        w = write_sim(wire, blksize=blksize, windowsize=windowsize, oack=opts,
                      schedule=schedule, sink=sink).run()
        sink.abort()                        # what Plan.close() does in any case
        if w.engine.outcome == Outcome.OK:
            with open(target, "rb") as f:
                assert f.read() == body
        else:
            assert not os.path.exists(target)
        assert sorted(os.listdir(d)) == (["f", "up"] if w.engine.outcome == Outcome.OK else ["f"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["read", "write"]), st.sampled_from([1, 4]), st.booleans(),
       st.integers(0, 2 ** 32 - 1), st.floats(0.0, 3.0))
def test_client_error_at_any_moment_ends_quietly(direction: str, windowsize: int, with_oack: bool,
                                                 seed: int, at: float) -> None:
    body = content(8 * 40 + 3)
    oack = make_oack(blksize=8, windowsize=windowsize) if with_oack else None
    make = read_sim if direction == "read" else write_sim
    sim = make(body, blksize=8, windowsize=windowsize if with_oack else 1, oack=oack,
               schedule=Schedule(seed=seed, **LOSSY))
    err = error(0, b"user aborted")
    sim.inject(sim.now + at, CLIENT, err)
    engine = sim.engine
    inner = engine.receive
    state: dict = {"running": None, "count": 0}

    def receive(view: Any, addr: Any, now: float) -> None:
        if state["running"] is None and addr == CLIENT and bytes(view) == err:
            state["running"] = engine.outcome == Outcome.RUNNING
            before = len(sim.server_sent)
            inner(view, addr, now)
            assert len(sim.server_sent) == before        # an ERROR is never answered
            state["count"] = before
            return
        inner(view, addr, now)
    engine.receive = receive
    sim.run()
    if state["running"] is None:          # it had ended before the ERROR came
        assert engine.outcome in (Outcome.OK, Outcome.TIMEOUT) and engine.done
    elif state["running"]:
        assert engine.outcome == Outcome.PEER_ERROR and engine.done
        assert len(sim.server_sent) == state["count"]    # nothing more, timers included
        assert "user aborted" in engine.message
    else:                                 # it had finished (or was dallying) by then
        assert engine.outcome in (Outcome.OK, Outcome.TIMEOUT)


def test_receiver_is_complete_before_its_final_ack_leaves() -> None:
    """The client may send its next request the moment the final ACK arrives:
    by then the transfer must already count as finished (not a duplicate)."""
    seen: List[Any] = []
    r: Receiver

    def transmit(packet: Any, addr: Any) -> None:
        seen.append((bytes(packet), r.outcome, r.completed_at))

    r = Receiver(BytesSink(), CLIENT, transmit, blksize=8, rto=Rto(1.0))
    r.start(0.0)
    r.receive(b"\x00\x03\x00\x01" + b"x" * 8, CLIENT, 0.1)
    r.receive(b"\x00\x03\x00\x02" + b"y" * 3, CLIENT, 0.2)
    final, outcome, completed = seen[-1]
    assert final == b"\x00\x04\x00\x02"
    assert outcome == Outcome.OK and completed == 0.2
