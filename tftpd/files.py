"""Block sources for RRQ and atomic sinks for WRQ.

A source hands out whole DATA packets (header and block) as memoryviews into
one reusable buffer filled with ``os.preadv`` (no mmap: a file truncated under
us must not SIGBUS the server).  The view returned by ``packet()`` is valid
until the next call: the engine transmits each packet before it asks for the
next one.

A sink writes to a temporary file in the target's directory and renames it
over the target only after the last block has been flushed and fsynced.
"""

from __future__ import annotations

import os
import struct

from . import netascii

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["FileSource", "NetasciiSource", "AtomicFile", "NetasciiSink",
           "TEMP_PREFIX", "TEMP_SUFFIX", "READ_CHUNK"]

READ_CHUNK = 64 * 1024
MAX_SLOTS = 256            # iovecs per preadv (IOV_MAX is 1024)
_HDR = struct.Struct("!HH")
TEMP_PREFIX = ".tftpd-"
TEMP_SUFFIX = ".part"


class FileSource:
    """DATA packets of a file in octet mode.

    The buffer is a row of slots, each a 4-byte DATA header followed by one
    block; one ``preadv`` scatters a run of blocks into the slots' payload
    areas, and ``packet()`` writes the header in place and returns the slot
    as a memoryview: the driver sends it with one ``sendto``, no copy.
    """

    __slots__ = ("fd", "blksize", "buf", "slot", "payloads", "packets",
                 "first", "count", "end", "tail", "eof")

    def __init__(self, fd: int, blksize: int, size_hint: int) -> None:
        self.fd = fd
        self.blksize = blksize
        self.slot = slot = blksize + 4
        blocks = size_hint // blksize + 1                  # the whole file
        n = max(1, min(blocks, READ_CHUNK // blksize, MAX_SLOTS))
        self.buf = bytearray(slot * n)
        view = memoryview(self.buf)
        self.payloads = [view[i * slot + 4:(i + 1) * slot] for i in range(n)]
        self.packets = [view[i * slot:(i + 1) * slot] for i in range(n)]
        self.first = 0        # block index held in slot 0 (0: nothing loaded)
        self.count = 0        # blocks held
        self.end = 0          # first + count: the first block index not held
        self.tail = blksize   # length of the last block held
        self.eof = False

    def _load(self, index: int) -> None:
        n = os.preadv(self.fd, self.payloads, (index - 1) * self.blksize)
        full, rest = divmod(n, self.blksize)
        self.first = index
        if full == len(self.payloads):
            self.count, self.tail, self.eof = full, self.blksize, False
        else:                 # end of file: a short (maybe empty) last block
            self.count, self.tail, self.eof = full + 1, rest, True
        self.end = index + self.count

    def ahead(self, index: int) -> None:
        """Read block ``index`` and the ones after it now, if they are not held
        and the file goes on: the engine calls this once it has sent
        everything before ``index`` and waits for the peer, so the read
        overlaps the round trip instead of delaying the next block (tftp-hpa's
        read-ahead).  The blocks sent are overwritten: a retransmission reads
        them again."""
        if index >= self.end and not self.eof:
            self._load(index)

    def packet(self, index: int, number: int) -> memoryview:
        i = index - self.first
        if i < 0 or i >= self.count:
            self._load(index)
            i = 0
        _HDR.pack_into(self.buf, i * self.slot, 3, number)
        if i == self.count - 1 and self.eof:
            return self.packets[i][:4 + self.tail]
        return self.packets[i]


class NetasciiSource:
    """DATA packets of a file converted to netascii on the fly.

    Keeps the encoded bytes of the current window and the one before it, so a
    go-back to the oldest unacknowledged block never needs the file again.
    """

    def __init__(self, fd: int, blksize: int, windowsize: int) -> None:
        self.fd = fd
        self.blksize = blksize
        self.keep = blksize * (windowsize + 1)
        self._reset()

    def _reset(self) -> None:
        self.enc = bytearray()
        self.enc_start = 0         # encoded offset of enc[0]
        self.raw_off = 0           # next raw offset to read
        self.raw_eof = False

    def packet(self, index: int, number: int) -> bytes:
        off = (index - 1) * self.blksize
        if off < self.enc_start:
            self._reset()          # not reached by the engine; stay correct anyway
        need = off + self.blksize
        while self.enc_start + len(self.enc) < need and not self.raw_eof:
            data = os.pread(self.fd, READ_CHUNK, self.raw_off)
            if not data:
                self.raw_eof = True
                break
            self.raw_off += len(data)
            self.enc += netascii.encode(data)
        drop = off - self.keep - self.enc_start
        if drop > 0:
            del self.enc[:drop]
            self.enc_start += drop
        rel = off - self.enc_start
        return _HDR.pack(3, number) + self.enc[rel:rel + self.blksize]


class AtomicFile:
    """A new version of ``target``, visible only once complete.

    Data goes to ``.tftpd-<name>.XXXXXX.part`` beside the target; ``finish()``
    flushes, fsyncs and renames it over the target; ``abort()`` removes it.
    """

    def __init__(self, target: str, mode: int) -> None:
        import tempfile
        directory, name = os.path.split(target)
        self.target = target
        fd, self.temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name[:64]}.",
                                         suffix=TEMP_SUFFIX, dir=directory)
        self.mode = mode       # applied in finish(): an unfinished upload stays 0600
        self.file = os.fdopen(fd, "wb", buffering=256 * 1024)
        self.done = False

    def write(self, data: memoryview) -> None:
        self.file.write(data)

    def finish(self) -> None:
        self.file.flush()
        try:
            os.fchmod(self.file.fileno(), self.mode)
        except OSError:
            pass
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.target)
        self.done = True
        try:
            dfd = os.open(os.path.dirname(self.target) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.temp)
        except OSError:
            pass


class NetasciiSink:
    """Decodes netascii before handing data to the file."""

    def __init__(self, file: AtomicFile) -> None:
        self.file = file
        self.decoder = netascii.Decoder()

    def write(self, data: memoryview) -> None:
        self.file.write(memoryview(self.decoder.feed(data)))

    def finish(self) -> None:
        tail = self.decoder.flush()
        if tail:
            self.file.write(memoryview(tail))
        self.file.finish()

    def abort(self) -> None:
        self.file.abort()


def free_bytes(directory: str) -> Optional[int]:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
