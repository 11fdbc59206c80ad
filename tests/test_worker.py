"""``worker.drive`` on real sockets: the loop a leading worker runs for a
small transfer, waiting for its own datagrams and for the request sockets."""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator, List, Tuple

import pytest

from link import BytesSource
from tftpd.transfer import Outcome, Rto, Sender
from tftpd.worker import _drive_watching, drive, make_transmit


@pytest.fixture
def pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    """(server's unconnected transfer socket, client socket), on loopback."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client.bind(("127.0.0.1", 0))
    client.settimeout(10)
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def sender(server: socket.socket, client: socket.socket, body: bytes) -> Sender:
    return Sender(BytesSource(body, 512), client.getsockname(), make_transmit(server),
                  blksize=512, rto=Rto(5.0))


def test_watching_drive_calls_back_while_the_transfer_waits(pair) -> None:
    """The watched descriptor readable while DATA waits for its ACK: the
    callback runs (and, once it says False, is no longer watched); the
    transfer still ends normally."""
    server, client = pair
    body = b"b" * 700                               # two blocks
    engine = sender(server, client, body)
    ring_r, ring_w = socket.socketpair()
    calls: List[int] = []

    def call() -> bool:
        calls.append(1)
        return False                                # stop watching (left readable)

    done = threading.Thread(target=drive, args=(engine, server),
                            kwargs={"watch": (ring_r.fileno(), call)})
    try:
        done.start()
        got, tid = client.recvfrom(600)
        assert got[:4] == b"\x00\x03\x00\x01"
        ring_w.send(b"x")                           # readable from now on
        deadline = time.monotonic() + 10
        while not calls:
            assert time.monotonic() < deadline, "the callback did not run"
            time.sleep(0.005)
        assert calls == [1]
        client.sendto(b"\x00\x04\x00\x01", tid)
        got, _ = client.recvfrom(600)
        assert got == b"\x00\x03\x00\x02" + body[512:]
        client.sendto(b"\x00\x04\x00\x02", tid)
        done.join(10)
        assert not done.is_alive() and engine.outcome == Outcome.OK
        assert calls == [1]                         # not called again once it said False
    finally:
        ring_r.close()
        ring_w.close()


def test_watching_drive_takes_the_transfers_datagram_first(pair) -> None:
    """Both ready at once: the final ACK ends the transfer and the watched
    descriptor is left to whoever reads it next, who is told it is readable
    (True); without it readable, False."""
    server, client = pair
    engine = sender(server, client, b"s" * 100)
    ring_r, ring_w = socket.socketpair()
    calls: List[int] = []
    try:
        engine.start(time.monotonic())              # DATA 1 goes out now
        got, tid = client.recvfrom(600)
        client.sendto(b"\x00\x04\x00\x01", tid)
        ring_w.send(b"x")
        time.sleep(0.05)                            # both queued before the wait
        assert _drive_watching(engine, server, bytearray(1024), engine.receive,
                               time.monotonic, (ring_r.fileno(), lambda: bool(calls.append(1))))
        assert engine.outcome == Outcome.OK and calls == []
        ring_r.recv(1)                              # (read by "whoever reads it next")
        engine = sender(server, client, b"s" * 100)
        engine.start(time.monotonic())
        got, tid = client.recvfrom(600)
        client.sendto(b"\x00\x04\x00\x01", tid)
        time.sleep(0.05)
        assert not _drive_watching(engine, server, bytearray(1024), engine.receive,
                                   time.monotonic, (ring_r.fileno(), lambda: True))
        assert engine.outcome == Outcome.OK
    finally:
        ring_r.close()
        ring_w.close()


def test_watching_drive_ends_at_once_on_a_forced_stop(pair) -> None:
    """``shutdown(SHUT_RD)`` from another thread (a forced stop) ends the
    transfer with ERROR 0 to the peer."""
    server, client = pair
    engine = sender(server, client, b"f" * 100)
    ring_r, ring_w = socket.socketpair()
    done = threading.Thread(target=drive, args=(engine, server),
                            kwargs={"watch": (ring_r.fileno(), lambda: True)})
    try:
        done.start()
        got, tid = client.recvfrom(600)
        assert got[:4] == b"\x00\x03\x00\x01"
        try:
            server.shutdown(socket.SHUT_RD)
        except OSError:
            pass                                    # ENOTCONN: the wake-up happens anyway
        done.join(10)
        assert not done.is_alive()
        assert engine.outcome == Outcome.ERROR and engine.message == "Server shutting down"
        got, _ = client.recvfrom(600)
        assert got[:4] == b"\x00\x05\x00\x00" and b"shutting down" in got
    finally:
        ring_r.close()
        ring_w.close()


def test_watching_drive_traces_what_it_receives(pair) -> None:
    """``-s`` on the leader's path: every datagram received is traced."""
    server, client = pair
    engine = sender(server, client, b"t" * 10)
    ring_r, ring_w = socket.socketpair()
    seen: List[Tuple[str, bytes]] = []
    done = threading.Thread(target=drive, args=(engine, server), kwargs={
        "watch": (ring_r.fileno(), lambda: True),
        "trace": lambda way, addr, parts: seen.append((way, bytes(parts[0])))})
    try:
        done.start()
        got, tid = client.recvfrom(600)
        assert got == b"\x00\x03\x00\x01" + b"t" * 10
        client.sendto(b"\x00\x04\x00\x01", tid)
        done.join(10)
        assert not done.is_alive() and engine.outcome == Outcome.OK
        assert seen == [("<", b"\x00\x04\x00\x01")]
    finally:
        ring_r.close()
        ring_w.close()
