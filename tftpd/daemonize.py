"""``-p PORT --daemon``: detach with python-daemon and hold a PID lock file.

Only imported for ``--daemon``: python-daemon and lockfile cost an inetd start
time it should not pay.

The order matters (see STYLE.md, "One server, several front doors"):

1. the caller has bound the request socket in the foreground, so "port in use"
   and "permission denied" reach the terminal;
2. here, in the foreground: a PID file of a running tftpd refuses the start
   with a clear message; a stale one (its process is gone) is removed;
3. the foreground process forks; it waits on a pipe until the daemon says it
   is serving, and prints whatever error the daemon met before that (the PID
   lock taken by a rival in the meantime, a failed privilege drop), exiting
   non-zero;
4. the child enters ``DaemonContext`` (umask 022, cwd /, the listening socket,
   the log's descriptors and the pipe preserved, no owner change: the PID
   lock is taken as root and the caller drops privileges afterwards with
   setgroups/setgid/setuid);
5. SIGTERM that arrives before the server has installed its handlers is held
   and re-raised once it has, so SIGTERM always means "stop taking requests,
   let transfers finish", never ``SystemExit``;
6. on exit the PID file is removed (if the directory is not writable by the
   user the server runs as, a warning says so; the next start replaces the
   file as stale).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

from . import log as logsetup
from .log import ERROR, Handler, Record, getLogger

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from typing import Callable, List, Optional, Tuple

__all__ = ["run", "check_pidfile", "read_pid", "process_alive"]

log = getLogger("tftpd")

# A PID file with no number in it may be one that a starting tftpd is
# writing right now; older than this, it is debris.
_UNFINISHED_AGE = 5.0
_READY = b"\0READY\n"
START_TIMEOUT = 60.0     # the foreground gives up waiting for the daemon after this


def read_pid(path: str) -> Optional[int]:
    """The PID in a PID file; None if the file holds no valid PID.

    Raises FileNotFoundError if there is no file.
    """
    with open(path, "rb") as f:
        text = f.read(64)
    try:
        pid = int(text.split(b"\n", 1)[0].strip() or b"x")
    except ValueError:
        return None
    return pid if pid > 0 else None


def process_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies count as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                  # alive, another user's
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    state = stat.rpartition(b")")[2].split()[:1]
    return state != [b"Z"]


def _looks_like_tftpd(pid: int) -> bool:
    """False when /proc shows that ``pid`` now belongs to another program."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True                           # cannot tell: assume it is ours
    return b"tftpd" in cmdline


def check_pidfile(path: str) -> Optional[str]:
    """None if a daemon may start with PID file ``path``; else why not.

    A stale file (no such process, a zombie, the PID now used by another
    program, or a file left half-written long ago) is removed.
    """
    try:
        pid = read_pid(path)
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot read PID file {path}: {e.strerror or e}"
    if pid is None:
        if age < _UNFINISHED_AGE:
            return f"PID file {path} is being written by another tftpd starting up"
        why = "it holds no process ID"
    elif pid == os.getpid() or not process_alive(pid):
        why = f"process {pid} is not running"
    elif not _looks_like_tftpd(pid):
        why = f"process {pid} is not tftpd"
    else:
        return f"already running as process {pid} (PID file {path})"
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"stale PID file {path} ({why}) cannot be removed: {e.strerror or e}"
    sys.stderr.write(f"tftpd: removed stale PID file {path} ({why})\n")
    return None


class _PipeHandler(Handler):
    """Until the daemon is serving, its errors go to the waiting foreground."""

    def __init__(self, fd: int) -> None:
        super().__init__(ERROR)
        self.fd = fd

    def emit(self, record: Record) -> None:
        try:
            os.write(self.fd, f"tftpd: {record.getMessage()}\n".encode("utf-8", "replace"))
        except OSError:
            pass


def _wait_for_daemon(r: int, child: int) -> int:
    """Foreground: relay the daemon's start-up errors; 0 once it serves."""
    import select
    chunks: List[bytes] = []
    end = time.monotonic() + START_TIMEOUT
    while True:
        left = end - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            sys.stderr.write(f"tftpd: the daemon did not report within {START_TIMEOUT:g} s "
                             "that it serves (see the log)\n")
            os.close(r)
            return 1
        try:
            data = os.read(r, 4096)
        except InterruptedError:
            continue
        if not data:
            break
        chunks.append(data)
        if _READY in b"".join(chunks):
            break
    os.close(r)
    try:
        os.waitpid(child, 0)
    except ChildProcessError:
        pass
    text = b"".join(chunks)
    ready = _READY in text
    message = text.replace(_READY, b"").decode("utf-8", "replace")
    if message:
        sys.stderr.write(message if message.endswith("\n") else message + "\n")
    if ready:
        return 0
    if not message:
        sys.stderr.write("tftpd: the daemon exited while starting (see the log)\n")
    return 1


_foreground: List[Tuple[int, Handler]] = []     # the daemon's pipe to the foreground


def forget_foreground() -> None:
    """In a process forked by the daemon: drop its inherited end of the pipe
    to the waiting foreground (only the daemon's main process reports)."""
    for fd, relay in _foreground:
        log.removeHandler(relay)
        try:
            os.close(fd)
        except OSError:
            pass
    _foreground.clear()


def run(pidfile: str, socks: List[_socket.socket],
        start: Callable[[Callable[[], None]], int]) -> int:
    """Detach and run ``start(ready)`` in the daemon; return the exit status.

    ``start`` sets the server up (privileges, access table, signal handlers),
    calls ``ready()`` just before it serves, and serves.  In the foreground
    this returns 0 once ``ready()`` was called in the daemon, or 1 with the
    daemon's error printed.  In the daemon it returns ``start``'s status after
    the PID file has been removed.
    """
    pidfile = os.path.abspath(pidfile)
    directory = os.path.dirname(pidfile)
    if not os.path.isdir(directory):
        sys.stderr.write(f"tftpd: --pidfile: directory '{directory}' does not exist\n")
        return 1
    problem = check_pidfile(pidfile)
    if problem:
        sys.stderr.write(f"tftpd: {problem}; not starting\n")
        return 1

    # python-daemon: only now, never for inetd (it and lockfile ship no types)
    import daemon                      # type: ignore[import-untyped]
    import daemon.pidfile              # type: ignore[import-untyped]
    import lockfile                    # type: ignore[import-untyped]

    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    child = os.fork()
    if child:
        os.close(w)
        for sock in socks:
            sock.close()
        return _wait_for_daemon(r, child)

    os.close(r)
    pending: List[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    context = daemon.DaemonContext(
        detach_process=True,               # also under init/systemd (Type=forking)
        umask=0o022,                       # python-daemon's default 0 would make uploads 0666
        working_directory="/",
        files_preserve=[s.fileno() for s in socks] + [w] + logsetup.descriptors(),
        pidfile=daemon.pidfile.TimeoutPIDLockFile(pidfile, acquire_timeout=0),
        signal_map={signal.SIGTERM: hold, signal.SIGINT: hold, signal.SIGHUP: hold,
                    signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
        # uid/gid: left alone on purpose; the caller drops privileges itself
        # after the PID lock is taken (and clears supplementary groups).
    )
    try:
        context.open()
    except (lockfile.AlreadyLocked, lockfile.LockTimeout):
        _fail(w, f"another tftpd holds the PID file {pidfile}; not starting")
    except lockfile.LockFailed as e:
        reason = os.strerror(errno.EACCES) if not os.access(directory, os.W_OK) else str(e)
        _fail(w, f"cannot create PID file {pidfile}: {reason}")
    except Exception as e:  # anything else while detaching
        _fail(w, f"cannot become a daemon: {e}")

    logsetup.drop_stderr()
    relay = _PipeHandler(w)
    log.addHandler(relay)
    _foreground.append((w, relay))

    def ready() -> None:
        log.removeHandler(relay)
        _foreground.clear()
        try:
            os.write(w, _READY)
            os.close(w)
        except OSError:
            pass
        log.info("daemon started: process %d, PID file %s", os.getpid(), pidfile)
        for signum in pending:             # now handled by the server
            signal.raise_signal(signum)
        pending.clear()

    status = 1
    try:
        status = start(ready)
    finally:
        log.removeHandler(relay)
        try:
            context.close()                # releases (removes) the PID file
        except Exception as e:
            log.warning("cannot remove PID file %s: %s (the next start replaces it as stale)",
                        pidfile, getattr(e, "strerror", None) or e)
            context.pidfile = None         # no second try from python-daemon's atexit
            context.close()
        else:
            log.info("daemon stopped: PID file %s removed", pidfile)
    return status


def _fail(w: int, message: str) -> None:
    try:
        os.write(w, f"tftpd: {message}\n".encode())
    except OSError:
        pass
    os._exit(1)
