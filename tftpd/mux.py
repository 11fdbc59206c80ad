"""Many connected senders' per-block paths in one thread.

A lock-step download served by a thread of its own costs that thread a sleep
and a wake-up per block: two context switches, and the GIL taken again, for
the few microseconds of work between an ACK and the next DATA.  When several
transfers pump at once (a boot storm), one thread per process serves them all
instead: it waits in ``epoll`` for any of their sockets and resumes that
transfer's ``Sender.steps`` generator, which reads the ACK, sends the next
window and yields.  Under load ``epoll`` returns many sockets at a time, so the
process runs on with no switch at all; the transfers' own threads wait on a
lock meanwhile and take over again whenever ``steps`` returns (anything but a
window's ACK: a duplicate, an ERROR, the final ACK...), raises, or its timer
expires (a retransmission: the general path).

The multiplexer serves a transfer only while another one pumps in the same
process (``THRESHOLD``): alone, a blocking read in the transfer's own thread is
one system call fewer per block.  Its reads stay blocking reads of a readable
socket; the socket's receive timeout is 1 ms meanwhile, so a datagram that
vanishes between ``epoll`` and the read (a bad checksum) stalls the others for
no longer than that.  Its writes block as the thread's would: only windows that
fit in a fraction of the socket's send buffer come here (``fits``), and a
window is sent only once the previous one has been acknowledged, that is read.
"""

from __future__ import annotations

import _socket
import os
import select
import struct
import threading
import time

from . import log as logsetup

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Generator, Optional

    from .transfer import Sender

__all__ = ["Multiplexer", "THRESHOLD", "WINDOW_BYTES"]

THRESHOLD = 2           # transfers pumping in this process from which they come here
WINDOW_BYTES = 65536    # the most a window may put on the wire to come here
TICK = 0.02             # the timers are checked this often while transfers are here
_ONE_MS = struct.pack("ll", 0, 1000)

log = logsetup.getLogger("tftpd")


class _Entry:
    __slots__ = ("steps", "engine", "done", "result", "error")

    def __init__(self, steps: Generator[None, None, int], engine: Sender, done: Any) -> None:
        self.steps = steps
        self.engine = engine
        self.done = done                # released when the transfer leaves
        self.result = -1                # what steps returned (-1: the timer expired)
        self.error: Optional[BaseException] = None


class Multiplexer:
    """One per process: ``run()`` serves a transfer's ``steps`` here until it
    returns, from the calling thread, which waits meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pumping = 0                          # transfers pumping here or in their threads
        self.runs = 0                             # pumps served here so far
        self._table: Dict[int, _Entry] = {}       # fd -> transfer served here
        self._epoll: Any = None
        self._wake_r = self._wake_w = -1
        self._pid = 0                             # the process whose thread runs

    @staticmethod
    def fits(engine: Sender) -> bool:
        return engine.window * (engine.blksize + 4) <= WINDOW_BYTES

    def enter(self) -> None:
        with self._lock:
            self.pumping += 1

    def leave(self) -> None:
        with self._lock:
            self.pumping -= 1

    def wanted(self) -> bool:
        return self.pumping >= THRESHOLD

    def run(self, engine: Sender, sock: _socket.socket, steps: Generator[None, None, int]) -> int:
        """Serve ``steps`` (``engine.steps(..., wait=True)``, reading ``sock``)
        here; what it returns, -1 if the timer expired first; what it raised
        is raised.  The caller must set the socket's receive timeout again."""
        next(steps)                               # (it yields before any read)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, _ONE_MS)
        done = threading.Lock()
        done.acquire()
        entry = _Entry(steps, engine, done)
        fd = sock.fileno()
        with self._lock:
            self.runs += 1
            if self._pid != os.getpid():
                self._start()
            idle = not self._table
            self._table[fd] = entry
            self._epoll.register(fd, select.EPOLLIN)
            if idle:                              # it waits without a timeout: wake it
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:
                    pass                          # (then it is awake already)
        done.acquire()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _start(self) -> None:
        self._pid = os.getpid()                   # (a forked process starts its own)
        self._table.clear()
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        threading.Thread(target=self._loop, name="tftpd-mux", daemon=True).start()

    def _leave(self, fd: int, entry: _Entry) -> None:
        with self._lock:
            del self._table[fd]
            self._epoll.unregister(fd)
        entry.done.release()

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException:  # noqa: B036 - a bug here must not leave the transfers waiting
            log.exception("internal error in the multiplexer: its transfers go back to their threads")
            with self._lock:
                self._pid = 0                     # the next run() starts another thread
                entries = list(self._table.values())
                self._table.clear()
                self._epoll.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
            for entry in entries:
                try:
                    entry.steps.close()
                except BaseException:  # noqa: B036
                    pass
                entry.done.release()

    def _serve(self) -> None:
        poll = self._epoll.poll
        table = self._table
        wake = self._wake_r
        clock = time.monotonic
        check = 0.0
        while True:
            for fd, _ in poll(TICK if table else -1):
                entry = table.get(fd)
                if entry is None:
                    if fd == wake:
                        try:
                            os.read(wake, 512)
                        except BlockingIOError:
                            pass
                    continue
                try:
                    next(entry.steps)
                    continue
                except StopIteration as e:
                    entry.result = e.value
                except BaseException as e:  # noqa: B036 - the transfer's thread raises it
                    entry.error = e
                self._leave(fd, entry)
            now = clock()
            if now >= check:
                check = now + TICK
                for fd, entry in list(table.items()):
                    if entry.engine.deadline <= now:
                        try:
                            entry.steps.close()   # (writes the state back)
                        except BaseException as e:  # noqa: B036
                            entry.error = e
                        self._leave(fd, entry)
