"""One transfer on one socket: the thin driver around a sans-IO engine.

The per-block path is: ``recvfrom_into`` a preallocated buffer, hand a
memoryview to the engine, which calls ``transmit`` -> ``sendmsg`` with the
DATA header and a memoryview of file data.  The receive timeout is the
socket's SO_RCVTIMEO, set only when the needed wait changes (a Python socket
timeout would add a ``poll()`` to every receive).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Callable, Optional, Sequence, Union

from .packets import ErrorCode
from .trace import Trace
from .transfer import Address, Receiver, Sender

__all__ = ["drive", "make_transmit"]

Engine = Union[Sender, Receiver]
Buffer = Union[bytes, bytearray, memoryview]

_RECV_SIZE = 65536 + 4


def make_transmit(sock: socket.socket, trace: Optional[Trace] = None
                  ) -> Callable[[Sequence[Buffer], Address], None]:
    sendmsg = sock.sendmsg

    def transmit(buffers: Sequence[Buffer], addr: Address) -> None:
        try:
            sendmsg(buffers, (), 0, addr)
        except (BlockingIOError, InterruptedError, ConnectionRefusedError):
            pass   # a lost datagram: the timer will resend it
        except OSError:
            pass
    if trace is None:
        return transmit

    def traced(buffers: Sequence[Buffer], addr: Address) -> None:   # -s only
        trace(">", addr, buffers)
        transmit(buffers, addr)
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
    buf = bytearray(_RECV_SIZE)
    view = memoryview(buf)
    recv = sock.recvfrom_into
    receive = engine.receive
    if trace is not None:
        untraced = receive

        def receive(data: memoryview, addr: Address, now: float) -> None:  # type: ignore[misc]
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
