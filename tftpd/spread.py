"""Requests shared out between serving processes (``--processes``).

The main process alone reads the request socket.  It serves a new request
itself while it has no more requests in hand than the least busy other
process, and otherwise passes it to that process: the datagram as read, the
client's address, the local address to answer from and the arrival time, over
a ``SOCK_SEQPACKET`` pair made before the fork (the other end is that
process's inbox, which it reads as the main process reads the request socket).

So a client that asks for one file after another is served by one warm process
(with ``SO_REUSEPORT`` each new client port hashed to any of the processes,
which cost a sequential client about half again as much CPU per request), and
a storm is spread evenly instead of by a hash.

Load: each other process counts the requests it is done with (served, dropped
or found to be a retransmission) in its slot of an array shared by all; the main
process counts what it passed to each, so the difference is the number that
process has in hand, requests still on their way included.  A retransmitted
request goes where the first one went (by the same (client, datagram) key the
processes use to recognise one), so the process serving it recognises it.
"""

from __future__ import annotations

import _socket
import marshal

from . import log as logsetup

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Tuple

__all__ = ["Shared", "Router", "channel", "unpack"]

log = logsetup.getLogger("tftpd")

MESSAGE_MAX = 65536     # what an inbox reads at once (a request is far shorter)
STICKY_MAX = 4096       # requests remembered for their retransmissions; then forgotten at once
_GONE = 1 << 60         # the load of a process that cannot be reached


class Shared:
    """The counters of the other processes: ``done[i]`` is written only by
    process ``i`` (one 8-byte word each, under that process's lock) and read
    by the main process.  Made before the fork (an anonymous shared map)."""

    def __init__(self, count: int) -> None:
        import mmap             # here: inetd starts never need it
        self._map = mmap.mmap(-1, 8 * max(count, 1))
        self.done = memoryview(self._map).cast("q")


def channel() -> Tuple[_socket.socket, _socket.socket]:
    """(the main process's end, the other process's inbox)."""
    main_end, inbox = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    main_end.setblocking(False)
    return main_end, inbox


class Router:
    """In the main process: where each new request goes."""

    __slots__ = ("outs", "done", "pids", "sent", "sticky")

    def __init__(self, outs: List[_socket.socket], done: Any, pids: List[int]) -> None:
        self.outs = outs
        self.done = done
        self.pids = pids
        self.sent = [0] * len(outs)     # requests passed to each process
        self.sticky: Dict[Any, int] = {}

    def pick(self, key: Any, mine: int) -> int:
        """The process for a new request (-1: this one), given that this one
        has ``mine`` requests in hand; ties stay here."""
        where = self.sticky.get(key)
        if where is not None:
            return where
        done = self.done
        least = mine
        where = -1
        for i, sent in enumerate(self.sent):
            load = sent - done[i]
            if load < least:
                where, least = i, load
        if where >= 0:
            sticky = self.sticky
            if len(sticky) >= STICKY_MAX:
                sticky.clear()
            sticky[key] = where
        return where

    def send(self, where: int, key: Any, bind: Any, family: int, arrived: float) -> bool:
        """Pass a request on; False if it cannot be (that process's inbox is
        full, or it is gone: it is then never picked again)."""
        peer, data = key
        message = marshal.dumps((data, peer, bind, int(family), arrived))
        if len(message) > MESSAGE_MAX:
            return False
        try:
            self.outs[where].send(message)
        except BlockingIOError:
            return False
        except OSError as e:
            self.sent[where] = _GONE
            log.warning("serving process %d is gone (%s): the others serve its share",
                        self.pids[where], e.strerror or e)
            return False
        self.sent[where] += 1
        return True


def unpack(message: bytes) -> Tuple[bytes, Any, Any, int, float]:
    """(request datagram, peer, local address, family, arrival) from an inbox
    message; ValueError if it is not one."""
    try:
        data, peer, bind, family, arrived = marshal.loads(message)
    except (EOFError, TypeError, ValueError) as e:
        raise ValueError(f"bad message: {e}") from None
    return data, peer, bind, family, arrived
