"""Logging: syslog (facility daemon) where /dev/log exists, stderr in the
foreground, and a log file with ``--log-file``.

``reopen()`` (SIGHUP) reopens the log file and reconnects to syslog, so that
log rotation and a restarted syslog daemon need no restart of tftpd.
``descriptors()`` lists what a daemon must keep open when it detaches, and
``drop_stderr()`` stops writing to a terminal that is no longer there.

The syslog handler is a small one of our own: ``logging.handlers`` would cost
every inetd start a few milliseconds of imports (pickle, queue, ...).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import List, Optional, TextIO

__all__ = ["setup", "reopen", "descriptors", "drop_stderr", "set_debug", "SyslogHandler"]

SYSLOG_SOCKET = "/dev/log"
LOG_DAEMON = 3
_FORMAT = "%(asctime)s tftpd[%(process)d]: %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"

log = logging.getLogger("tftpd")


def _severity(levelno: int) -> int:
    """syslog severity for a logging level."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class SyslogHandler(logging.Handler):
    """RFC 3164 lines to the local syslog socket (datagram, else stream)."""

    def __init__(self, path: str = SYSLOG_SOCKET, facility: int = LOG_DAEMON) -> None:
        super().__init__()
        self.path = path
        self.facility = facility
        self.sock: Optional[socket.socket] = None
        self.stream = False
        self.connect()

    def connect(self) -> None:
        """(Re)connect; raises OSError when there is no syslog daemon."""
        self.close_socket()
        error: Optional[OSError] = None
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(socket.AF_UNIX, kind)
            try:
                s.connect(self.path)
            except OSError as e:
                s.close()
                error = e
                continue
            self.sock, self.stream = s, kind == socket.SOCK_STREAM
            return
        assert error is not None
        raise error

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            pri = (self.facility << 3) | _severity(record.levelno)
            data = f"<{pri}>{self.format(record)}".encode("utf-8", "backslashreplace")
            if self.stream:
                data += b"\0"
            self.acquire()
            try:
                for attempt in (1, 2):
                    try:
                        if self.sock is None:
                            self.connect()
                        assert self.sock is not None
                        self.sock.send(data)
                        return
                    except OSError:
                        self.close_socket()
                        if attempt == 2:
                            raise
            finally:
                self.release()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            self.close_socket()
        finally:
            self.release()
        super().close()


class _FileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Appends to a named file; ``reopen()`` starts on a new file of that name."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)     # a daemon changes to / before it reopens
        super().__init__(self._open())

    def _open(self) -> TextIO:
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace")

    def reopen(self) -> None:
        old = self.setStream(self._open())
        if old is not None:
            old.close()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream:
                self.stream.close()
        finally:
            self.release()
        super().close()


def setup(stderr: bool, debug: bool = False, log_file: Optional[str] = None) -> logging.Logger:
    """Configure the "tftpd" logger.  A log file that cannot be opened raises OSError."""
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    timed = logging.Formatter(_FORMAT, _DATEFMT)
    if stderr:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(timed)
        log.addHandler(h)
    if log_file:
        fh = _FileHandler(log_file)
        fh.setFormatter(timed)
        log.addHandler(fh)
    if os.path.exists(SYSLOG_SOCKET):
        try:
            sh = SyslogHandler(SYSLOG_SOCKET)
        except OSError:
            pass
        else:
            sh.setFormatter(logging.Formatter("tftpd[%(process)d]: %(message)s"))
            log.addHandler(sh)
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log


def set_debug(on: bool) -> None:
    """Debug level (the -s packet trace) on or off at run time."""
    log.setLevel(logging.DEBUG if on else logging.INFO)


def reopen() -> None:
    """SIGHUP: reopen the log file and reconnect to syslog."""
    for h in list(log.handlers):
        try:
            if isinstance(h, _FileHandler):
                h.reopen()
            elif isinstance(h, SyslogHandler):
                h.acquire()
                try:
                    h.connect()
                finally:
                    h.release()
        except OSError as e:
            log.warning("cannot reopen log %s: %s", getattr(h, "path", "?"), e.strerror or e)


def descriptors() -> List[int]:
    """File descriptors the log needs (for a daemon's files_preserve)."""
    fds = []
    for h in log.handlers:
        if isinstance(h, SyslogHandler) and h.sock is not None:
            fds.append(h.sock.fileno())
        elif isinstance(h, _FileHandler) and h.stream is not None:
            fds.append(h.stream.fileno())
    return fds


def drop_stderr() -> None:
    """Stop logging to standard error (a daemon has detached from it)."""
    for h in list(log.handlers):
        if type(h) is logging.StreamHandler:
            log.removeHandler(h)
    if not log.handlers:
        log.addHandler(logging.NullHandler())
