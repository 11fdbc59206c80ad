"""The request loop and the worker pool.

Every front door (inetd's fd 0, systemd's fd 3, a socket bound for ``-p``)
hands the server its listening sockets; the server reads requests, drops junk
and duplicates, and gives each new request to a worker thread (at most ``-c``
at once, then a bounded queue).  Each transfer runs on a new socket bound to
the local address the request was sent to.
"""

from __future__ import annotations

import _socket
import collections
import os
import select
import sys
import threading
import time

from . import log as logsetup
from . import paths
from .admission import Admission
from .mux import Multiplexer
from .packets import MalformedPacket, Opcode, Request, TftpError, decode
from .trace import describe, tracer
from .transfer import Outcome, Receiver, Rto, Sender, stray_reply
from .worker import drive, make_transmit

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal      # typed; at run time the same functions from _signal
    from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

    from .admission import Plan, Policy
    from .config import Config
    from .spread import Router
    from .trace import Trace

    Address = Tuple[Any, ...]      # (host, port) or (host, port, flowinfo, scope_id)
    Engine = Union[Sender, Receiver]
else:
    # _socket and _signal, not socket and signal: the same functions and
    # constants without the enums that socket.py and signal.py build from
    # them, which cost an inetd start about 4 ms with the enum module
    # (packets.Opcode is plain ints for the same reason).
    import _signal

__all__ = ["Server", "Job", "bind_standalone", "local_address",
           "bind_transfer", "stray_catcher"]

log = logsetup.getLogger("tftpd")

_IP_PKTINFO = getattr(_socket, "IP_PKTINFO", 8)
_IPV6_RECVPKTINFO = getattr(_socket, "IPV6_RECVPKTINFO", 49)
_IPV6_PKTINFO = getattr(_socket, "IPV6_PKTINFO", 50)
_SO_TIMESTAMPNS = getattr(_socket, "SO_TIMESTAMPNS", 35)
# module-level names for the per-request path (no module attribute look-ups)
_SOL_IP, _SOL_IPV6 = _socket.IPPROTO_IP, _socket.IPPROTO_IPV6
_AF_INET, _AF_INET6 = _socket.AF_INET, _socket.AF_INET6
_inet_ntop = _socket.inet_ntop
_V4_NAMES: Dict[bytes, str] = {}    # local_address: ipi_spec_dst -> its text
_ANC_SIZE = _socket.CMSG_SPACE(20) + _socket.CMSG_SPACE(12) + _socket.CMSG_SPACE(16)
_REQUEST_MAX = 65536
_THREAD_STACK = 512 * 1024
_SO_REUSEPORT = getattr(_socket, "SO_REUSEPORT", None)
_REQUESTS, _STRAYS, _WAKE, _GROUP = 0, 1, 2, 3   # what a descriptor of the request loop is for
_LEADER_BATCH = 64     # datagrams a leading worker reads in a row looking for a request
_STRAY_BATCH = 64      # strays answered per catcher per wake-up of the request loop
# A transfer socket is connected (with a stray catcher beside it) only when the
# transfer is expected to be at least this many blocks: the set-up costs about
# what ten blocks save, and most small files are one or two blocks.
CONNECT_MIN_BLOCKS = 32
STOP_GRACE = 60.0      # SIGTERM/SIGINT: running transfers get this long to finish
DALLY_MIN = 1.0        # after a WRQ: a client's resend of its last DATA comes after its own timer
PENDING_POLL = 0.5     # inetd mode: how often the request loop looks whether transfers ended
# A leader's step that may block (opening a file) that has run this long has
# the request loop read requests meanwhile; it looks this often while lends happen.
LEND_AFTER = 0.1
SETTLE_MAX = 300.0     # a request waits at most this long for the transfer it may repeat
_get_ident = threading.get_ident
_monotonic = time.monotonic


class Job:
    """One request on its way to a worker (compared by identity)."""

    __slots__ = ("request", "peer", "local", "family", "received", "key", "engine", "ended",
                 "after")

    def __init__(self, request: Request, peer: Address, local: Address, family: int,
                 received: float, key: Tuple[Any, ...] = ()) -> None:
        self.request = request
        self.peer = peer          # normalised: v4-mapped peers become IPv4
        self.local = local        # address to bind the transfer socket to
        self.family = family
        self.received = received
        self.key = key            # (peer, request datagram): what a retransmission repeats
        self.engine: Optional[Engine] = None   # set when the transfer starts
        self.ended = False        # set before its socket is shut down to end it
        # (old job, arrival): maybe a resend of old's request (is_retransmission
        # unsure); the worker decides once old has ended
        self.after: Optional[Tuple[Job, float]] = None


def enable_pktinfo(sock: _socket.socket) -> None:
    """Ask for the destination address and the arrival time of each datagram."""
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        pass
    if sock.family == _socket.AF_INET6:
        sock.setsockopt(_socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
    try:
        sock.setsockopt(_socket.IPPROTO_IP, _IP_PKTINFO, 1)
    except OSError:
        pass


def arrival(ancdata: List[Tuple[int, int, bytes]]) -> float:
    """When the kernel received a datagram (CLOCK_REALTIME), else now."""
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
            sec = int.from_bytes(data[0:8], sys.byteorder, signed=True)
            nsec = int.from_bytes(data[8:16], sys.byteorder, signed=True)
            return sec + nsec / 1e9
    return time.time()


def is_retransmission(old: Job, arrived: float) -> Optional[bool]:
    """Is a request with the same bytes from the same port the old one again?

    While the old transfer is queued or running, yes (a resend can be delayed
    past the client's first ACK by the network), unless its last block is out:
    a client asks again right behind its last ACK, and the request may be read
    before that ACK is; then None (not known yet: ``Server._settled`` asks
    again once the old transfer has ended).  Once it is over but for
    dallying, a client sends the same request again only as a new one
    (``get f`` twice in one session), after it heard from the transfer; so it
    is still the old one if it arrived (kernel timestamp) before we sent what
    the peer first answered: a resend read late by a busy request loop (not
    the time we read that answer, which with one block is the last ACK).  A
    resend that crossed our first packet on the wire counts as new, as every
    request does for tftp-hpa.
    """
    engine = old.engine
    if engine is None:
        return True
    if engine.outcome == Outcome.RUNNING:
        return None if engine.all_sent else True
    if engine.answered_after is None:
        return True
    return arrived < engine.answered_after + (time.time() - time.monotonic())


def local_address(sock: _socket.socket, ancdata: List[Tuple[int, int, bytes]]
                  ) -> Tuple[Optional[str], int]:
    """The local address to answer a datagram from, and its interface.

    IPv4 (also on a dual-stack socket, where it comes with a v4-mapped
    IPV6_PKTINFO): ``ipi_spec_dst``, which is the destination of a unicast
    datagram and the receiving interface's own address for a broadcast one
    (nothing can be sent from a broadcast address).  IPv6: the destination,
    unless it is multicast (then None: the kernel picks the source).
    """
    v6: Optional[Tuple[Optional[str], int]] = None
    for level, kind, data in ancdata:
        if kind == _IP_PKTINFO and level == _SOL_IP and len(data) >= 12:
            raw = data[4:8]
            name = _V4_NAMES.get(raw)
            if name is None:             # the host's own addresses: a few at most
                if len(_V4_NAMES) >= 64:
                    _V4_NAMES.clear()
                name = _V4_NAMES[raw] = _inet_ntop(_AF_INET, raw)
            return name, 0
        if kind == _IPV6_PKTINFO and level == _SOL_IPV6 and len(data) >= 20:
            ifindex = int.from_bytes(data[16:20], sys.byteorder)
            addr = None if data[0] == 0xFF else _inet_ntop(_AF_INET6, data[:16])
            v6 = (addr, ifindex)
    if v6 is not None:
        return v6
    host = sock.getsockname()[0]
    return (None if host in ("0.0.0.0", "::") else host), 0


def _normalise(peer: Address, local: Optional[str], ifindex: int,
               family: int) -> Tuple[Address, Address, int]:
    """v4-mapped IPv6 peers become IPv4 (logged and served as such)."""
    host = peer[0]
    if family == _socket.AF_INET6 and host.startswith("::ffff:") and "." in host:
        if local and local.startswith("::ffff:"):
            lhost = local[7:]
        elif local and "." in local:
            lhost = local                  # from IP_PKTINFO
        else:
            lhost = "0.0.0.0"
        return (host[7:], peer[1]), (lhost, 0), _socket.AF_INET
    if family == _socket.AF_INET6:
        scope = peer[3] if len(peer) > 3 else ifindex
        return peer, (local or "::", 0, 0, scope if local and local.startswith("fe80") else 0), family
    return peer, (local or "0.0.0.0", 0), family


def show(peer: Address) -> str:
    host = peer[0]
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"


_LEAD: Any = object()      # a job that says: read the next job yourself (Pool.lead)


class _Idle:
    """A worker thread waiting for its next job: ``submit`` sets ``job`` and
    releases ``wake``, which the thread is blocked on (None: exit)."""

    __slots__ = ("wake", "job", "ident")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job: Optional[Job] = None
        self.ident = threading.get_ident()


class Pool:
    """At most ``limit`` worker threads; a bounded queue of jobs beyond that.

    A job goes straight to an idle thread when there is one (one lock release
    wakes exactly that thread), else to a new thread while fewer than
    ``limit`` run, else into the queue, which threads empty before they go
    idle.  ``on_idle`` is called (in the worker) each time the last pending
    job ends.

    With ``lead`` (leader/follower), one thread at a time finds jobs itself:
    a thread whose job ended, with nothing queued and no leader, calls
    ``lead()``, which blocks until it has a job (None: stop leading), and
    runs that job itself: no other thread is woken.  It stays the leader
    while it runs it (and may ``submit`` jobs it finds meanwhile) unless the
    job calls ``resign()``: the role then goes to an idle thread, else back to
    whoever submits (``on_lead(False)``; ``on_lead(True)`` when a thread
    takes it from them).  Around a step that may block, the leader's job
    calls ``lend()`` and ``reclaim()``, keeping the role: they only mark the
    step (no lock, no system call), and whoever submits looks at the mark
    (``lending``, at least every ``LEND_AFTER`` seconds while lends happen;
    ``on_lend`` wakes it when it stopped looking) and, if the same step has
    run that long, takes the reading over (``take_lent``) until the
    ``reclaim()`` or the job's end.  A job queued while the leader waits in ``lead()`` (the
    request loop read it meanwhile) calls ``kick()``: ``lead()`` should then
    return None, and the leader runs the queued job.  ``on_lead`` is called
    under the pool's lock, maybe twice with the same value.
    """

    def __init__(self, limit: int, queue_limit: int, run: Callable[[Job], None],
                 on_idle: Optional[Callable[[], None]] = None,
                 lead: Optional[Callable[[], Optional[Job]]] = None,
                 on_lead: Optional[Callable[[bool], None]] = None,
                 kick: Optional[Callable[[], None]] = None,
                 on_lend: Optional[Callable[[], None]] = None) -> None:
        self.limit = limit
        self.queue_limit = queue_limit
        self.run = run
        self.on_idle = on_idle
        self.lead = lead
        self.on_lead = on_lead
        self.kick = kick
        self.on_lend = on_lend
        self.leading: Optional[_Idle] = None        # the leader thread
        self.leader_runs = False                     # ... runs a job (is out of lead())
        self.lent = False                            # ... has lent the reading out
        self.lending = 0.0          # when the leader's job entered a lent step (0: none)
        self.lends = 0              # lend() calls so far
        self.unwatched = False      # nobody looks at ``lending``: lend() calls on_lend
        self.jobs: Deque[Job] = collections.deque()
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)   # close() waits on it
        self.waiting = 0                             # threads in close()
        self.idle: List[_Idle] = []
        self.threads = 0
        self.busy = 0
        self.closed = False

    @property
    def leader(self) -> bool:
        return self.leading is not None

    def is_leading(self) -> bool:
        """Is the calling thread the leader?  (Only it can change that.)"""
        leading = self.leading
        return leading is not None and leading.ident == threading.get_ident()

    def resign(self) -> None:
        """Called by the leader's job: pass the role on now."""
        with self.lock:
            if self.is_leading():
                self._pass_lead()

    def lend(self) -> bool:
        """Called by the leader's job before a step that may block (a file
        system that hangs): if it takes ``LEND_AFTER`` seconds or more,
        whoever submits reads meanwhile.  True if this thread leads."""
        leading = self.leading
        if leading is None or leading.ident != _get_ident() or self.lent:
            return False
        self.lending = _monotonic()
        self.lends += 1
        if self.unwatched:
            self.unwatched = False
            if self.on_lend is not None:
                self.on_lend()
        return True

    def reclaim(self) -> None:
        """The leader's job after ``lend()``: the reading is its own again."""
        self.lending = 0.0
        if self.lent:
            with self.lock:
                if self.lent and self.is_leading():
                    self.lent = False
                    self._tell_lead(True)

    def take_lent(self, since: float) -> bool:
        """Whoever submits, having seen ``lending`` at ``since`` for
        ``LEND_AFTER`` seconds: it reads from now on (``on_lead(False)``),
        unless that step has ended meanwhile.  True if it took the reading."""
        with self.lock:
            if (self.lending != since or not since or self.lent
                    or self.leading is None or not self.leader_runs):
                return False
            self.lent = True
            self._tell_lead(False)
            return True

    def _pass_lead(self) -> None:
        self.leader_runs = False
        self.lending = 0.0
        if self.idle and not self.closed:
            waiter = self.idle.pop()
            self.leading = waiter
            waiter.job = _LEAD
            waiter.wake.release()
            if self.lent:
                self.lent = False
                self._tell_lead(True)
        else:
            self.lent = False
            self.leading = None
            self._tell_lead(False)

    def _tell_lead(self, taken: bool) -> None:
        if self.on_lead is not None:
            self.on_lead(taken)
        if not taken and self.waiting:
            self.done.notify_all()

    def wait_unled(self, timeout: float) -> bool:
        """Wait until no thread is in ``lead()`` (told to stop); True if so."""
        end = time.monotonic() + timeout
        with self.lock:
            self.waiting += 1
            try:
                while self.leading is not None and not self.leader_runs:
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    self.done.wait(left)
            finally:
                self.waiting -= 1
        return True

    def submit(self, job: Job) -> bool:
        with self.lock:
            if self.idle:
                waiter = self.idle.pop()
                waiter.job = job
                self.busy += 1
                waiter.wake.release()
            elif self.threads < self.limit:
                self.threads += 1
                self.busy += 1
                threading.Thread(target=self._loop, args=(job,), name="tftpd-worker",
                                 daemon=True).start()
            elif len(self.jobs) >= self.queue_limit:
                return False
            else:
                self.jobs.append(job)
                if self.leading is not None and not self.leader_runs and self.kick:
                    self.kick()                # the leader is free: it takes it
            return True

    def _loop(self, job: Optional[Job]) -> None:
        me = _Idle()
        while job is not None:
            if job is _LEAD:
                job = self._lead(me)
                continue
            try:
                self.run(job)
            except BaseException:
                self._finished(None)
                raise
            job = self._finished(me)
            if job is None:
                me.wake.acquire()          # until submit() or close()
                job, me.job = me.job, None

    def _lead(self, me: _Idle) -> Optional[Job]:
        """Lead: the job ``lead()`` found (this thread runs it, leading on),
        else the next job given to this thread once idle; None: it ends."""
        assert self.lead is not None
        try:
            job = self.lead()
        except BaseException:
            with self.lock:
                self.leading = None
                self._tell_lead(False)
                self.threads -= 1
            raise
        with self.lock:
            if job is None and self.jobs:
                job = self.jobs.popleft()      # kicked: queued meanwhile
            if job is not None:
                self.busy += 1
                self.leader_runs = True
                if self.waiting:
                    self.done.notify_all()
                return job
            self.leading = None
            self._tell_lead(False)
            if self.closed:
                self.threads -= 1
                return None
            self.idle.append(me)
        me.wake.acquire()
        job, me.job = me.job, None
        return job

    def _finished(self, me: Optional[_Idle]) -> Optional[Job]:
        """A job ended: the next queued one, or _LEAD (lead on, or take the
        lead), or None (``me`` is then idle, or this thread ends: on close,
        or ``me`` None after an exception)."""
        with self.lock:
            if self.jobs and me is not None:
                return self.jobs.popleft()
            self.busy -= 1
            idle = not self.busy and not self.jobs
            lead = False
            # decided here, not after the lock: close() may run from then on
            if me is None or self.closed:
                leaving = True
                self.threads -= 1
                if self.is_leading():
                    self._pass_lead()
            elif self.leading is me:
                leaving = False
                lead = True
                self.leader_runs = False
                self.lending = 0.0
                if self.lent:                  # (its job ended before reclaim())
                    self.lent = False
                    self._tell_lead(True)
            elif self.lead is not None and self.leading is None:
                leaving = False
                lead = True
                self.leading = me
                self.leader_runs = False
                self._tell_lead(True)
            else:
                leaving = False
                self.idle.append(me)  # close() wakes it from now on
            if self.waiting:
                self.done.notify_all()
        if idle and self.on_idle is not None:
            self.on_idle()
        if me is not None and leaving:
            me.job = None              # ends the thread (its wake was not released)
            me.wake.release()
        return _LEAD if lead else None

    def pending(self) -> int:
        with self.lock:
            return self.busy + len(self.jobs)

    def drop_queued(self) -> List[Job]:
        with self.lock:
            jobs = list(self.jobs)
            self.jobs.clear()
            return jobs

    def close(self, timeout: Optional[float]) -> bool:
        """Let queued and running jobs finish; True if all did within timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self.closed = True
            for waiter in self.idle:
                self.threads -= 1
                waiter.job = None
                waiter.wake.release()
            self.idle.clear()
            self.waiting += 1
            try:
                while self.busy or self.jobs:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self.done.wait(left)
            finally:
                self.waiting -= 1
        return True


class _Poller:
    """The request loop's descriptors, each with what it is for (``targets``).

    epoll where there is one, else poll: ``selectors``' Python-level
    ``select()`` costs more than twice the ``epoll.poll()`` it wraps, once per
    request.  ``register`` and ``unregister`` may be called from worker
    threads (stray catchers); after ``close`` they raise ValueError.
    """

    def __init__(self) -> None:
        self.targets: Dict[int, Tuple[int, _socket.socket]] = {}
        self._impl: Any = select.epoll() if hasattr(select, "epoll") else select.poll()
        self._ms = not hasattr(select, "epoll")       # poll() counts milliseconds
        self._closed = False

    def register(self, sock: _socket.socket, what: int) -> None:
        if self._closed:
            raise ValueError("poller closed")
        fd = sock.fileno()
        self.targets[fd] = (what, sock)
        try:
            self._impl.register(fd, select.POLLIN)    # == EPOLLIN
        except BaseException:
            del self.targets[fd]
            raise

    def watch(self, sock: Any, on: bool) -> None:
        """Ask for a registered descriptor's events, or for none."""
        self._impl.modify(sock.fileno(), select.POLLIN if on else 0)

    def unregister(self, sock: _socket.socket) -> None:
        fd = sock.fileno()
        if self.targets.get(fd, (0, None))[1] is sock:
            del self.targets[fd]
            self._impl.unregister(fd)

    def wait(self, timeout: Optional[float]) -> List[Tuple[int, int]]:
        """(descriptor, events) of those ready within ``timeout`` seconds."""
        if self._ms and timeout is not None:
            timeout = max(0, int(timeout * 1000 + 0.999))
        result: List[Tuple[int, int]] = self._impl.poll(timeout)
        return result

    def close(self) -> None:
        self._closed = True
        self.targets.clear()
        if hasattr(self._impl, "close"):
            self._impl.close()


class Server:
    def __init__(self, config: Config, sockets: List[_socket.socket], policy: Policy,
                 *, idle_exit: bool = False, children: Sequence[int] = (),
                 router: Optional[Router] = None,
                 inbox: Optional[Tuple[_socket.socket, Any, int]] = None) -> None:
        self.config = config
        self.children = children        # PIDs of the other serving processes: signals go on
        # --processes (spread.py): the main process passes requests on with
        # ``router``; each other one reads them from its ``inbox`` socket and
        # counts those it is done with in its slot of the shared ``done``.
        self._router = router
        self._inbox: Optional[_socket.socket] = None
        self._done: Any = None
        self._slot = 0
        if inbox is not None:
            from .spread import unpack    # here: an inetd start never needs it
            self._unpack = unpack
            self._inbox, self._done, self._slot = inbox
        self.sockets = sockets
        self._family = {s: s.family for s in sockets}   # (a property call per request)
        self.admission = Admission(config, policy, umask=_current_umask(),
                                   clock=None if config.reread else time.time)
        self.idle_exit = idle_exit
        # inetd mode: while transfers run the request loop looks every
        # PENDING_POLL seconds whether they have ended; with a shorter idle
        # time it is told at once when the last one ends (an idle exit after
        # each request does not wait for that look).  With a longer one the
        # look comes before the exit is due anyway: no wake-up per request.
        # Leader/follower: a worker with nothing to do reads the next request
        # itself (from ``_leads``, an epoll of the request sockets, ``_stop_r``
        # and ``_kick_r``), so a request on a quiet server is served without
        # waking a second thread; meanwhile the request loop leaves them alone
        # (it watches them through ``_group``, an epoll of the request sockets).
        self._group: Any = None
        self._leads: Any = None
        if hasattr(select, "epoll"):
            self._group, self._leads = select.epoll(), select.epoll()
        self._by_fd = {s.fileno(): s for s in sockets}
        if self._inbox is not None:
            self._inbox.setblocking(False)
            self._by_fd[self._inbox.fileno()] = self._inbox
        self._request_fds = [(fd, 0) for fd in self._by_fd]    # (as epoll would list them)
        self._requests_waiting = False     # the leader may read them without epoll
        self._stop_r, self._stop_w = _socket.socketpair()    # never drained
        self._kick_r, self._kick_w = _socket.socketpair()    # a job was queued
        for s in (self._stop_w, self._kick_r, self._kick_w):
            s.setblocking(False)
        self._leading_over = False
        # one thread leads at a time, and only the leader reads into this
        self._lead_buf: Optional[bytearray] = None
        self._loop_reads = False                 # the loop asks for _group's events
        if self._group is not None:
            for fd in self._by_fd:
                self._group.register(fd, select.EPOLLIN)
                self._leads.register(fd, select.EPOLLIN)
            self._leads.register(self._stop_r.fileno(), select.EPOLLIN)
            self._leads.register(self._kick_r.fileno(), select.EPOLLIN)
        self.mux = Multiplexer()           # pumps of concurrent downloads
        self.pool = Pool(config.max_threads, config.queue_limit, self._run,
                         on_idle=self._wake if idle_exit
                         and config.idle_timeout < PENDING_POLL else None,
                         lead=self._lead if self._group is not None else None,
                         on_lead=self._on_lead, kick=self._kick, on_lend=self._wake)
        self._lends_seen = 0                       # Pool.lends at the loop's last look
        self.lock = threading.Lock()
        # (peer, request datagram) -> its queued or running job: a retransmitted
        # request is recognised by this key; a different request from the same
        # port (tftp-hpa's interactive client reuses its port) is a new transfer.
        self.active: Dict[Tuple[Any, ...], Job] = {}
        self.transfers: Dict[int, Tuple[_socket.socket, Engine, Job]] = {}  # id(job) -> ...
        self.stopping = 0                          # 1: graceful, 2: forced
        self.last_activity = time.monotonic()
        self.dropped = 0
        self._drop_logged = 0.0
        self.debug = config.socket_debug           # -s; SIGUSR1 on, SIGUSR2 off
        self._want_debug: Optional[bool] = None    # set by a signal, applied by the loop
        self._want_reopen = False                  # SIGHUP
        self._wake_r, self._wake_w = _socket.socketpair()
        # The request loop also answers strays to the transfers' ports: each
        # transfer socket is connected to its peer, and a second socket bound
        # to the same port with SO_REUSEPORT (the "catcher") gets what others send.
        self._poller = _Poller()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        for s in sockets:
            s.setblocking(False)
            enable_pktinfo(s)
            if config.socket_debug:
                _so_debug(s)
        threading.stack_size(_THREAD_STACK)

    # -- control -----------------------------------------------------------
    def install_signals(self) -> None:
        _signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (_signal.SIGTERM, _signal.SIGINT):
            _signal.signal(sig, self._on_signal)
        # AIX's SRC trace: SIGUSR1 turns socket debugging on, SIGUSR2 off.
        _signal.signal(_signal.SIGUSR1, self._on_debug_signal)
        _signal.signal(_signal.SIGUSR2, self._on_debug_signal)
        _signal.signal(_signal.SIGHUP, self._on_hup)

    def _forward(self, signum: int) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signum)
            except OSError:
                pass          # already gone

    def _on_signal(self, signum: int, frame: object) -> None:
        self._forward(signum)
        self.stop(force=self.stopping > 0)

    # The handlers below only record the wish; the request loop acts on it
    # (woken by the signal wake-up fd), outside any logging call in progress.
    def _on_debug_signal(self, signum: int, frame: object) -> None:
        self._forward(signum)
        self._want_debug = signum == _signal.SIGUSR1

    def _on_hup(self, signum: int, frame: object) -> None:
        self._forward(signum)
        self._want_reopen = True

    def _apply_control(self) -> None:
        want, self._want_debug = self._want_debug, None
        if want is not None:
            self.set_debug(want)
        if self._want_reopen:
            self._want_reopen = False
            logsetup.reopen()
            log.info("SIGHUP: logs reopened, access file will be re-read")

    def set_debug(self, on: bool) -> None:
        """Socket-level debugging (SO_DEBUG and the packet trace) on or off."""
        self.debug = on
        logsetup.set_debug(on)
        for s in self.sockets:
            _so_debug(s, on)
        log.info("socket debugging %s", "on" if on else "off")

    def stop(self, force: bool = False) -> None:
        """Stop taking requests; a forced stop also ends running transfers."""
        self.stopping = 2 if force else max(self.stopping, 1)
        self._stop_leading()
        self._wake()

    def _stop_leading(self) -> None:
        """Make a leading worker, and any later one, stop reading requests
        (the pipe is never drained)."""
        self._leading_over = True
        try:
            self._stop_w.send(b"\0")
        except OSError:
            pass

    def _wake(self) -> None:
        """Wake the request loop (from a signal handler or another thread)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    # -- the request loop --------------------------------------------------
    def serve(self) -> int:
        poller = self._poller
        group = self._group
        if group is None:
            for s in self.sockets:
                poller.register(s, _REQUESTS)
        else:
            poller.register(group, _GROUP)
            with self.pool.lock:               # unless a worker leads already
                self._loop_reads = True
                if self.pool.leader:
                    self._on_lead(True)
        poller.register(self._wake_r, _WAKE)
        targets = poller.targets
        buf = bytearray(_REQUEST_MAX)
        timeout: Optional[float] = 0.0 if self.idle_exit else None
        try:
            while not self.stopping:
                look = self._watch_lending()
                wait = look if timeout is None else timeout if look is None else min(timeout, look)
                for fd, _ in poller.wait(wait):
                    what, sock = targets.get(fd, (-1, self._wake_r))
                    if what == _REQUESTS:
                        self._read_requests(sock, buf)
                    elif what == _GROUP:
                        self._read_ready(group, buf)
                    elif what == _STRAYS:
                        self._answer_strays(sock, buf)
                    elif what == _WAKE:
                        self._drain_wake()
                if self.idle_exit:
                    idle = self.config.idle_timeout
                    if self.pool.pending():
                        timeout = min(PENDING_POLL, max(idle, 0.02))
                        continue
                    left = self.last_activity + idle - time.monotonic()
                    if left <= 0:
                        log.debug("idle for %s s: exiting", idle)
                        break
                    timeout = left
            return self._shutdown()
        finally:
            poller.close()
            if group is not None:
                group.close()
                self._leads.close()
            for s in (self._stop_r, self._stop_w, self._kick_r, self._kick_w):
                s.close()

    def _watch_lending(self) -> Optional[float]:
        """The request loop's look at the leader's lent step (``Pool.lend``):
        it takes the reading over once the step has run ``LEND_AFTER``
        seconds.  Seconds until the next look; None when no lend came since
        the last one (the next ``lend()`` then wakes the loop)."""
        pool = self.pool
        since = pool.lending
        if since:
            self._lends_seen = pool.lends
            left = since + LEND_AFTER - time.monotonic()
            if left > 0:
                return left
            pool.take_lent(since)
            return LEND_AFTER
        lends = pool.lends
        if lends != self._lends_seen:
            self._lends_seen = lends
            return LEND_AFTER
        pool.unwatched = True
        if pool.lending or pool.lends != lends:   # one came before it saw the flag
            pool.unwatched = False
            return 0.0
        return None

    def _drain_wake(self) -> None:
        _drain(self._wake_r)
        self._apply_control()

    def _shutdown(self) -> int:
        self._stop_leading()
        self.pool.wait_unled(2.0)           # out of recvmsg before the sockets close
        for s in self.sockets + ([self._inbox] if self._inbox is not None else []):
            try:
                s.close()
            except OSError:
                pass
        if self.stopping and self.pool.pending():
            log.info("stopping: waiting up to %g s for %d transfer(s) to finish "
                     "(send the signal again to end them now)",
                     STOP_GRACE, self.pool.pending())
        grace_ends = time.monotonic() + STOP_GRACE
        while not self.pool.close(timeout=0.2):
            if self.stopping == 1 and time.monotonic() >= grace_ends:
                log.warning("stopping: grace period over, ending %d transfer(s)",
                            self.pool.pending())
                self.stopping = 2
            self._end_transfers(every=self.stopping >= 2)
        return 0

    def _end_transfers(self, every: bool) -> None:
        """End transfers at once: all of them (a forced stop, with an ERROR to
        each peer), or only those that have finished and are dallying for a
        lost final ACK (a graceful stop need not wait for those)."""
        if every:
            for job in self.pool.drop_queued():
                self._release(job)
        with self.lock:
            running = list(self.transfers.values())
        for sock, engine, job in running:
            if every or getattr(engine, "outcome", Outcome.RUNNING) != Outcome.RUNNING:
                job.ended = True
                try:
                    sock.shutdown(_socket.SHUT_RD)
                except OSError:
                    pass

    def _read_requests(self, sock: _socket.socket, buf: bytearray) -> None:
        for _ in range(256):              # bounded batch per wake-up
            try:
                n, anc, _flags, peer = sock.recvmsg_into([buf], _ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("receive error on request socket: %s", e)
                return
            self._request(sock, bytes(buf[:n]), anc, peer)

    # -- leader/follower (Pool.lead) ----------------------------------------
    def _on_lead(self, taken: bool) -> None:
        """A worker took the reading of requests (the request loop stops
        watching them: no events asked for), or gave it back (under the
        pool's lock; one ``epoll_ctl``)."""
        if taken != self._loop_reads:
            return
        try:
            self._poller.watch(self._group, not taken)
        except (ValueError, OSError):
            return          # the loop has ended
        self._loop_reads = not taken

    def _lead(self) -> Optional[Job]:
        """In a worker without a job: read requests until one is for a new
        transfer, which this worker then serves (None: the server is
        stopping).  While it serves a small file it hands the requests that
        come meanwhile to the pool (``_dispatch``); before a long transfer it
        passes the role on (``Pool.resign``)."""
        buf = self._lead_buf
        if buf is None:
            buf = self._lead_buf = bytearray(_REQUEST_MAX)
        bufs, view = [buf], memoryview(buf)
        poll = self._leads.poll
        by_fd = self._by_fd
        while not self._leading_over:
            if self._requests_waiting and not self.pool.jobs:
                # the last small transfer's wait saw requests waiting (the
                # next one of a client asking for one file after another):
                # read them without asking epoll first
                self._requests_waiting = False
                ready = self._request_fds
            else:
                try:
                    ready = poll()
                except (ValueError, OSError):      # closed: the loop has ended
                    return None
            for fd, _ in ready:
                sock = by_fd.get(fd)
                if sock is None:           # _stop_r, or _kick_r: the pool has a job
                    self._unkick()
                    return None
                for _ in range(_LEADER_BATCH):
                    try:
                        n, anc, _flags, peer = sock.recvmsg_into(bufs, _ANC_SIZE)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:
                        if self._leading_over:
                            return None     # closed by the stopping request loop
                        log.warning("receive error on request socket: %s", e)
                        break
                    job = self._job(sock, bytes(view[:n]), anc, peer)
                    if job is not None:
                        return job
        return None

    def _dispatch(self) -> bool:
        """A leader serving a small transfer: hand the requests waiting on
        the request sockets to the pool.  False: stop watching them (the
        server is stopping)."""
        assert self._lead_buf is not None
        return self._read_ready(self._leads, self._lead_buf)

    def _read_ready(self, group: Any, buf: bytearray) -> bool:
        """The requests waiting on the request sockets that ``group`` (an
        epoll: the loop's ``_group`` or the leaders' ``_leads``) finds
        readable, to the pool.  False: the server is stopping (``_stop_r``
        readable, or the epoll closed); a stale kick is drained."""
        try:
            ready = group.poll(0)
        except (ValueError, OSError):         # closed: the loop has ended
            return False
        for fd, _ in ready:
            sock = self._by_fd.get(fd)
            if sock is not None:
                self._read_requests(sock, buf)
            elif fd == self._stop_r.fileno():
                return False
            else:
                self._unkick()                # (a leader that runs a job needs none)
        return True

    def _kick(self) -> None:
        """Pool: a job was queued while the leader waits for requests."""
        try:
            self._kick_w.send(b"\0")
        except OSError:
            pass                              # full: a kick is pending anyway

    def _unkick(self) -> None:
        _drain(self._kick_r)

    def _request(self, sock: _socket.socket, data: bytes, anc: List[Tuple[int, int, bytes]],
                 peer: Address) -> None:
        job = self._job(sock, data, anc, peer)
        if job is not None and not self.pool.submit(job):
            self._release(job)
            self.dropped += 1
            now = time.monotonic()
            if now - self._drop_logged >= 10:
                log.warning("busy: %d request(s) dropped (all %d workers busy, queue full)",
                            self.dropped, self.config.max_threads)
                self._drop_logged = now
                self.dropped = 0

    def _job(self, sock: _socket.socket, data: bytes, anc: List[Tuple[int, int, bytes]],
             peer: Address) -> Optional[Job]:
        """The job for a request datagram; None for junk, retransmissions and
        requests passed to another process."""
        if sock is self._inbox:
            return self._passed(data)
        try:
            packet = decode(data)
        except MalformedPacket:
            if self.debug:
                log.debug("dropped malformed datagram from %s", show(peer))
            return None
        if not isinstance(packet, Request):
            if self.debug:
                log.debug("dropped non-request from %s", show(peer))
            return None
        if self.debug:
            log.debug("trace %s < %s", show(peer), describe((data,)))
        self.last_activity = time.monotonic()
        local, ifindex = local_address(sock, anc)
        peer, bind, family = _normalise(peer, local, ifindex, self._family[sock])
        key = (peer, data)
        with self.lock:
            old = self.active.get(key)
            after = None
            if old is not None:
                arrived = arrival(anc)
                again = is_retransmission(old, arrived)
                if again:
                    return None            # a retransmitted request: not a second transfer
                if again is None:
                    after = (old, arrived)
            router = self._router
            if router is not None:
                where = router.pick(key, self._in_hand())
                if where >= 0 and router.send(where, key, bind, family, arrival(anc)):
                    return None
            job = Job(packet, peer, bind, family, self.last_activity, key)
            job.after = after
            self.active[key] = job
        return job

    def _in_hand(self) -> int:
        """Requests this process has queued or is serving, less those whose
        transfer is over but for closing or for the peer's last ACKs (a
        client asking for one file after another sends the next request
        right behind its final ACK).  Under ``lock``."""
        n = 0
        for job in self.active.values():
            engine = job.engine
            if engine is None or (engine.outcome == Outcome.RUNNING and not engine.all_sent):
                n += 1
        return n

    def _passed(self, message: bytes) -> Optional[Job]:
        """The job for a request the main process passed on (``_job`` there
        decoded it and found its local address)."""
        if not message:                    # end of file: the main process is gone
            self.stop()
            return None
        try:
            data, peer, bind, family, arrived = self._unpack(message)
            packet = decode(data)
            if not isinstance(packet, Request):
                raise ValueError("not a request")
        except (ValueError, MalformedPacket) as e:
            log.warning("dropped a request passed on by the main process: %s", e)
            self._count_done()
            return None
        if self.debug:
            log.debug("trace %s < %s", show(peer), describe((data,)))
        self.last_activity = time.monotonic()
        key = (peer, data)
        with self.lock:
            old = self.active.get(key)
            again = False if old is None else is_retransmission(old, arrived)
            if again:
                self._done[self._slot] += 1
                return None
            job = Job(packet, peer, bind, family, self.last_activity, key)
            if old is not None and again is None:
                job.after = (old, arrived)
            self.active[key] = job
        return job

    def _count_done(self) -> None:
        with self.lock:
            self._done[self._slot] += 1

    def _answer_strays(self, catcher: _socket.socket, buf: bytearray) -> None:
        """ERROR 5 to datagrams sent to a transfer's port by anyone but its peer."""
        for _ in range(_STRAY_BATCH):
            try:
                n, addr = catcher.recvfrom_into(buf)
            except OSError:          # drained, or closed by its worker meanwhile
                return
            reply = stray_reply(buf[:n])
            if self.debug:
                log.debug("trace %s < %s (stray)", show(addr), describe((bytes(buf[:n]),)))
            if reply is not None:
                try:
                    catcher.sendto(reply, addr)
                except OSError:
                    pass

    def _catch_strays(self, sock: _socket.socket, peer: Address) -> Optional[_socket.socket]:
        """``stray_catcher``, registered with the request loop."""
        catcher = stray_catcher(sock, peer)
        if catcher is None:
            return None
        try:
            self._poller.register(catcher, _STRAYS)
        except (OSError, ValueError):                  # ValueError: the loop has ended
            catcher.close()        # strays now get ICMP port unreachable instead
        return catcher

    def _drop_catcher(self, catcher: _socket.socket) -> None:
        try:
            self._poller.unregister(catcher)
        except (KeyError, ValueError, OSError):
            pass
        catcher.close()

    def _release(self, job: Job) -> None:
        with self.lock:
            if self.active.get(job.key) is job:
                del self.active[job.key]
            self.transfers.pop(id(job), None)
            if self._done is not None:
                self._done[self._slot] += 1
        self.last_activity = time.monotonic()

    # -- one transfer (in a worker thread) ---------------------------------
    def _run(self, job: Job) -> None:
        try:
            if job.after is None or self._settled(job.after):
                self._transfer(job)
        except Exception:  # a bug: log it, keep serving
            log.exception("internal error serving %s", show(job.peer))
        finally:
            self._release(job)

    def _settled(self, after: Tuple[Job, float]) -> bool:
        """A request that may be a resend of ``old``'s (``is_retransmission``
        unsure): wait for ``old``'s transfer to end (its own timers end it),
        then decide.  True: it is new, serve it."""
        old, arrived = after
        engine = old.engine
        assert engine is not None
        self.pool.resign()                 # (if this thread leads: others read meanwhile)
        step = 0.0005
        end = time.monotonic() + SETTLE_MAX
        while engine.outcome == Outcome.RUNNING and self.stopping < 2:
            if time.monotonic() >= end:
                return False
            time.sleep(step)
            step = min(step * 2, 0.05)
        return is_retransmission(old, arrived) is False

    def _transfer(self, job: Job) -> None:
        req = job.request
        kind = "RRQ" if req.opcode == Opcode.RRQ else "WRQ"
        who = f"{show(job.peer)} " if self.config.log_address else ""
        sock = _socket.socket(job.family, _socket.SOCK_DGRAM)
        catcher: Optional[_socket.socket] = None
        plan: Optional[Plan] = None
        trace = tracer(show) if self.debug else None
        try:
            bind_transfer(sock, job.local)
            if trace is not None:
                _so_debug(sock)
            if self.stopping >= 2:
                return
            # The file system may hang (a hard NFS mount): if this thread
            # leads, the request loop reads requests once this has taken
            # LEND_AFTER seconds (the pool takes them back at the latest when
            # this job ends).
            lent = self.pool.lend()
            try:
                plan = self.admission.admit(req)
            except TftpError as e:
                if trace is not None:
                    trace(">", job.peer, (e.packet(),))
                sock.sendto(e.packet(), job.peer)
                log.warning("%s%s %s refused: %s", who, kind, paths.display(req.filename),
                            e.message)
                return
            long = plan.size >= CONNECT_MIN_BLOCKS * plan.negotiated.blksize
            if long or plan.opcode != Opcode.RRQ:
                # another thread reads requests meanwhile: a long transfer, or
                # an upload (its end waits for fsync, its length may be unknown)
                self.pool.resign()
                leads = False
            else:
                if lent:
                    self.pool.reclaim()
                leads = lent or self.pool.is_leading()
            if long:
                catcher = self._catch_strays(sock, job.peer)
            engine = self._engine(plan, sock, job.peer, trace, connected=catcher is not None)
            with self.lock:
                job.engine = engine
                self.transfers[id(job)] = (sock, engine, job)
            if self.stopping >= 2:
                return
            start = time.monotonic()
            if catcher is None:
                if drive(engine, sock, trace=trace, mux=self.mux,
                         watch=(self._leads.fileno(), self._dispatch) if leads else None):
                    self._requests_waiting = True
            else:
                drive(engine, sock, trace=trace, connected=True, stopped=lambda: job.ended,
                      mux=self.mux)
            if engine.outcome != Outcome.OK or self.config.verbose:
                self._report(engine, plan, job, kind, who, start)
        finally:
            if plan is not None:
                plan.close()
            if catcher is not None:
                self._drop_catcher(catcher)
            sock.close()

    def _engine(self, plan: Plan, sock: _socket.socket, peer: Address,
                trace: Optional[Trace] = None, connected: bool = False) -> Engine:
        n = plan.negotiated
        cfg = self.config
        rto = Rto(n.timeout, fixed=True) if n.timeout else Rto(cfg.timeout)
        transmit = make_transmit(sock, trace, peer if connected else None)
        if plan.opcode == Opcode.RRQ:
            assert plan.source is not None
            return Sender(plan.source, peer, transmit, blksize=n.blksize,
                          windowsize=n.windowsize, rollover=n.rollover, rto=rto,
                          max_timeouts=cfg.max_timeouts, oack=plan.oack)
        assert plan.sink is not None
        return Receiver(plan.sink, peer, transmit, blksize=n.blksize,
                        windowsize=n.windowsize, rollover=n.rollover, rto=rto,
                        max_timeouts=cfg.max_timeouts, oack=plan.oack,
                        dally=min(max(2 * rto.value, DALLY_MIN), 10.0))

    def _report(self, engine: Engine, plan: Plan, job: Job, kind: str,
                who: str, start: float) -> None:
        """Log how a transfer ended (called unless it ended well without -v)."""
        end = engine.completed_at or time.monotonic()
        name = paths.display(job.request.filename)
        if engine.outcome == Outcome.OK:          # with -v
            log.info("%s from %s %s: %s %d bytes in %.3f s (%s)", kind, show(job.peer),
                     name, "sent" if kind == "RRQ" else "received", engine.bytes,
                     end - start, _in_force(plan))
        elif engine.outcome == Outcome.PEER_ERROR:
            log.info("%s%s %s ended by client: %s", who, kind, name, engine.message)
        else:
            log.warning("%s%s %s failed after %d bytes: %s", who, kind, name,
                        engine.bytes, engine.message)


def _in_force(plan: Plan) -> str:
    """The -v summary of a transfer's options: mode, blksize and windowsize
    always, then every option acknowledged in the OACK, then which ones were
    negotiated ("mode=octet blksize=1024 windowsize=1 tsize=7; negotiated:
    blksize tsize")."""
    n = plan.negotiated
    acked = [(k.decode("ascii", "replace").lower(), v.decode("ascii", "replace"))
             for k, v in n.acked]
    parts = [f"mode={'netascii' if plan.netascii else 'octet'}",
             f"blksize={n.blksize}", f"windowsize={n.windowsize}"]
    parts += [f"{k}={v}" for k, v in acked if k not in ("blksize", "windowsize")]
    text = " ".join(parts)
    if acked:
        text += "; negotiated: " + " ".join(k for k, _ in acked)
    return text


def _drain(sock: _socket.socket) -> None:
    """Read a non-blocking wake-up socket empty."""
    try:
        while sock.recv(64):
            pass
    except OSError:
        pass


def _so_debug(sock: _socket.socket, on: bool = True) -> None:
    """SO_DEBUG (Linux: needs CAP_NET_ADMIN; quietly skipped without it)."""
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_DEBUG, 1 if on else 0)
    except OSError:
        pass


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def bind_transfer(sock: _socket.socket, local: Address) -> None:
    """Bind a transfer socket to a port of its own (no SO_REUSEPORT yet: see
    ``stray_catcher``)."""
    sock.bind(local)


def stray_catcher(sock: _socket.socket, peer: Address) -> Optional[_socket.socket]:
    """Connect the bound transfer socket ``sock`` to ``peer`` and return a
    second, unconnected socket on the same address and port, which gets what
    anyone else sends there (the kernel prefers the connected socket for the
    peer's datagrams); None, with ``sock`` left as it was, if that fails.

    SO_REUSEPORT is set only now, after ``sock`` got its port: set before a
    bind to port 0 it lets the kernel hand out a port that another transfer
    socket with the flag already holds, and the two transfers would share it.
    """
    catcher = _socket.socket(sock.family, _socket.SOCK_DGRAM)
    try:
        _reuse_port(sock)
        _reuse_port(catcher)
        catcher.bind(sock.getsockname())
        catcher.setblocking(False)
        sock.connect(peer)
    except OSError:
        catcher.close()
        if _SO_REUSEPORT is not None:          # back as it was
            sock.setsockopt(_socket.SOL_SOCKET, _SO_REUSEPORT, 0)
        return None
    return catcher


def _reuse_port(s: _socket.socket) -> None:
    if _SO_REUSEPORT is None:
        raise OSError("SO_REUSEPORT is not available")
    s.setsockopt(_socket.SOL_SOCKET, _SO_REUSEPORT, 1)


def bind_standalone(port: int, address: Optional[str]) -> _socket.socket:
    """Bind the request socket: ``[::]`` dual-stack where possible, else
    0.0.0.0 (or ``address``)."""
    if address is None:
        try:
            s = _socket.socket(_socket.AF_INET6, _socket.SOCK_DGRAM)
        except OSError:
            s = None
        if s is not None:
            try:
                s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
                s.bind(("::", port))
                return s
            except OSError:
                s.close()
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            s.close()
            raise
        return s
    import ipaddress            # only with --address: inetd starts skip it
    ip = ipaddress.ip_address(address.split("%")[0])
    family = _socket.AF_INET6 if ip.version == 6 else _socket.AF_INET
    info = _socket.getaddrinfo(address, port, family, _socket.SOCK_DGRAM)[0]
    s = _socket.socket(family, _socket.SOCK_DGRAM)
    try:
        if family == _socket.AF_INET6:
            s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
        s.bind(info[4])
    except OSError:
        s.close()
        raise
    return s
