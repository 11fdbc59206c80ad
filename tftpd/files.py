"""Block sources for RRQ and atomic sinks for WRQ.

A source hands out whole DATA packets (header and block) as memoryviews into
one reusable buffer filled with ``os.preadv``.  At block sizes where one read
would hold a single block, copying the data twice (file to buffer, buffer to
socket) is most of the cost, so those files are mapped instead and a packet is
a (header, payload) pair for one ``sendmsg``: the kernel copies straight from
the page cache.  The server itself never touches mapped memory, so a file
truncated under it makes that ``sendmsg`` fail with EFAULT (a read error, the
transfer ends) rather than SIGBUS the process.  What ``packet()`` returns is
valid until the next call: the engine transmits each packet before it asks
for the next one.

A sink writes to a temporary file in the target's directory and renames it
over the target only after the last block has been flushed and fsynced.
"""

from __future__ import annotations

import errno
import os
import struct
from collections import OrderedDict

from . import netascii
from .transfer import SHRANK

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple, Union

    from .transfer import Buffer

__all__ = ["file_source", "FileSource", "MappedSource", "SmallSource", "BytesSource",
           "NetasciiSource", "AtomicFile", "NetasciiSink", "TEMP_PREFIX", "TEMP_SUFFIX",
           "TEMP_LETTERS", "READ_CHUNK", "kept_contents", "settled", "keep_contents"]

READ_CHUNK = 16 * 1024   # a run of blocks read at once: 200 transfers hold 3 MiB
MAP_MIN_BLKSIZE = 32 * 1024   # from here on a file is mapped (measured: 10 vs 13 µs per block)
MAP_WINDOW = 2 * 1024 * 1024  # mapped at once when a file is not kept mapped (see _kept_mapping)
KEEP_MAPPED_MAX = 1 << 30      # files up to this size are mapped whole and kept mapped
KEEP_MAPPED = 4                # files kept mapped per process, the most recently sent
MAX_SLOTS = 256            # iovecs per preadv (IOV_MAX is 1024)
KEEP_CONTENTS_MAX = 4096   # files up to this size have their contents kept (kept_contents)
KEEP_CONTENTS = 256        # ... this many of them per process, the most recently sent
# A file's contents are kept only once it has not changed for this many
# seconds (settled): a change after the read then gets a later ctime, even
# where time stamps count whole seconds (or two, as FAT's do).
KEEP_CONTENTS_SETTLED = 3.0
_HDR = struct.Struct("!HH")
# The high and low bytes of the block numbers n, n+1, ... are _HIGH[n:] and
# _LOW[n:] (a run of up to MAX_SLOTS from any n < 65536).
_LOW = bytes(range(256)) * 258
_HIGH = b"".join(bytes((i,)) * 256 for i in range(256)) + bytes(512)
TEMP_PREFIX = ".tftpd-"
TEMP_SUFFIX = ".part"
TEMP_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"   # 8 of them between (as tempfile)


class FileSource:
    """DATA packets of a file in octet mode.

    The buffer is a row of slots, each a 4-byte DATA header followed by one
    block; one ``preadv`` scatters a run of blocks into the slots' payload
    areas, and ``packet()`` writes the header in place and returns the slot
    as a memoryview: the driver sends it with one ``sendto``, no copy.
    ``run()`` numbers a whole run at once, for a caller that walks it.
    """

    __slots__ = ("fd", "blksize", "buf", "view", "slot", "payloads", "packets",
                 "first", "count", "tail", "eof")

    def __init__(self, fd: int, blksize: int, size_hint: int) -> None:
        self.fd = fd
        self.blksize = blksize
        self.slot = slot = blksize + 4
        blocks = size_hint // blksize + 1                  # the whole file
        n = max(1, min(blocks, READ_CHUNK // blksize, MAX_SLOTS))
        self.buf = bytearray(slot * n)
        self.view = view = memoryview(self.buf)
        view[1::slot] = b"\x03" * n                       # every slot is a DATA packet
        self.payloads = [view[i * slot + 4:(i + 1) * slot] for i in range(n)]
        self.packets = [view[i * slot:(i + 1) * slot] for i in range(n)]
        self.first = 0        # block index held in slot 0 (0: nothing loaded)
        self.count = 0        # blocks held
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

    def run(self, index: int, number: int) -> List[memoryview]:
        """The packets of blocks ``index``, ``index + 1``... that one read
        brings in (at least one: the last may be short, or empty), numbered
        from ``number``.  A run ends where the numbers would pass 65535: the
        caller numbers the next one (the numbering wraps to 0 or 1).  The
        packets are valid until the next ``run()`` or ``packet()``."""
        self._load(index)
        count, slot = self.count, self.slot
        if number + count > 65536:
            count = 65536 - number
        end = number + len(self.packets)
        self.view[2::slot] = _HIGH[number:end]
        self.view[3::slot] = _LOW[number:end]
        if count < self.count or not self.eof:
            return self.packets[:count]
        out = self.packets[:count - 1]
        out.append(self.packets[count - 1][:4 + self.tail])
        return out

    def packet(self, index: int, number: int) -> memoryview:
        i = index - self.first
        if i < 0 or i >= self.count:
            self._load(index)
            i = 0
        _HDR.pack_into(self.buf, i * self.slot, 3, number)
        if i == self.count - 1 and self.eof:
            return self.packets[i][:4 + self.tail]
        return self.packets[i]


class MappedSource:
    """DATA packets of a file in octet mode at a big block size, as
    ``(header, payload)`` pairs: the payload is a view of the file mapped
    read-only, ``MAP_WINDOW`` bytes at a time.

    The size is the file's at the start; a file that grew by the time the
    end is reached is served to its new end (as ``FileSource`` does).  One
    that shrank fails the transfer: a new mapping past the end raises
    OSError here, a send from a page no longer in the file fails with EFAULT.
    ``whole``: a view of the whole file mapped (``_kept_mapping``); else the
    first block is mapped at once: OSError if the file cannot be mapped.
    """

    __slots__ = ("fd", "blksize", "size", "header", "view", "lo", "hi")
    gathered = True             # packets are pairs: the driver sends them with sendmsg

    def __init__(self, fd: int, blksize: int, size: int,
                 whole: Optional[memoryview] = None) -> None:
        self.fd = fd
        self.blksize = blksize
        self.size = size
        self.header = bytearray(4)
        self.view: Optional[memoryview] = whole
        self.lo = self.hi = 0   # file offsets covered by view
        if whole is not None:
            self.hi = len(whole)
        else:
            self._map(0, min(size, blksize))

    def _map(self, start: int, stop: int) -> None:
        import mmap             # here: an inetd start at small block sizes never needs it
        lo = start - start % mmap.ALLOCATIONGRANULARITY
        hi = min(self.size, max(lo + MAP_WINDOW, stop))
        self.view = None        # the old mapping goes when its last packet does
        try:
            mapped = mmap.mmap(self.fd, hi - lo, prot=mmap.PROT_READ, offset=lo)
        except ValueError:      # mmap checks the length against the file's size
            raise OSError(errno.EIO, SHRANK) from None
        self.view = memoryview(mapped)
        self.lo, self.hi = lo, hi

    def packet(self, index: int, number: int) -> Tuple[bytearray, Buffer]:
        start = (index - 1) * self.blksize
        stop = start + self.blksize
        if stop > self.size:            # the end as known: has the file grown?
            self.size = os.fstat(self.fd).st_size
            if stop > self.size:
                stop = self.size
        _HDR.pack_into(self.header, 0, 3, number)
        if stop <= start:
            return self.header, b""
        if start < self.lo or stop > self.hi:
            self._map(start, stop)
        assert self.view is not None
        return self.header, self.view[start - self.lo:stop - self.lo]


class SmallSource:
    """DATA packets of a file smaller than one block (most configuration
    files): each packet is read when asked, with one ``pread``; a run buffer
    or a mapping would cost more to set up than the transfer itself."""

    __slots__ = ("fd", "blksize")

    def __init__(self, fd: int, blksize: int) -> None:
        self.fd = fd
        self.blksize = blksize

    def packet(self, index: int, number: int) -> bytes:
        blksize = self.blksize
        return _HDR.pack(3, number) + os.pread(self.fd, blksize, (index - 1) * blksize)


class BytesSource:
    """DATA packets of a file whose contents are in memory (``kept_contents``):
    no descriptor, no read."""

    __slots__ = ("data", "blksize", "first")

    def __init__(self, data: bytes, blksize: int) -> None:
        self.data = data
        self.blksize = blksize
        self.first = b"\x00\x03\x00\x01" + data[:blksize]

    def packet(self, index: int, number: int) -> bytes:
        if index == 1 and number == 1:
            return self.first
        blksize = self.blksize
        return _HDR.pack(3, number) + self.data[(index - 1) * blksize:index * blksize]


# The contents of small files, by what ``os.fstat`` says of the file: device,
# inode, size, and the times of its last write and last change (ctime, which
# every write, chmod, chown or ACL change sets and nothing can set back).
# Shared by the transfer threads without a lock, as _kept below.
_contents: "OrderedDict[Tuple[int, int, int, int, int], bytes]" = OrderedDict()
_seen: "Dict[Tuple[int, int, int, int, int], float]" = {}   # key -> first seen (time.time())


def _key(st: os.stat_result) -> Tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def kept_contents(st: os.stat_result) -> Optional[bytes]:
    """The contents of the file that ``st`` describes, if they were kept
    (``keep_contents``) and the file has not changed since: a small file
    sent again needs no open and no read."""
    return _contents.get(_key(st))


def settled(st: os.stat_result, now: float) -> bool:
    """May the contents of the file that ``st`` describes be read now and
    kept?  Only a file of at most ``KEEP_CONTENTS_MAX`` bytes that has not
    changed for ``KEEP_CONTENTS_SETTLED`` seconds, so that a change after
    the read cannot keep the ctime of the change before it: where time
    stamps are finer than a second (a clock tick on Linux), its ctime must
    be that much older than ``now`` (time.time()); where they count whole
    seconds (or two, as FAT's do), this process must have seen the file
    unchanged (``_key``) that long before ``now``, whatever the clock that
    stamped it says."""
    if st.st_size > KEEP_CONTENTS_MAX:
        return False
    if st.st_ctime_ns % 1_000_000_000 and now - st.st_ctime >= KEEP_CONTENTS_SETTLED:
        return True
    key = _key(st)
    first = _seen.get(key)
    if first is None:
        if len(_seen) >= 4 * KEEP_CONTENTS:
            _seen.clear()
        _seen[key] = now
        return False
    return now - first >= KEEP_CONTENTS_SETTLED


def keep_contents(st: os.stat_result, data: bytes) -> None:
    """Keep ``data``, all of the file that ``st`` describes, read after
    ``settled`` said so, for ``kept_contents``; the ``KEEP_CONTENTS`` most
    recently kept stay."""
    key = _key(st)
    _seen.pop(key, None)
    _contents[key] = data
    while len(_contents) > KEEP_CONTENTS:
        try:
            _contents.popitem(last=False)
        except KeyError:          # emptied by another thread meanwhile
            break


# Transfer threads share it without a lock: each OrderedDict call is atomic
# under the GIL, and two threads that map one file at once both serve it.
_kept: "OrderedDict[Tuple[int, int, int], memoryview]" = OrderedDict()


def _kept_mapping(fd: int, size: int) -> Optional[memoryview]:
    """The whole file mapped read-only, kept for the next transfer of the
    same file (same device, inode and size) in this process: mapping a file
    costs its page faults and unmapping again on every transfer (at blksize
    65464, 20-22 against 15.5 us of CPU per block).  The mapping is shared,
    so it shows the file as it is now; it goes when it is neither among the
    ``KEEP_MAPPED`` most recent nor used by a transfer.  None for a file too
    big to keep; OSError if it cannot be mapped."""
    if size > KEEP_MAPPED_MAX:
        return None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, size)
    view = _kept.get(key)
    if view is not None:
        try:
            _kept.move_to_end(key)
        except KeyError:        # dropped by another thread meanwhile
            pass
        return view
    import mmap
    try:
        view = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
    except (ValueError, OverflowError):  # shorter than size by now; too big for this machine
        return None
    _kept[key] = view
    while len(_kept) > KEEP_MAPPED:
        _kept.popitem(last=False)
    return view


def file_source(fd: int, blksize: int, size: int) -> Union[FileSource, MappedSource, SmallSource]:
    """The source for a file in octet mode: read as needed if it is smaller
    than a block; mapped at big block sizes when the file can be mapped (not
    every file system can): kept mapped if it is not too big, else mapped a
    window at a time; read in runs of blocks otherwise."""
    if size < blksize:
        return SmallSource(fd, blksize)
    if blksize >= MAP_MIN_BLKSIZE:
        try:
            return MappedSource(fd, blksize, size, _kept_mapping(fd, size))
        except OSError:
            pass
    return FileSource(fd, blksize, size)


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


_CREATE_FLAGS = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))


def _create_temporary(directory: str, prefix: str, suffix: str) -> Tuple[int, str]:
    """A new file of mode 0600, ``prefix`` + 8 random letters + ``suffix`` in
    ``directory``, opened for writing: what ``tempfile.mkstemp`` does, without
    the ~5 ms that importing tempfile (random, shutil, re, bz2, lzma...) adds
    to an inetd start with -n."""
    for _ in range(100):
        letters = "".join(TEMP_LETTERS[b % len(TEMP_LETTERS)] for b in os.urandom(8))
        path = os.path.join(directory, prefix + letters + suffix)
        try:
            return os.open(path, _CREATE_FLAGS, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name",
                          os.path.join(directory, prefix + "*" + suffix))


class AtomicFile:
    """A new version of ``target``, visible only once complete.

    Data goes to ``.tftpd-<name>.XXXXXX.part`` beside the target; ``finish()``
    flushes, fsyncs and renames it over the target; ``abort()`` removes it.
    """

    def __init__(self, target: str, mode: int) -> None:
        directory, name = os.path.split(target)
        self.target = target
        fd, self.temp = _create_temporary(directory, f"{TEMP_PREFIX}{name[:64]}.", TEMP_SUFFIX)
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
