"""Entry point: parse the command line, pick the front door, run the server."""

from __future__ import annotations

import _socket
import os
import stat
import sys

from . import cleanup
from . import log as logsetup
from . import privileges
from .access import AccessTable
from .cli import UsageError, check_default_root, fail, help_text, parse_args, version_text
from .files import MAP_MIN_BLKSIZE

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal      # typed; at run time the same functions from _signal
    from types import FrameType
    from typing import Any, Callable, List, Optional, Tuple

    from .config import Config
else:
    import _signal       # (see server.py)

__all__ = ["main"]

NOT_A_SOCKET = ("standard input is not a datagram socket (inetd mode); "
                "use -p PORT to run standalone")


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        parsed = parse_args(args)
    except UsageError as e:
        return fail(str(e))
    if parsed.help:
        sys.stdout.write(help_text())
        return 0
    if parsed.version:
        sys.stdout.write(version_text())
        return 0
    config = parsed.config
    if parsed.check:
        from .check import check
        return check(config, parsed.paths)
    if os.geteuid() == 0:
        try:
            privileges.lookup(config.user)
        except privileges.PrivilegeError as e:
            return fail(f"--user: {e}")
    if config.port is not None:
        return standalone(config)
    return inetd(config)


def _policy(config: Config) -> AccessTable:
    """The access table, loaded now so that the log shows what is enforced."""
    roots = [config.root] + ([config.write_dir] if config.write_dir else [])
    table = AccessTable(config.access_file, roots)
    if table.rules().refused is None:
        for what, d in [("read root (--root)", config.root),
                        ("-d directory", config.write_dir if config.allow_write else None)]:
            if d and not table.allowed(os.path.realpath(d)):
                logsetup.getLogger("tftpd").warning(
                    "the access file does not allow the %s %s: requests for relative "
                    "names there are refused", what, d)
    return table


def _drop_privileges(config: Config, processes: int = 1) -> bool:
    """After binding: become --user (if root); False means do not serve."""
    log = logsetup.getLogger("tftpd")
    needs = []
    if processes > 1:
        needs.append("processes")
    if config.max_blksize >= MAP_MIN_BLKSIZE and "blksize" not in config.refused:
        needs.append("big blocks")      # (mmap: not loaded when -z or -r blksize rule them out)
    try:
        who = privileges.drop(config.user, needs=needs)
    except privileges.PrivilegeError as e:
        log.error("refusing to serve: %s", e)
        return False
    log.info("%s", who)
    for d in [config.root] + ([config.write_dir] if config.write_dir else []):
        if not os.access(d, os.R_OK | os.X_OK):
            log.warning("%s is not readable by this user: nothing in it can be served", d)
    if config.allow_write:
        # as the serving user: the temporaries of uploads that a crash or kill -9 cut short
        dirs = [config.root] + ([config.write_dir] if config.write_dir else [])
        removed, problems = cleanup.sweep(dirs)
        for line in removed:
            log.info("%s", line)
        for line in problems:
            log.warning("%s", line)
    return True


def _reload_on_hup(table: AccessTable) -> None:
    """SIGHUP: re-read the access file at the next request (chains a prior handler)."""
    prior = _signal.getsignal(_signal.SIGHUP)

    def on_hup(signum: int, frame: Optional[FrameType]) -> None:
        table.invalidate()
        if callable(prior):
            prior(signum, frame)
    _signal.signal(_signal.SIGHUP, on_hup)


def _setup_log(config: Config, stderr: bool) -> bool:
    try:
        logsetup.setup(stderr=stderr, debug=config.socket_debug, log_file=config.log_file)
    except OSError as e:
        sys.stderr.write(f"tftpd: --log-file: cannot open '{config.log_file}': "
                         f"{e.strerror or e}\n")
        return False
    return True


# Downloads of 32 blocks or more share one multiplexer thread per process, as
# fast with 1 process per CPU as with 4 (storm of 200 on 2 CPUs); smaller files
# and uploads keep a thread each, and 2,000 downloads of 10 kB, 200 at a time,
# took 0.68-0.79 s with 1 per CPU against 0.53 s with 4 (2026-11-22).
PROCESSES_PER_CPU = 4
MAX_DEFAULT_PROCESSES = 16
_HANDLED = {_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGUSR1, _signal.SIGUSR2}


def default_processes() -> int:
    """--processes by default: four per CPU this process may run on, at most 16.

    One process runs Python on one CPU at a time, and its transfer threads
    hand its GIL over on every block: with many transfers in each process
    that hand-over (a futex wake and a context switch) costs as much as the
    block itself.  Fewer transfers per process keep the per-block cost
    at that of a lone transfer."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus * PROCESSES_PER_CPU, MAX_DEFAULT_PROCESSES))


def standalone(config: Config) -> int:
    from .server import bind_standalone
    if not _setup_log(config, stderr=True):
        return 1
    assert config.port is not None
    count = config.processes or default_processes()
    try:
        sock = bind_standalone(config.port, config.address)
    except OSError as e:
        where = f"{config.address or '*'} port {config.port}"
        sys.stderr.write(f"tftpd: cannot bind {where}: {e.strerror or e}\n")
        return 1
    if config.daemon:
        # Bound in the foreground (errors above reach the terminal); now detach.
        from . import daemonize
        absolute = config.replace(access_file=os.path.abspath(config.access_file))
        return daemonize.run(config.pidfile, [sock],
                             lambda ready: _serve_standalone(absolute, sock, count, ready))
    return _serve_standalone(config, sock, count)


def _serve_standalone(config: Config, sock: _socket.socket, count: int,
                      ready: Optional[Callable[[], None]] = None) -> int:
    """Serve on ``sock`` from ``count`` processes: this one reads the
    requests and passes some to the others (spread.py), forked after the
    privilege drop, before any thread."""
    from .server import Server, enable_pktinfo, show
    from .spread import Router, Shared, channel
    log = logsetup.getLogger("tftpd")
    shared = Shared(count - 1) if count > 1 else None
    if not _drop_privileges(config, count):
        sock.close()
        return 1
    table = _policy(config)
    parent = os.getpid()
    children: List[int] = []
    outs: List[_socket.socket] = []
    enable_pktinfo(sock)
    # Signals wait (blocked) until each process has its handlers: a SIGHUP
    # passed on to a process still starting must not kill it.
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _HANDLED)
    if shared is not None:
        _freeze_for_fork()
        for slot in range(count - 1):
            out, inbox = channel()
            pid = os.fork()
            if pid == 0:
                for s in [sock, out] + outs:
                    s.close()
                _serve_child(config, (inbox, shared.done, slot), table, parent)  # never returns
            children.append(pid)
            inbox.close()
            outs.append(out)
    server = Server(config, [sock], table, children=children,
                    router=Router(outs, shared.done, children) if shared is not None else None)
    server.install_signals()
    _reload_on_hup(table)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, _HANDLED)
    log.info("listening on %s (root %s%s)", show(sock.getsockname()), config.root,
             f", {count} processes" if children else "")
    if ready is not None:
        ready()
    status = server.serve()
    for out in outs:
        out.close()
    return _reap(children, log) or status


def _freeze_for_fork() -> None:
    """Move every object alive now out of the collector's reach: a full
    collection in a busy forked process would otherwise write to all of them
    and so copy the pages it shares with the main process (a storm of 200
    over 8 processes: 44 MiB in all against 47-49)."""
    import gc
    gc.collect()
    gc.freeze()


def _serve_child(config: Config, inbox: Tuple[_socket.socket, Any, int],
                 table: AccessTable, parent: int) -> None:
    """A further serving process: serve the requests the main process passes
    to ``inbox`` until a signal the parent passes on (or the parent's death)
    ends it; then exit without returning."""
    from .server import Server
    status = 1
    try:
        _die_with(parent)
        if config.daemon:
            from . import daemonize
            daemonize.forget_foreground()
        server = Server(config, [], table, inbox=inbox)
        server.install_signals()
        _reload_on_hup(table)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, _HANDLED)
        status = server.serve()
    except BaseException:
        logsetup.getLogger("tftpd").exception("serving process %d failed", os.getpid())
    finally:
        os._exit(status)


def _die_with(parent: int) -> None:
    """Have the kernel send SIGTERM to this process when its parent dies (a
    kill -9 of the main process must not leave the others serving)."""
    import ctypes
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, _signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:        # it died before the call
        os.kill(os.getpid(), _signal.SIGTERM)


def _reap(children: List[int], log: logsetup.Logger) -> int:
    """Wait for the other serving processes (each got the stop signals and
    has its own grace period); 1 if one of them failed."""
    status = 0
    for pid in children:
        try:
            _, raw = os.waitpid(pid, 0)
        except ChildProcessError:
            continue
        code = os.waitstatus_to_exitcode(raw)
        if code:
            log.warning("serving process %d ended with status %d", pid, code)
            status = 1
    return status


def _listen_fd() -> int:
    """fd 3 under systemd socket activation, else fd 0 (inetd)."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS"):
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
        return 3
    return 0


def _not_a_socket() -> int:
    """One line (no usage): someone ran tftpd by hand without -p."""
    sys.stderr.write(f"tftpd: {NOT_A_SOCKET}\n")
    return 2


def inetd(config: Config) -> int:
    fd = _listen_fd()
    try:
        sock = _socket.socket(fileno=fd)
    except OSError:
        return _not_a_socket()
    family, kind = sock.family, sock.type
    sock.detach()
    if kind != _socket.SOCK_DGRAM or family not in (_socket.AF_INET, _socket.AF_INET6):
        return _not_a_socket()
    listen = _socket.socket(family, kind, 0, _socket.dup(fd))
    # inetd gives the socket as fds 0, 1 and 2: nothing may be written to it.
    ino = os.fstat(listen.fileno()).st_ino
    stderr_ok = True
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        try:
            st = os.fstat(std)
        except OSError:
            os.dup2(null, std)
            continue
        if std == 0 or (stat.S_ISSOCK(st.st_mode) and st.st_ino == ino):
            os.dup2(null, std)
            if std == 2:
                stderr_ok = False
    os.close(null)
    from .server import Server
    if not _setup_log(config, stderr=stderr_ok):
        listen.close()
        return 1
    try:
        check_default_root(config)
    except UsageError as e:         # no --root and no /tftpboot
        listen.close()
        if stderr_ok:
            return fail(str(e))
        logsetup.getLogger("tftpd").error("%s", e)   # stderr is inetd's socket
        return 2
    if not _drop_privileges(config):
        listen.close()
        return 1
    table = _policy(config)
    server = Server(config, [listen], table, idle_exit=True)
    server.install_signals()
    _reload_on_hup(table)
    return server.serve()
