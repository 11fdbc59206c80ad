"""Admission: a request, the configuration and the access policy give either a
plan for a transfer (an open file and the negotiated options) or a TftpError.

No sockets, threads or clocks here; only the file system.
"""

from __future__ import annotations

import errno
import os
import stat

from . import netascii, paths
from .files import (
    AtomicFile, BytesSource, FileSource, MappedSource, NetasciiSink, NetasciiSource, SmallSource,
    file_source, free_bytes, keep_contents, kept_contents, settled,
)
from .options import negotiate
from .packets import ErrorCode, Opcode, TftpError, oack_packet

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional, Protocol, Sequence, Tuple, Union

    from .config import Config
    from .options import Limits, Negotiated
    from .packets import Request

    class Policy(Protocol):
        """Decides whether a real path may be served (``AccessTable``, ``RootsPolicy``)."""

        def allowed(self, path: str) -> bool: ...

__all__ = ["Plan", "RootsPolicy", "Admission"]

_MODES = (b"octet", b"netascii")
_READ_FLAGS = (os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
               | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
# O_PATH: resolve a name without opening the file (Linux); 0 where there is none.
_RESOLVE_FLAGS = (os.O_PATH | getattr(os, "O_CLOEXEC", 0)) if hasattr(os, "O_PATH") else 0
# Opening /proc/self/fd/N follows that link to the descriptor's file, which is
# known to be a regular file by then: no O_NOFOLLOW, no O_NONBLOCK.
_REOPEN_FLAGS = _READ_FLAGS & ~getattr(os, "O_NOFOLLOW", 0) & ~os.O_NONBLOCK



def _not_found() -> TftpError:
    return TftpError(ErrorCode.FILE_NOT_FOUND, "File not found")


def _denied() -> TftpError:
    return TftpError(ErrorCode.ACCESS_VIOLATION, "Access violation")


class RootsPolicy:
    """Only files under the given directories (by real path)."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = [os.path.realpath(r) for r in roots]

    def allowed(self, path: str) -> bool:
        return any(paths.within(path, r) for r in self.roots)


class Plan:
    """An admitted request: its open file and what was negotiated."""

    __slots__ = ("opcode", "path", "netascii", "negotiated", "oack", "source", "sink", "fd",
                 "size")

    def __init__(self, opcode: int, path: str, netascii: bool, negotiated: Negotiated,
                 oack: Optional[bytes],
                 source: Union[FileSource, MappedSource, SmallSource, NetasciiSource,
                               BytesSource, None] = None,
                 sink: Union[AtomicFile, NetasciiSink, None] = None, fd: int = -1,
                 size: int = -1) -> None:
        self.opcode = opcode
        self.path = path                # real path
        self.netascii = netascii
        self.negotiated = negotiated
        self.oack = oack
        self.source = source
        self.sink = sink
        self.fd = fd
        self.size = size                # bytes expected: the file's size, a WRQ's tsize, or -1

    def close(self) -> None:
        """Release the file; an unfinished upload is removed."""
        if self.sink is not None:
            self.sink.abort()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _opened_is(fd: int, path: str, st: os.stat_result) -> bool:
    """The descriptor is the file at ``path`` (no swap between check and open)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == path
    except OSError:
        try:
            ref = os.stat(path)
        except OSError:
            return False
        return (ref.st_dev, ref.st_ino) == (st.st_dev, st.st_ino)


def _servable(st: os.stat_result) -> bool:
    """A regular file that others may read (SPEC 3.5)."""
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & stat.S_IROTH)


def _opened(fd: int, pre: os.stat_result, path: Optional[str] = None) -> os.stat_result:
    """The ``fstat`` of a descriptor just opened, if it is still servable and
    the file checked before the open (device and inode, and with ``path``
    the file at that path); else the descriptor is closed and refused."""
    try:
        st = os.fstat(fd)
        if (not _servable(st) or (st.st_dev, st.st_ino) != (pre.st_dev, pre.st_ino)
                or (path is not None and not _opened_is(fd, path, st))):
            raise _denied()
    except BaseException:
        os.close(fd)
        raise
    return st


def _created_in(fd: int, directory: str) -> bool:
    """The new file's descriptor lies in ``directory`` (the checked real path)."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True                        # no /proc: the realpath check stands alone
    return os.path.dirname(where) == directory


class Admission:
    """``clock``: time.time (the server's); with it, the contents of small
    files are kept for their next request (``files.settled``)."""

    def __init__(self, config: Config, policy: Policy, umask: int = 0o022,
                 clock: Optional[Callable[[], float]] = None) -> None:
        self.config = config
        self.policy = policy
        self.limits: Limits = config.limits
        self.new_file_mode = 0o666 & ~umask
        self.clock = clock

    def admit(self, request: Request) -> Plan:
        mode = request.mode.lower()
        if mode not in _MODES:
            raise TftpError(ErrorCode.ILLEGAL_OPERATION,
                            "Illegal TFTP operation: unsupported mode")
        if request.opcode == Opcode.RRQ:
            return self._read(request, mode == b"netascii")
        return self._write(request, mode == b"netascii")

    def _real(self, name: bytes, base: str) -> str:
        """The real path of a requested name; every decision is made on it."""
        if b"\0" in name:                   # (Python 3.9's realpath lets it through)
            raise _denied()
        try:
            return paths.real(paths.lexical(name, base))
        except (OSError, ValueError):
            raise _denied()

    def _read(self, request: Request, text: bool) -> Plan:
        path, fd, st, data = self._open_read(request.filename, not text)
        try:
            options = request.options
            n = negotiate(Opcode.RRQ, options, self.limits,
                          rrq_size=None if not options    # (no closure per plain request)
                          else (lambda: netascii.encoded_size(fd)) if text
                          else (lambda: st.st_size))
            if data is None and not text and self.clock is not None and settled(st, self.clock()):
                data = os.pread(fd, st.st_size + 1, 0)
                if len(data) == st.st_size:
                    keep_contents(st, data)
                else:
                    data = None          # it changed meanwhile: read it as it comes
            source: Union[FileSource, MappedSource, SmallSource, NetasciiSource, BytesSource] = (
                NetasciiSource(fd, n.blksize, n.windowsize) if text
                else BytesSource(data, n.blksize) if data is not None
                else file_source(fd, n.blksize, st.st_size))
            return Plan(Opcode.RRQ, path, text, n, oack_packet(n.oack()) if n.acked else None,
                        source=source, fd=fd, size=st.st_size)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def _open_read(self, name: bytes, kept: bool
                   ) -> Tuple[str, int, os.stat_result, Optional[bytes]]:
        """The real path of a requested file, the file opened for (blocking)
        reads at that path, its ``fstat``, and None; with ``kept``, for a
        small file whose contents were kept (``files.kept_contents``), -1 and
        those contents instead of a descriptor.  Or a TftpError.

        Where the kernel can say it (Linux: ``O_PATH`` and ``/proc``), it
        resolves the name once, into a descriptor that opens nothing (no side
        effects on devices or FIFOs), and ``/proc/self/fd`` gives that
        descriptor's real path; the file is then opened through the same
        descriptor, so it is the file checked.  Any failure before the access
        decision (a missing file, a dangling link, no ``/proc``) goes the long
        way, which also finds the right error.
        """
        if _RESOLVE_FLAGS:
            try:
                ref = os.open(paths.lexical(name, self.config.root), _RESOLVE_FLAGS)
            except (OSError, ValueError):
                ref = -1
            if ref >= 0:
                try:
                    opened = self._open_resolved(ref, kept)
                finally:
                    os.close(ref)
                if opened is not None:
                    return opened
        path, fd, st = self._open_named(name)
        return path, fd, st, None

    def _open_resolved(self, ref: int, kept: bool
                       ) -> Optional[Tuple[str, int, os.stat_result, Optional[bytes]]]:
        """``_open_read`` from an ``O_PATH`` descriptor; None: go the long way."""
        link = f"/proc/self/fd/{ref}"
        try:
            path = os.readlink(link)
            pre = os.fstat(ref)
        except OSError:
            return None
        if not path.startswith("/") or path.endswith(" (deleted)"):
            return None
        if not self.policy.allowed(path):
            raise _denied()
        if not _servable(pre):
            raise _denied()
        if kept:
            # Kept when this file, as it is now, was read before (through
            # the open below): its mode, owner and ACL are those of then
            # (a change would show in its ctime), so the server may read it.
            data = kept_contents(pre)
            if data is not None:
                return path, -1, pre, data
        try:
            fd = os.open(link, _REOPEN_FLAGS)
        except OSError as e:
            raise _not_found() if e.errno in (errno.ENOENT, errno.ENOTDIR) else _denied()
        # The open went through the descriptor's own link: it is the file
        # checked, so its fstat stands (no second one: ~4,500 instructions).
        return path, fd, pre, None

    def _open_named(self, name: bytes) -> Tuple[str, int, os.stat_result]:
        """``_open_read`` by name: ``realpath``, then open with ``O_NOFOLLOW``
        and check that the descriptor is the file at that path."""
        path = self._real(name, self.config.root)
        if not self.policy.allowed(path):
            raise _denied()
        try:
            # Refuse devices, FIFOs and directories before opening them: an
            # open alone can have side effects (a tape rewinds, a FIFO blocks).
            pre = os.lstat(path)
            if not _servable(pre):
                raise _denied()
            fd = os.open(path, _READ_FLAGS)
        except OSError as e:
            raise _not_found() if e.errno in (errno.ENOENT, errno.ENOTDIR) else _denied()
        st = _opened(fd, pre, path)
        try:
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return path, fd, st

    def _write(self, request: Request, text: bool) -> Plan:
        if not self.config.allow_write:
            raise TftpError(ErrorCode.ACCESS_VIOLATION,
                            "Access violation: writing is not enabled")
        path = self._real(request.filename, self.config.write_root)
        if not self.policy.allowed(path):
            raise _denied()
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise TftpError(ErrorCode.FILE_NOT_FOUND, "Directory not found")
        mode = self.new_file_mode
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError:
            raise _denied()
        else:
            if not stat.S_ISREG(st.st_mode):    # a directory, FIFO, device...
                raise TftpError(ErrorCode.FILE_EXISTS, "File already exists")
            if not os.access(path, os.W_OK):
                raise _denied()
            mode = stat.S_IMODE(st.st_mode)
        n = negotiate(Opcode.WRQ, request.options, self.limits)
        if n.tsize is not None:
            free = free_bytes(directory)
            if free is not None and n.tsize > free:
                raise TftpError(ErrorCode.DISK_FULL, "Disk full or allocation exceeded")
        try:
            atomic = AtomicFile(path, mode)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TftpError(ErrorCode.DISK_FULL, "Disk full or allocation exceeded")
            raise _denied()
        if not _created_in(atomic.file.fileno(), directory):
            atomic.abort()                 # the directory was swapped after the check
            raise _denied()
        sink: Union[AtomicFile, NetasciiSink] = NetasciiSink(atomic) if text else atomic
        return Plan(Opcode.WRQ, path, text, n, oack_packet(n.oack()) if n.acked else None,
                    sink=sink, size=-1 if n.tsize is None else n.tsize)
