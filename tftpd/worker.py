"""One transfer on one socket: the thin driver around a sans-IO engine.

The per-block path is: ``recvfrom_into`` a preallocated buffer, hand a
memoryview to the engine, which calls ``transmit`` -> ``sendto`` with a
memoryview of the source's buffer (DATA header and file data, no copy).  The receive timeout is the
socket's SO_RCVTIMEO, set only when the needed wait changes (a Python socket
timeout would add a ``poll()`` to every receive).
"""

from __future__ import annotations

import socket
import struct
import time

from .packets import ErrorCode
from .transfer import Receiver, Sender

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional, Union

    from .trace import Trace
    from .transfer import Address

    Engine = Union[Sender, Receiver]
    Buffer = Union[bytes, bytearray, memoryview]

__all__ = ["drive", "make_transmit"]

_SENDER_RECV = 1024     # ACKs are 4 bytes; a longer ERROR is read truncated


def make_transmit(sock: socket.socket, trace: Optional[Trace] = None
                  ) -> Callable[[Buffer, Address], None]:
    sendto = sock.sendto

    def transmit(packet: Buffer, addr: Address) -> None:
        try:
            sendto(packet, addr)
        except OSError:
            pass   # ENOBUFS, EPERM from a firewall...: a lost datagram, the timer resends
    if trace is None:
        return transmit

    def traced(packet: Buffer, addr: Address) -> None:   # -s only
        trace(">", addr, (packet,))
        transmit(packet, addr)
    return traced


def _set_timeout(sock: socket.socket, ms: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", ms // 1000, (ms % 1000) * 1000))


def drive(engine: Engine, sock: socket.socket,
          clock: Callable[[], float] = time.monotonic,
          trace: Optional[Trace] = None) -> None:
    """Run a transfer until it ends.

    ``sock.shutdown(SHUT_RD)`` from another thread makes the transfer end at
    once with an ERROR to the peer (a forced stop).  ``trace`` (``-s``) sees
    every datagram received; without it the loop is untouched.
    """
    # A receiver sees one byte more than a full DATA, so an oversized one is
    # caught; a sender needs room for ACK and ERROR only (memory in storms).
    buf = bytearray(engine.blksize + 5 if isinstance(engine, Receiver) else _SENDER_RECV)
    view = memoryview(buf)
    recv = sock.recvfrom_into
    receive = engine.receive
    if trace is not None:
        untraced = receive

        def receive(data: Buffer, addr: Address, now: float) -> None:
            trace("<", addr, (data,))
            untraced(data, addr, now)
    inf = float("inf")
    current_ms = -1
    engine.start(clock())
    while True:
        deadline = engine.deadline
        if deadline == inf:
            return
        wait = deadline - clock()
        if wait <= 0:
            engine.on_timer(clock())
            continue
        ms = int(wait * 1000) + 1
        if ms != current_ms:
            _set_timeout(sock, ms)
            current_ms = ms
        try:
            n, addr = recv(buf)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            engine.abort(ErrorCode.UNDEFINED, "Server error")
            return
        if addr is None:                  # shut down for a forced stop
            engine.abort(ErrorCode.UNDEFINED, "Server shutting down")
            return
        receive(view[:n], addr, clock())
