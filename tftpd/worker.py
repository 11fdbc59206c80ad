"""One transfer on one socket: the thin driver around a sans-IO engine.

The per-block path is: read into a preallocated buffer, hand a memoryview to
the engine, which calls ``transmit`` -> ``send`` with a memoryview of the
source's buffer (DATA header and file data, no copy).  The receive timeout is
the socket's SO_RCVTIMEO, set only when the needed wait changes (a Python
socket timeout would add a ``poll()`` to every receive).  On a connected
socket the pump reads and writes with ``os.readv``/``os.write`` (``os.writev``
for a mapped file's header and payload): the same system calls as
``recv_into``/``send``, with about 650 fewer instructions per block of
argument parsing.

The socket is normally *connected* to the peer: the kernel then drops
datagrams from anyone else before they reach it (the server answers those
with ERROR 5 from a second socket on the same port), and no address is built
or parsed per datagram (about a quarter of the per-block cost).  Without a
connection (no SO_REUSEPORT) every datagram's address goes to the engine,
which answers strays itself.

While other connected senders pump in the same process, the pump runs in the
process's multiplexer (``mux``: one thread and ``epoll`` for all of them), and
this thread waits for it to hand the transfer back.

A worker that also reads requests (the server's leader, serving a small file)
waits in ``poll()`` for its socket and the request sockets together
(``watch``); the transfer's own datagrams are handled first.
"""

from __future__ import annotations

import _socket
import os
import select
import struct
import time
from functools import partial

from .packets import ErrorCode
from .transfer import Receiver, Sender, send_failed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional, Tuple, Union

    from .mux import Multiplexer
    from .trace import Trace
    from .transfer import Address, Packet

    Engine = Union[Sender, Receiver]
    Buffer = Union[bytes, bytearray, memoryview]

__all__ = ["drive", "make_transmit"]

_DONTWAIT = getattr(_socket, "MSG_DONTWAIT", 0)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_HANGUP = _POLLRDHUP | select.POLLHUP
_SENDER_RECV = 1024     # ACKs are 4 bytes; a longer ERROR is read truncated


def make_transmit(sock: _socket.socket, trace: Optional[Trace] = None,
                  peer: Optional[Address] = None) -> Callable[[Packet, Address], None]:
    """``transmit(packet, addr)`` for an engine; with ``peer``, ``sock`` is
    connected to it and packets to ``peer`` (the same object) go by ``send``.
    A (header, payload) packet goes by ``sendmsg``; EFAULT from it (the
    mapped file shrank) is raised as a read error."""
    sendto = sock.sendto
    send = sock.send
    sendmsg = sock.sendmsg

    def transmit(packet: Packet, addr: Address) -> None:
        try:
            if isinstance(packet, tuple):
                if addr is peer:
                    sendmsg(packet)
                else:
                    sendmsg(packet, (), 0, addr)
            elif addr is peer:
                send(packet)
            else:
                sendto(packet, addr)
        except OSError as e:
            send_failed(e)
    if trace is None:
        return transmit

    def traced(packet: Packet, addr: Address) -> None:   # -s only
        trace(">", addr, packet if isinstance(packet, tuple) else (packet,))
        transmit(packet, addr)
    return traced


def _set_timeout(sock: _socket.socket, ms: int) -> None:
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO,
                    struct.pack("ll", ms // 1000, (ms % 1000) * 1000))


def _never() -> bool:
    return False


def drive(engine: Engine, sock: _socket.socket,
          clock: Callable[[], float] = time.monotonic,
          trace: Optional[Trace] = None, connected: bool = False,
          stopped: Callable[[], bool] = _never,
          watch: Optional[Tuple[int, Callable[[], bool]]] = None,
          mux: Optional[Multiplexer] = None) -> bool:
    """Run a transfer until it ends.  True: ``watch``'s descriptor was
    readable at the end and ``call()`` was not made for it.

    ``connected``: ``sock`` is connected to ``engine.peer``, so every datagram
    read comes from it.  ``sock.shutdown(SHUT_RD)`` from another thread makes
    the transfer end at once with an ERROR to the peer (a forced stop); on a
    connected socket that reads as an empty datagram, so whoever shuts it
    down first makes ``stopped()`` true.
    ``trace`` (``-s``) sees every datagram received; without it the loop is
    untouched.
    ``watch`` (``fd``, ``call``), unconnected only: while waiting, also wait
    for ``fd`` to be readable and then ``call()`` (False: stop watching it);
    datagrams for the transfer come first.
    ``mux``: the process's multiplexer, which serves a connected sender's
    pump while other transfers pump too.
    """
    # A receiver sees one byte more than a full DATA, so an oversized one is
    # caught; a sender needs room for ACK and ERROR only (memory in storms).
    buf = bytearray(engine.blksize + 5 if isinstance(engine, Receiver) else _SENDER_RECV)
    receive = engine.receive
    if trace is not None:
        untraced = receive

        def receive(data: Buffer, addr: Address, now: float) -> None:
            trace("<", addr, (data,))
            untraced(data, addr, now)
    if watch is not None and not connected:
        engine.start(clock())
        return _drive_watching(engine, sock, buf, receive, clock, watch)
    view = memoryview(buf)
    recv = sock.recvfrom_into
    recv_connected = sock.recv_into
    peer = engine.peer
    pump: Optional[Sender] = None     # the engine, when its pump applies
    if connected and trace is None and isinstance(engine, Sender):
        pump = engine
        fd = sock.fileno()
        read = partial(os.readv, fd, [buf])
        gathered = getattr(engine.source, "gathered", False)   # (header, payload) pairs
        write = partial(os.writev if gathered else os.write, fd)
    if pump is None or mux is None or not mux.fits(pump):
        mux = None
    addr: Optional[Address]
    inf = float("inf")
    current_ms = -1
    engine.start(clock())
    if mux is not None:
        mux.enter()
    try:
        while True:
            deadline = engine.deadline
            if deadline == inf:
                return False
            wait = deadline - clock()
            if wait <= 0:
                engine.on_timer(clock())
                continue
            ms = int(wait * 1000) + 1
            if ms != current_ms:
                _set_timeout(sock, ms)
                current_ms = ms
            try:
                if connected:
                    if pump is None:
                        n = recv_connected(buf)
                    elif mux is not None and mux.wanted():
                        current_ms = -1           # (it sets the socket's timeout)
                        n = mux.run(pump, sock, pump.steps(read, write, buf, clock, True))
                    else:
                        n = pump.pump(read, write, buf, clock)
                    if n < 0:
                        continue              # pump: re-arm the timer
                    addr = None if not n and stopped() else peer
                else:
                    n, addr = recv(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionRefusedError:
                continue    # ICMP port unreachable for an earlier datagram: the timer decides
            except OSError:
                engine.abort(ErrorCode.UNDEFINED, "Server error")
                return False
            if addr is None:                  # shut down for a forced stop
                engine.abort(ErrorCode.UNDEFINED, "Server shutting down")
                return False
            receive(view[:n], addr, clock())
    finally:
        if mux is not None:
            mux.leave()


def _drive_watching(engine: Engine, sock: _socket.socket, buf: bytearray,
                    receive: Callable[[Buffer, Address, float], None],
                    clock: Callable[[], float], watch: Tuple[int, Callable[[], bool]]) -> bool:
    """``drive``'s loop for an unconnected socket that waits in ``poll()``
    for it and for ``watch``'s descriptor (True: readable at the end)."""
    fd, call = watch
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | _POLLRDHUP)
    poller.register(fd, select.POLLIN)
    watching = True
    own = sock.fileno()
    recv = sock.recvfrom_into
    view = memoryview(buf)
    inf = float("inf")
    while True:
        deadline = engine.deadline
        if deadline == inf:
            return False
        wait = deadline - clock()
        if wait <= 0:
            engine.on_timer(clock())
            continue
        other = False
        found = poller.poll(int(wait * 1000) + 1)
        for ready, events in found:
            if ready != own:
                other = True
                continue
            try:
                n, addr = recv(buf, 0, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if events & _HANGUP:          # nothing left and shut down: a forced stop
                    engine.abort(ErrorCode.UNDEFINED, "Server shutting down")
                    return False
                continue
            except ConnectionRefusedError:
                continue
            except OSError:
                engine.abort(ErrorCode.UNDEFINED, "Server error")
                return False
            if addr is None:                  # shut down for a forced stop
                engine.abort(ErrorCode.UNDEFINED, "Server shutting down")
                return False
            receive(view[:n], addr, clock())
            if engine.deadline == inf:
                return len(found) > 1         # the transfer first; the caller reads fd
        if other and watching and not call():
            poller.unregister(fd)
            watching = False
