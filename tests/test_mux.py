"""The multiplexer: connected senders' pumps served by one thread per
process, on real loopback sockets, against lock-step clients."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from link import BytesSource
from tftpd import log as tftpd_log
from tftpd.mux import Multiplexer
from tftpd.transfer import Outcome, Rto, Sender
from tftpd.worker import drive, make_transmit

BLOCK = 512


def body_of(n: int, blocks: int = 60) -> bytes:
    return bytes((n * 7 + i) & 0xFF for i in range(blocks * BLOCK + 100))


class Transfer:
    """A connected server socket with its Sender, driven in a thread with the
    multiplexer, and the client socket facing it."""

    def __init__(self, mux: Multiplexer, body: bytes, source: Any = None,
                 rto: Optional[Rto] = None, windowsize: int = 1, blksize: int = BLOCK) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.client.bind(("127.0.0.1", 0))
        self.client.settimeout(10)
        peer = self.client.getsockname()
        self.server.connect(peer)
        self.stopped = False
        self.engine = Sender(source or BytesSource(body, blksize), peer,
                             make_transmit(self.server, None, peer), blksize=blksize,
                             windowsize=windowsize, rto=rto or Rto(5.0))
        self.thread = threading.Thread(target=drive, args=(self.engine, self.server),
                                       kwargs={"connected": True, "mux": mux,
                                               "stopped": lambda: self.stopped})
        self.got = bytearray()
        self.error = b""                     # an ERROR the client received
        self.data: Dict[int, int] = {}       # DATA block -> times received

    def recv(self) -> bytes:
        packet = self.client.recv(65536)
        if packet[:2] == b"\x00\x03":
            n = packet[2] << 8 | packet[3]
            self.data[n] = self.data.get(n, 0) + 1
        return packet

    def ack(self, n: int) -> None:
        self.client.sendto(struct.pack("!HH", 4, n), self.server.getsockname())

    def close(self) -> None:
        self.thread.join(10)
        self.server.close()
        self.client.close()


def lockstep(t: Transfer, hold: Optional[int] = None, gate: Optional[threading.Event] = None,
             blksize: int = BLOCK) -> None:
    """Receive the whole file, ACKing each block; ``hold``: do not ACK that
    block the first time (wait for it again); ``gate``: wait for it before
    ACKing block 1."""
    expect = 1
    while True:
        packet = t.recv()
        if packet[:2] == b"\x00\x05":
            t.error = packet
            return
        assert packet[:2] == b"\x00\x03", packet
        n = packet[2] << 8 | packet[3]
        if n != expect:                # a retransmission of the previous block
            t.ack(n)
            continue
        if n == hold and t.data[n] == 1:
            continue
        if n == 1 and gate is not None:
            assert gate.wait(10)
        t.got += packet[4:]
        t.ack(n)
        expect += 1
        if len(packet) - 4 < blksize:
            return


def run_clients(transfers: List[Transfer],
                kw: Optional[Dict[int, Dict[str, Any]]] = None) -> List[BaseException]:
    """Run a lock-step client for each transfer at once (``kw``: arguments for
    the i-th); what they raised."""
    kw = kw or {}
    errors: List[BaseException] = []

    def client(t: Transfer, extra: Dict[str, Any]) -> None:
        try:
            lockstep(t, **extra)
        except BaseException as e:  # noqa: B036 - reported by the test
            errors.append(e)
    threads = [threading.Thread(target=client, args=(t, kw.get(i, {})))
               for i, t in enumerate(transfers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    return errors


@pytest.fixture
def mux() -> Multiplexer:
    return Multiplexer()


def start_all(transfers: List[Transfer], mux: Multiplexer) -> None:
    for t in transfers:
        t.thread.start()
    deadline = time.monotonic() + 10
    while mux.pumping < len(transfers):
        assert time.monotonic() < deadline, "the transfers did not start"
        time.sleep(0.002)


def test_concurrent_downloads_are_served_by_the_multiplexer(mux: Multiplexer) -> None:
    """Three downloads at once: after their first block (the thread's own
    general path) they are pumped by the multiplexer, and each client gets its
    file exactly, each block once."""
    bodies = [body_of(i) for i in range(3)]
    transfers = [Transfer(mux, b) for b in bodies]
    try:
        start_all(transfers, mux)
        assert run_clients(transfers) == []
        for t, b in zip(transfers, bodies):
            t.thread.join(10)
            assert not t.thread.is_alive()
            assert t.engine.outcome == Outcome.OK and bytes(t.got) == b and not t.error
            assert set(t.data.values()) == {1}
        assert 3 <= mux.runs <= 12       # about one pump each: the timer never expired
        assert mux.pumping == 0
    finally:
        for t in transfers:
            t.close()


def test_alone_a_download_pumps_in_its_own_thread(mux: Multiplexer) -> None:
    t = Transfer(mux, body_of(1))
    try:
        t.thread.start()
        assert run_clients([t]) == []
        t.thread.join(10)
        assert t.engine.outcome == Outcome.OK and bytes(t.got) == body_of(1)
        assert mux.runs == 0
    finally:
        t.close()


def test_a_window_too_big_for_the_send_buffer_stays_in_its_thread(mux: Multiplexer) -> None:
    """Windowsize 16 of 8192-byte blocks (131 kB a window) is never served
    by the multiplexer, whose writes must not wait for a slow reader."""
    assert not Multiplexer.fits(Transfer(mux, b"", windowsize=16, blksize=8192).engine)
    assert Multiplexer.fits(Transfer(mux, b"", windowsize=16, blksize=1468).engine)
    assert Multiplexer.fits(Transfer(mux, b"", windowsize=1, blksize=65464).engine)


def test_a_lost_ack_times_out_and_the_block_is_sent_again(mux: Multiplexer) -> None:
    """A client that does not answer block 20 in the multiplexer: its timer
    expires there, the transfer's thread resends block 20, and the transfer
    goes on and completes; the other one is not held up meanwhile."""
    bodies = [body_of(i) for i in range(2)]
    transfers = [Transfer(mux, b, rto=Rto(0.3, fixed=True)) for b in bodies]
    try:
        start_all(transfers, mux)
        start = time.monotonic()
        assert run_clients(transfers, {0: {"hold": 20}}) == []
        for t, b in zip(transfers, bodies):
            t.thread.join(10)
            assert t.engine.outcome == Outcome.OK and bytes(t.got) == b
        assert transfers[0].data[20] == 2 and set(transfers[1].data.values()) == {1}
        assert time.monotonic() - start < 5
        assert mux.runs >= 3             # back to the multiplexer after the resend
    finally:
        for t in transfers:
            t.close()


def test_a_forced_stop_ends_a_transfer_waiting_in_the_multiplexer(mux: Multiplexer) -> None:
    """Shut down for reading while the multiplexer waits for its ACK: the
    transfer ends at once with ERROR 0 to the client."""
    bodies = [body_of(i) for i in range(2)]
    transfers = [Transfer(mux, b) for b in bodies]
    try:
        start_all(transfers, mux)
        for t in transfers:
            assert t.recv()[:4] == b"\x00\x03\x00\x01"
            t.ack(1)
        for t in transfers:
            assert t.recv()[:4] == b"\x00\x03\x00\x02"   # sent by the multiplexer
        deadline = time.monotonic() + 10
        while len(mux._table) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        transfers[0].stopped = True
        transfers[0].server.shutdown(socket.SHUT_RD)
        packet = transfers[0].recv()
        assert packet[:4] == b"\x00\x05\x00\x00" and b"shutting down" in packet
        transfers[0].thread.join(10)
        assert not transfers[0].thread.is_alive()
        assert transfers[0].engine.outcome != Outcome.OK
        transfers[1].ack(2)                                  # the other goes on
        assert transfers[1].recv()[:4] == b"\x00\x03\x00\x03"
        transfers[1].stopped = True
        transfers[1].server.shutdown(socket.SHUT_RD)
    finally:
        for t in transfers:
            t.close()


class FailingSource(BytesSource):
    def packet(self, index: int, number: int) -> bytes:
        if index == 30:
            raise OSError(errno.EIO, "Input/output error")
        return super().packet(index, number)


def test_a_read_error_in_the_multiplexer_ends_with_error_0(mux: Multiplexer) -> None:
    bodies = [body_of(i) for i in range(2)]
    transfers = [Transfer(mux, bodies[0], source=FailingSource(bodies[0], BLOCK)),
                 Transfer(mux, bodies[1])]
    try:
        start_all(transfers, mux)
        assert run_clients(transfers) == []
        assert transfers[0].error == b"\x00\x05\x00\x00Read error\x00"
        assert max(transfers[0].data) == 29
        for t in transfers:
            t.thread.join(10)
        assert transfers[0].engine.outcome == Outcome.ERROR
        assert "read failed" in transfers[0].engine.message
        assert transfers[1].engine.outcome == Outcome.OK and bytes(transfers[1].got) == bodies[1]
    finally:
        for t in transfers:
            t.close()


class _BrokenPoll:
    """An epoll whose ``poll`` fails after ``after`` calls."""

    def __init__(self, real: Any, after: int) -> None:
        self.real = real
        self.after = after

    def poll(self, timeout: float) -> List[Tuple[int, int]]:
        self.after -= 1
        if self.after < 0:
            raise RuntimeError("a bug in the multiplexer's loop")
        return self.real.poll(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class BreakingMultiplexer(Multiplexer):
    """Its first loop fails after 40 waits."""

    breaks = 1

    def _serve(self) -> None:
        if self.breaks:
            self.breaks -= 1
            self._epoll = _BrokenPoll(self._epoll, 40)
        super()._serve()


class Collect(tftpd_log.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: tftpd_log.Record) -> None:
        self.messages.append(record.getMessage())


def test_a_failing_multiplexer_gives_its_transfers_back() -> None:
    """Its loop raising hands every transfer back to its thread (logged),
    and the next pump starts a new loop: every download completes."""
    log = tftpd_log.getLogger("tftpd")
    collect = Collect()
    log.handlers.append(collect)
    mux = BreakingMultiplexer()
    bodies = [body_of(i) for i in range(3)]
    transfers = [Transfer(mux, b, rto=Rto(0.3, fixed=True)) for b in bodies]
    try:
        start_all(transfers, mux)
        assert run_clients(transfers) == []
        for t, b in zip(transfers, bodies):
            t.thread.join(10)
            assert t.engine.outcome == Outcome.OK and bytes(t.got) == b
        assert any("internal error in the multiplexer" in m for m in collect.messages)
        assert mux.runs > 3               # pumped there again once the loop was restarted
    finally:
        log.handlers.remove(collect)
        for t in transfers:
            t.close()


def test_a_forked_process_starts_its_own_loop(mux: Multiplexer) -> None:
    """The loop's thread does not survive a fork: a child serving through
    the same multiplexer object starts its own."""
    bodies = [body_of(i) for i in range(2)]
    first = [Transfer(mux, b) for b in bodies]
    try:
        start_all(first, mux)
        assert run_clients(first) == []
    finally:
        for t in first:
            t.close()
    assert mux.runs >= 2
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            again = [Transfer(mux, b) for b in bodies]
            start_all(again, mux)
            if run_clients(again) == [] and all(bytes(t.got) == b for t, b in zip(again, bodies)):
                code = 0
            for t in again:
                t.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
