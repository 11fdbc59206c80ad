"""Logging: syslog (facility daemon) where /dev/log exists, stderr in the
foreground, and a log file with ``--log-file``.

``reopen()`` (SIGHUP) reopens the log file and reconnects to syslog, so that
log rotation and a restarted syslog daemon need no restart of tftpd.
``descriptors()`` lists what a daemon must keep open when it detaches, and
``drop_stderr()`` stops writing to a terminal that is no longer there.

The logger is a small one of tftpd's own, not the standard library's
``logging``: that package (with ``re``, ``traceback``, ``string``, ``weakref``
...) costs every inetd start about 6 ms, a quarter of its budget.  It keeps
the part of the ``logging`` API that tftpd uses, with the same names and
meanings: ``getLogger(name)``, the levels, ``debug`` ... ``exception``,
``isEnabledFor``, handlers with a level and a ``Formatter`` (``%(asctime)s``,
``%(process)d``, ``%(message)s``, ``%(levelname)s``, ``%(name)s``).  A logger
without handlers writes WARNING and above to standard error, as ``logging``'s
last resort does; a handler that fails to write drops the line (a log line
never ends a transfer).
"""

from __future__ import annotations

import _socket
import _thread
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, TextIO, Tuple

__all__ = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "getLogger", "Logger",
           "Record", "Formatter", "Handler", "StreamHandler", "NullHandler", "SyslogHandler",
           "setup", "reopen", "descriptors", "drop_stderr", "set_debug"]

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40
CRITICAL = 50
_LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR",
                CRITICAL: "CRITICAL"}

SYSLOG_SOCKET = "/dev/log"
LOG_DAEMON = 3
_FORMAT = "%(asctime)s tftpd[%(process)d]: %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


# -- the logger ----------------------------------------------------------------------

class Record:
    """One log event."""

    __slots__ = ("name", "levelno", "msg", "args", "created", "process", "exc_text")

    def __init__(self, name: str, levelno: int, msg: object, args: Tuple[object, ...],
                 exc_text: Optional[str] = None) -> None:
        self.name = name
        self.levelno = levelno
        self.msg = msg
        self.args = args
        self.created = time.time()
        self.process = os.getpid()
        self.exc_text = exc_text

    @property
    def levelname(self) -> str:
        return _LEVEL_NAMES.get(self.levelno, f"Level {self.levelno}")

    def getMessage(self) -> str:
        msg = str(self.msg)
        return msg % self.args if self.args else msg


class Formatter:
    """``fmt % fields``, as ``logging.Formatter`` with %-style formats."""

    def __init__(self, fmt: str = "%(message)s", datefmt: Optional[str] = None) -> None:
        self.fmt = fmt
        self.datefmt = datefmt
        self._asctime = "%(asctime)" in fmt

    def formatTime(self, record: Record) -> str:
        local = time.localtime(record.created)
        if self.datefmt:
            return time.strftime(self.datefmt, local)
        msecs = int((record.created - int(record.created)) * 1000)
        return f"{time.strftime('%Y-%m-%d %H:%M:%S', local)},{msecs:03d}"

    def format(self, record: Record) -> str:
        fields: Dict[str, object] = {
            "message": record.getMessage(), "process": record.process,
            "levelname": record.levelname, "levelno": record.levelno, "name": record.name}
        if self._asctime:
            fields["asctime"] = self.formatTime(record)
        text = self.fmt % fields
        if record.exc_text:
            text += "\n" + record.exc_text
        return text


_PLAIN = Formatter()


class Handler:
    """Writes records at or above its level; one lock per handler."""

    def __init__(self, level: int = 0) -> None:
        self.level = level
        self.formatter: Optional[Formatter] = None
        self.lock = _thread.RLock()

    def setLevel(self, level: int) -> None:
        self.level = level

    def setFormatter(self, formatter: Optional[Formatter]) -> None:
        self.formatter = formatter

    def format(self, record: Record) -> str:
        return (self.formatter or _PLAIN).format(record)

    def acquire(self) -> None:
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    def handle(self, record: Record) -> None:
        if record.levelno < self.level:
            return
        with self.lock:
            try:
                self.emit(record)
            except Exception:
                self.handleError(record)

    def emit(self, record: Record) -> None:
        raise NotImplementedError

    def handleError(self, record: Record) -> None:
        """A line that cannot be written is dropped."""

    def close(self) -> None:
        pass


class NullHandler(Handler):
    def handle(self, record: Record) -> None:
        pass

    def emit(self, record: Record) -> None:
        pass


class StreamHandler(Handler):
    """One line per record to a text stream (standard error by default)."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        super().__init__()
        self.stream: TextIO = sys.stderr if stream is None else stream

    def emit(self, record: Record) -> None:
        self.stream.write(self.format(record) + "\n")
        self.stream.flush()

    def setStream(self, stream: TextIO) -> Optional[TextIO]:
        """Write to ``stream`` from now on; returns the previous stream."""
        if stream is self.stream:
            return None
        with self.lock:
            old = self.stream
            try:
                old.flush()
            except (OSError, ValueError):
                pass
            self.stream = stream
        return old


class Logger:
    """A named logger: a level and handlers (no hierarchy, no propagation)."""

    def __init__(self, name: str, level: int = WARNING) -> None:
        self.name = name
        self.level = level
        self.handlers: List[Handler] = []

    def setLevel(self, level: int) -> None:
        self.level = level

    def isEnabledFor(self, level: int) -> bool:
        return level >= self.level

    def addHandler(self, handler: Handler) -> None:
        if handler not in self.handlers:
            self.handlers.append(handler)

    def removeHandler(self, handler: Handler) -> None:
        if handler in self.handlers:
            self.handlers.remove(handler)

    def debug(self, msg: object, *args: object) -> None:
        if DEBUG >= self.level:
            self._log(DEBUG, msg, args)

    def info(self, msg: object, *args: object) -> None:
        if INFO >= self.level:
            self._log(INFO, msg, args)

    def warning(self, msg: object, *args: object) -> None:
        if WARNING >= self.level:
            self._log(WARNING, msg, args)

    def error(self, msg: object, *args: object) -> None:
        if ERROR >= self.level:
            self._log(ERROR, msg, args)

    def critical(self, msg: object, *args: object) -> None:
        if CRITICAL >= self.level:
            self._log(CRITICAL, msg, args)

    def exception(self, msg: object, *args: object) -> None:
        """ERROR with the traceback of the exception being handled."""
        if ERROR >= self.level:
            self._log(ERROR, msg, args, _traceback_text(sys.exc_info()[1]))

    def log(self, level: int, msg: object, *args: object) -> None:
        if level >= self.level:
            self._log(level, msg, args)

    def _log(self, level: int, msg: object, args: Tuple[object, ...],
             exc_text: Optional[str] = None) -> None:
        record = Record(self.name, level, msg, args, exc_text)
        handlers = tuple(self.handlers)
        if not handlers:
            if level >= WARNING:
                _last_resort(record)
            return
        for handler in handlers:
            handler.handle(record)


_loggers: Dict[str, Logger] = {}


def getLogger(name: str = "tftpd") -> Logger:
    """The logger of that name (created on first use, level WARNING)."""
    logger = _loggers.get(name)
    if logger is None:
        logger = _loggers.setdefault(name, Logger(name))
    return logger


def _last_resort(record: Record) -> None:
    """No handler: the message alone to standard error (``logging.lastResort``)."""
    try:
        if sys.stderr is not None:
            sys.stderr.write(_PLAIN.format(record) + "\n")
            sys.stderr.flush()
    except Exception:
        pass


def _source_line(filename: str, lineno: int) -> str:
    try:
        with open(filename, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if number == lineno:
                    return line.strip()
    except OSError:
        pass
    return ""


def _traceback_text(exc: Optional[BaseException]) -> Optional[str]:
    """``traceback.format_exc()`` without the ``traceback`` module (and its
    imports): frames with their source lines, then the exception."""
    if exc is None:
        return None
    lines = ["Traceback (most recent call last):"]
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
        source = _source_line(code.co_filename, tb.tb_lineno)
        if source:
            lines.append(f"    {source}")
        tb = tb.tb_next
    kind = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        kind = f"{module}.{kind}"
    try:
        text = str(exc)
    except Exception:
        text = "<exception str() failed>"
    lines.append(f"{kind}: {text}" if text else kind)
    return "\n".join(lines)


log = getLogger("tftpd")


# -- handlers of the server's log -------------------------------------------------------

def _severity(levelno: int) -> int:
    """syslog severity for a logging level."""
    if levelno >= CRITICAL:
        return 2
    if levelno >= ERROR:
        return 3
    if levelno >= WARNING:
        return 4
    if levelno >= INFO:
        return 6
    return 7


class SyslogHandler(Handler):
    """RFC 3164 lines to the local syslog socket (datagram, else stream)."""

    def __init__(self, path: str = SYSLOG_SOCKET, facility: int = LOG_DAEMON) -> None:
        super().__init__()
        self.path = path
        self.facility = facility
        self.sock: Optional[_socket.socket] = None
        self.stream = False
        self.connect()

    def connect(self) -> None:
        """(Re)connect; raises OSError when there is no syslog daemon."""
        self.close_socket()
        error: Optional[OSError] = None
        for kind in (_socket.SOCK_DGRAM, _socket.SOCK_STREAM):
            s = _socket.socket(_socket.AF_UNIX, kind)
            try:
                s.connect(self.path)
            except OSError as e:
                s.close()
                error = e
                continue
            self.sock, self.stream = s, kind == _socket.SOCK_STREAM
            return
        assert error is not None
        raise error

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def emit(self, record: Record) -> None:
        """(Called with the handler's lock held.)"""
        pri = (self.facility << 3) | _severity(record.levelno)
        data = f"<{pri}>{self.format(record)}".encode("utf-8", "backslashreplace")
        if self.stream:
            data += b"\0"
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

    def close(self) -> None:
        with self.lock:
            self.close_socket()


class _FileHandler(StreamHandler):
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
        with self.lock:
            self.stream.close()


def setup(stderr: bool, debug: bool = False, log_file: Optional[str] = None) -> Logger:
    """Configure the "tftpd" logger.  A log file that cannot be opened raises OSError."""
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.setLevel(DEBUG if debug else INFO)
    timed = Formatter(_FORMAT, _DATEFMT)
    if stderr:
        h: Handler = StreamHandler(sys.stderr)
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
            sh.setFormatter(Formatter("tftpd[%(process)d]: %(message)s"))
            log.addHandler(sh)
    if not log.handlers:
        log.addHandler(NullHandler())
    return log


def set_debug(on: bool) -> None:
    """Debug level (the -s packet trace) on or off at run time."""
    log.setLevel(DEBUG if on else INFO)


def reopen() -> None:
    """SIGHUP: reopen the log file and reconnect to syslog."""
    for h in list(log.handlers):
        try:
            if isinstance(h, _FileHandler):
                h.reopen()
            elif isinstance(h, SyslogHandler):
                with h.lock:
                    h.connect()
        except OSError as e:
            log.warning("cannot reopen log %s: %s", getattr(h, "path", "?"), e.strerror or e)


def descriptors() -> List[int]:
    """File descriptors the log needs (for a daemon's files_preserve)."""
    fds = []
    for h in log.handlers:
        if isinstance(h, SyslogHandler) and h.sock is not None:
            fds.append(h.sock.fileno())
        elif isinstance(h, _FileHandler):
            fds.append(h.stream.fileno())
    return fds


def drop_stderr() -> None:
    """Stop logging to standard error (a daemon has detached from it)."""
    for h in list(log.handlers):
        if type(h) is StreamHandler:
            log.removeHandler(h)
    if not log.handlers:
        log.addHandler(NullHandler())
