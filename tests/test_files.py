"""Block sources for RRQ and the atomic sink for WRQ, on real files."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, List
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd import files, netascii
from tftpd.files import (
    TEMP_PREFIX, TEMP_SUFFIX, AtomicFile, FileSource, NetasciiSink, NetasciiSource, free_bytes,
)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + (i >> 9) + seed) & 0xFF for i in range(n))


class TempFd:
    def __init__(self, content: bytes) -> None:
        self.file = tempfile.TemporaryFile()
        self.file.write(content)
        self.file.flush()
        self.fd = self.file.fileno()

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def sender_walk(draw: st.DrawFn, window: int, steps: int) -> List[int]:
    """Block indices as a sender asks for them: forward, or back within a window."""
    out, top = [], 1
    for _ in range(steps):
        back = draw(st.integers(0, window))
        i = max(1, top - back)
        out.append(i)
        top = max(top, i + 1)
    return out


@st.composite
def source_case(draw: st.DrawFn) -> tuple:
    blksize = draw(st.sampled_from([8, 9, 100, 512, 1428, 4096]))
    size = draw(st.one_of(st.integers(0, 5 * blksize + 3),
                          st.sampled_from([0, 1, blksize - 1, blksize, blksize + 1,
                                           3 * blksize, 3 * blksize + 1])))
    hint = draw(st.sampled_from([size, max(0, size - 1), size + 1, 0, size * 3]))
    chunk = draw(st.sampled_from([1, 2 * blksize + 5, 3 * blksize, 64 * 1024]))
    window = draw(st.sampled_from([1, 2, 4, 16]))
    walk = sender_walk(draw, window, draw(st.integers(1, 40)))
    return blksize, size, hint, chunk, window, walk


# --------------------------------------------------------------------------- FileSource

@settings(max_examples=300, deadline=None)
@given(source_case())
def test_file_source_blocks_are_the_files_slices(case: tuple) -> None:
    blksize, size, hint, chunk, _window, walk = case
    body = pattern(size)
    with TempFd(body) as fd, mock.patch.object(files, "READ_CHUNK", chunk):
        src = FileSource(fd, blksize, hint)
        for i in walk + list(range(1, size // blksize + 3)):
            got = src.packet(i, 1)[4:]
            assert isinstance(got, memoryview)
            assert bytes(got) == body[(i - 1) * blksize:i * blksize], (i, blksize, size)


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 100_000, 65536, 65537, 200_000])
@pytest.mark.parametrize("blksize", [8, 512, 1428, 65464])
def test_file_source_whole_file_in_order(size: int, blksize: int) -> None:
    body = pattern(size)
    with TempFd(body) as fd:
        src = FileSource(fd, blksize, size)
        out = []
        i = 1
        while True:
            block = bytes(src.packet(i, 1)[4:])
            out.append(block)
            if len(block) < blksize:
                break
            i += 1
        assert b"".join(out) == body
        assert i == size // blksize + 1


@pytest.mark.parametrize("chunk", [64 * 1024, 3 * 512, 512])
@pytest.mark.parametrize("shrink_to", [0, 100, 512 * 5, 512 * 5 + 7, 512 * 40])
@pytest.mark.parametrize("after", [0, 1, 6, 30])
def test_file_source_survives_a_file_that_shrinks(chunk: int, shrink_to: int, after: int) -> None:
    """Truncated mid-transfer: blocks stay consistent and a short block ends it."""
    body = pattern(512 * 60 + 11)
    with TempFd(body) as fd, mock.patch.object(files, "READ_CHUNK", chunk):
        src = FileSource(fd, 512, len(body))
        served = []
        for i in range(1, after + 1):
            served.append(bytes(src.packet(i, 1)[4:]))
        os.ftruncate(fd, shrink_to)
        i = after + 1
        for _ in range(200):
            block = bytes(src.packet(i, 1)[4:])
            served.append(block)
            if len(block) < 512:
                break
            src.packet(max(1, i - 3), 1)[4:]          # a go-back, as after a timeout
            i += 1
        else:
            raise AssertionError("no short block after the file shrank")
        got = b"".join(served)
        assert got == body[:len(got)]
        assert all(len(b) == 512 for b in served[:-1])
        assert len(got) >= min(shrink_to, 512 * after)


def test_file_source_of_a_file_that_grew_serves_what_is_there() -> None:
    body = pattern(3000)
    with TempFd(body[:1000]) as fd:
        src = FileSource(fd, 512, 1000)
        os.pwrite(fd, body[1000:], 1000)
        got = b"".join(bytes(src.packet(i, 1)[4:]) for i in range(1, 7))
        assert got == body


# --------------------------------------------------------------------------- NetasciiSource

texty = st.lists(st.sampled_from([b"\r", b"\n", b"\0", b"ab", b"\r\n", b"x" * 7]),
                 max_size=200).map(b"".join)


@settings(max_examples=250, deadline=None)
@given(texty, source_case())
def test_netascii_source_blocks_are_slices_of_the_encoding(body: bytes, case: tuple) -> None:
    blksize, _size, _hint, chunk, window, walk = case
    wire = netascii.encode(body)
    with TempFd(body) as fd, mock.patch.object(files, "READ_CHUNK", chunk):
        src = NetasciiSource(fd, blksize, window)
        for i in walk + list(range(1, len(wire) // blksize + 3)):
            assert bytes(src.packet(i, 1)[4:]) == wire[(i - 1) * blksize:i * blksize], i


def test_netascii_source_far_go_back_is_still_right() -> None:
    body = b"line\n" * 3000 + b"end\r"
    wire = netascii.encode(body)
    with TempFd(body) as fd, mock.patch.object(files, "READ_CHUNK", 100):
        src = NetasciiSource(fd, 64, 1)
        for i in (1, 50, 200, 3, 240, 1, 241):
            assert bytes(src.packet(i, 1)[4:]) == wire[(i - 1) * 64:i * 64]


@pytest.mark.parametrize("window", [1, 4, 16])
def test_netascii_source_go_back_within_the_window_does_not_reread(window: int) -> None:
    body = b"a\nb\r" * 2000
    wire = netascii.encode(body)
    with TempFd(body) as fd, mock.patch.object(files, "READ_CHUNK", 50), \
            mock.patch.object(files.os, "pread", wraps=os.pread) as pread:
        src = NetasciiSource(fd, 32, window)
        for top in range(1, len(wire) // 32 + 2):
            assert bytes(src.packet(top, 1)[4:]) == wire[(top - 1) * 32:top * 32]
            calls = pread.call_count
            for back in range(max(1, top - window), top + 1):
                assert bytes(src.packet(back, 1)[4:]) == wire[(back - 1) * 32:back * 32]
            assert pread.call_count == calls, (top, window)


# --------------------------------------------------------------------------- AtomicFile

def temps(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(TEMP_PREFIX) and p.name.endswith(TEMP_SUFFIX))


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "boot.img"
    path.write_bytes(b"old contents\n")
    yield path


def test_atomic_file_replaces_only_at_finish(target: Path) -> None:
    before = os.stat(target)
    f = AtomicFile(str(target), 0o640)
    new = pattern(600_000)                      # more than the write buffer
    for i in range(0, len(new), 1428):
        f.write(memoryview(new)[i:i + 1428])
        assert target.read_bytes() == b"old contents\n"
    assert temps(target.parent) == [os.path.basename(f.temp)]
    assert os.path.dirname(f.temp) == str(target.parent)
    assert os.path.basename(f.temp).startswith(f"{TEMP_PREFIX}boot.img.")
    assert os.stat(target).st_ino == before.st_ino
    # an unfinished upload is nobody else's to read (a RRQ needs o+r)
    assert stat.S_IMODE(os.stat(f.temp).st_mode) == 0o600
    f.finish()
    assert target.read_bytes() == new
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert temps(target.parent) == []
    f.abort()                                   # after finish: nothing to undo
    assert target.read_bytes() == new


def test_atomic_file_abort_keeps_the_old_file(target: Path) -> None:
    f = AtomicFile(str(target), 0o644)
    f.write(memoryview(b"half of a new file"))
    f.abort()
    assert target.read_bytes() == b"old contents\n"
    assert temps(target.parent) == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["boot.img"]
    f.abort()                                   # twice is harmless
    assert target.read_bytes() == b"old contents\n"


def test_atomic_file_abort_of_a_new_file_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new.cfg"
    f = AtomicFile(str(path), 0o644)
    f.write(memoryview(pattern(300_000)))       # some of it reached the disk
    f.abort()
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_empty_upload(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    f = AtomicFile(str(path), 0o600)
    f.finish()
    assert path.read_bytes() == b""
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_atomic_file_long_name_stays_a_valid_temp_name(tmp_path: Path) -> None:
    path = tmp_path / ("n" * 250)
    f = AtomicFile(str(path), 0o644)
    f.write(memoryview(b"x"))
    f.finish()
    assert path.read_bytes() == b"x" and temps(tmp_path) == []


def test_two_writers_do_not_interleave(target: Path) -> None:
    a = AtomicFile(str(target), 0o644)
    b = AtomicFile(str(target), 0o644)
    assert a.temp != b.temp
    a.write(memoryview(b"A" * 1000))
    b.write(memoryview(b"B" * 10))
    a.write(memoryview(b"A" * 1000))
    b.finish()
    assert target.read_bytes() == b"B" * 10
    a.finish()
    assert target.read_bytes() == b"A" * 2000
    assert temps(target.parent) == []


# --------------------------------------------------------------------------- NetasciiSink

def test_netascii_sink_decodes_across_blocks(target: Path) -> None:
    sink = NetasciiSink(AtomicFile(str(target), 0o644))
    for chunk in (b"one\r", b"\ntwo\r", b"\0three\r\n", b"\r"):
        sink.write(memoryview(chunk))
    assert target.read_bytes() == b"old contents\n"
    sink.finish()
    assert target.read_bytes() == b"one\ntwo\rthree\n\r"


def test_netascii_sink_abort(target: Path) -> None:
    sink = NetasciiSink(AtomicFile(str(target), 0o644))
    sink.write(memoryview(b"a\r\nb"))
    sink.abort()
    assert target.read_bytes() == b"old contents\n" and temps(target.parent) == []


def test_free_bytes(tmp_path: Path) -> None:
    free = free_bytes(str(tmp_path))
    assert isinstance(free, int) and free > 0
    assert free_bytes(str(tmp_path / "missing")) is None


def test_atomic_file_failed_finish_then_abort_leaves_no_temp(tmp_path: Path) -> None:
    """The rename fails (the target became a directory): abort still cleans up."""
    path = tmp_path / "victim"
    f = AtomicFile(str(path), 0o644)
    f.write(memoryview(b"data"))
    path.mkdir()
    (path / "keep").write_bytes(b"k")
    with pytest.raises(OSError):
        f.finish()
    f.abort()
    assert temps(tmp_path) == []
    assert (path / "keep").read_bytes() == b"k"


@pytest.mark.parametrize("blksize", [8, 512, 65464])
def test_file_source_packets_carry_the_header_and_share_the_buffer(blksize: int) -> None:
    """packet() is a whole DATA datagram: header written in place, no copy."""
    body = pattern(blksize * 3 + 5)
    with TempFd(body) as fd:
        src = FileSource(fd, blksize, len(body))
        for index, number in [(1, 1), (2, 65535), (3, 0), (4, 7)]:
            pkt = src.packet(index, number)
            assert isinstance(pkt, memoryview) and pkt.obj is src.buf
            assert bytes(pkt[:4]) == b"\x00\x03" + number.to_bytes(2, "big")
            assert bytes(pkt[4:]) == body[(index - 1) * blksize:index * blksize]


# --------------------------------------------------------------------------- MappedSource

def mapped_bytes(pkt: Any) -> bytes:
    header, payload = pkt
    return bytes(header) + bytes(payload)


@st.composite
def mapped_case(draw: st.DrawFn) -> tuple:
    blksize = draw(st.sampled_from([files.MAP_MIN_BLKSIZE, 40_000, 65464]))
    size = draw(st.one_of(st.integers(1, 12 * blksize + 3),
                          st.sampled_from([1, blksize - 1, blksize, blksize + 1,
                                           5 * blksize, 5 * blksize + 1])))
    window = draw(st.sampled_from([1, 2, 4, 16]))
    walk = sender_walk(draw, window, draw(st.integers(1, 40)))
    map_window = draw(st.sampled_from([1, 3 * 4096, 100_000, files.MAP_WINDOW]))
    return blksize, size, walk, map_window


@settings(max_examples=150, deadline=None)
@given(mapped_case())
def test_mapped_source_packets_are_header_and_the_files_slice(case: tuple) -> None:
    blksize, size, walk, map_window = case
    body = pattern(size, seed=3)
    with TempFd(body) as fd, mock.patch.object(files, "MAP_WINDOW", map_window):
        src = files.MappedSource(fd, blksize, size)
        assert src.gathered
        for i in walk + list(range(1, size // blksize + 2)):
            number = i & 0xFFFF
            pkt = src.packet(i, number)
            assert isinstance(pkt, tuple) and len(pkt) == 2
            assert mapped_bytes(pkt) == (b"\x00\x03" + number.to_bytes(2, "big")
                                         + body[(i - 1) * blksize:i * blksize]), (i, blksize, size)


@pytest.mark.parametrize("size", [1, 32768, 65464, 65465, 3 * 65464, 2 * 1024 * 1024 + 5])
def test_mapped_source_whole_file_ends_with_a_short_block(size: int) -> None:
    blksize = 65464
    body = pattern(size)
    with TempFd(body) as fd:
        src = files.MappedSource(fd, blksize, size)
        out, i = [], 1
        while True:
            _, payload = src.packet(i, 1)
            out.append(bytes(payload))
            if len(payload) < blksize:
                break
            i += 1
        assert b"".join(out) == body and i == size // blksize + 1


@pytest.mark.parametrize("blksize,size,kind", [
    (512, 10_000, FileSource), (8192, 10_000, FileSource), (16384, 100_000, FileSource),
    (512, 511, files.SmallSource), (512, 0, files.SmallSource), (512, 512, FileSource),
    (65464, 0, files.SmallSource), (32768, 300, files.SmallSource),
    (32768, 32768, files.MappedSource)])
def test_file_source_picks_by_size_and_block_size(blksize: int, size: int, kind: type) -> None:
    with TempFd(pattern(size)) as fd:
        src = files.file_source(fd, blksize, size)
        assert type(src) is kind
        first = src.packet(1, 1)
        got = b"".join(bytes(p) for p in first) if isinstance(first, tuple) else bytes(first)
        assert got == b"\x00\x03\x00\x01" + pattern(size)[:blksize]


@settings(max_examples=200, deadline=None)
@given(source_case())
def test_small_source_blocks_are_the_files_slices(case: tuple) -> None:
    """Whatever the size (it is picked for files under one block, which may
    grow or shrink meanwhile), a packet is the header and that slice."""
    blksize, size, _hint, _chunk, _window, walk = case
    body = pattern(size)
    with TempFd(body) as fd:
        src = files.SmallSource(fd, blksize)
        for i in walk + list(range(1, size // blksize + 3)):
            number = i & 0xFFFF
            assert src.packet(i, number) == (b"\x00\x03" + number.to_bytes(2, "big")
                                             + body[(i - 1) * blksize:i * blksize])


def test_a_file_is_kept_mapped_for_its_next_transfer() -> None:
    blksize = 65464
    body = pattern(3 * blksize + 7)
    with TempFd(body) as fd:
        first = files.file_source(fd, blksize, len(body))
        second = files.file_source(fd, blksize, len(body))
        assert second.view.obj is first.view.obj                 # one mapping
        os.pwrite(fd, b"new!", blksize)                          # shared: shows the file now
        assert bytes(second.packet(2, 2)[1][:4]) == b"new!"
        os.pwrite(fd, b"more", len(body))                        # another size: another mapping
        third = files.file_source(fd, blksize, len(body) + 4)
        assert third.view.obj is not first.view.obj
        assert bytes(third.packet(4, 4)[1]) == body[3 * blksize:] + b"more"


def test_only_the_most_recent_files_stay_mapped() -> None:
    blksize = 32768
    fds = [TempFd(pattern(blksize + i)) for i in range(files.KEEP_MAPPED + 1)]
    try:
        views = [files.file_source(t.fd, blksize, blksize + i).view for i, t in enumerate(fds)]
        kept = set(map(id, files._kept.values()))
        assert id(views[0]) not in kept                          # the oldest went
        assert all(id(v) in kept for v in views[1:])
        assert bytes(views[0][:4]) == pattern(blksize)[:4]       # still valid where it is used
    finally:
        for t in fds:
            t.file.close()


def test_a_file_too_big_to_keep_mapped_is_mapped_a_window_at_a_time() -> None:
    blksize = 32768
    body = pattern(10 * blksize)
    with TempFd(body) as fd, mock.patch.object(files, "KEEP_MAPPED_MAX", 9 * blksize), \
            mock.patch.object(files, "MAP_WINDOW", 2 * blksize):
        src = files.file_source(fd, blksize, len(body))
        assert isinstance(src, files.MappedSource) and src.hi == 2 * blksize
        assert b"".join(bytes(src.packet(i, i)[1]) for i in range(1, 12)) == body


def test_a_file_that_cannot_be_mapped_is_read() -> None:
    body = pattern(100_000)
    import mmap
    with TempFd(body) as fd, mock.patch.object(mmap, "mmap",
                                               side_effect=OSError(19, "No such device")):
        src = files.file_source(fd, 65464, len(body))
        assert isinstance(src, FileSource)
        assert bytes(src.packet(2, 2)[4:]) == body[65464:]


def test_mapped_source_of_a_file_that_grew_serves_it_to_its_new_end() -> None:
    blksize = 32768
    body = pattern(5 * blksize + 100)
    with TempFd(body[:blksize + 10]) as fd:
        src = files.file_source(fd, blksize, blksize + 10)
        assert bytes(src.packet(1, 1)[1]) == body[:blksize]
        os.pwrite(fd, body[blksize + 10:], blksize + 10)
        got = b"".join(bytes(src.packet(i, i)[1]) for i in range(1, 7))
        assert got == body


def test_mapped_source_of_a_file_that_shrank_fails_as_a_read_error() -> None:
    """Past the mapped window the new mapping fails; inside it (or anywhere in
    a file mapped whole) the send does (EFAULT), never a SIGBUS: the server
    only hands the pages to the kernel."""
    from tftpd.transfer import SHRANK
    from tftpd.worker import make_transmit
    blksize = 65464
    body = pattern(40 * blksize)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        rx.settimeout(5)
        peer = rx.getsockname()
        tx.connect(peer)
        with TempFd(body) as fd:
            kept = files.file_source(fd, blksize, len(body))
            assert kept.hi == len(body)                          # mapped whole
            with mock.patch.object(files, "KEEP_MAPPED_MAX", 0):
                windowed = files.file_source(fd, blksize, len(body))
            assert windowed.hi < len(body)
            for src in (kept, windowed):
                for transmit in (make_transmit(tx), make_transmit(tx, peer=peer)):
                    transmit(src.packet(2, 2), peer)
                    assert rx.recv(70000) == b"\x00\x03\x00\x02" + body[blksize:2 * blksize]
            os.ftruncate(fd, 4096)
            for src in (kept, windowed):
                for transmit in (make_transmit(tx), make_transmit(tx, peer=peer)):
                    with pytest.raises(OSError) as raised:
                        transmit(src.packet(3, 3), peer)         # mapped, now past the end
                    assert raised.value.strerror == SHRANK
            with pytest.raises(OSError) as raised:
                transmit(kept.packet(39, 39), peer)              # mapped whole: the send fails
            assert raised.value.strerror == SHRANK
            with pytest.raises(OSError) as raised:
                windowed.packet(39, 39)                          # a new window: mapping it fails
            assert raised.value.strerror == SHRANK
    finally:
        rx.close()
        tx.close()


def _stat_with(ctime_ns: int, size: int = 10) -> os.stat_result:
    """A regular file's stat with this ctime (and mtime)."""
    secs = ctime_ns / 1e9
    fields = [stat.S_IFREG | 0o644, 7, 1, 1, 0, 0, size, int(secs), int(secs), int(secs),
              secs, secs, secs, ctime_ns, ctime_ns, ctime_ns]
    return os.stat_result(fields[:10], dict(st_atime=secs, st_mtime=secs, st_ctime=secs,
                                            st_atime_ns=ctime_ns, st_mtime_ns=ctime_ns,
                                            st_ctime_ns=ctime_ns))


def test_contents_are_kept_once_the_file_has_settled(monkeypatch) -> None:
    monkeypatch.setattr(files, "_seen", {})
    settled = files.KEEP_CONTENTS_SETTLED
    fine = _stat_with(1_000_000_000_123_456_789)          # sub-second stamps
    t = fine.st_ctime
    assert not files.settled(fine, t + settled - 0.5)     # changed too recently
    assert files.settled(fine, t + settled + 0.5)
    assert not files.settled(_stat_with(fine.st_ctime_ns, files.KEEP_CONTENTS_MAX + 1),
                             t + 100)                     # too big
    # whole-second stamps (or a file server's clock): only after this process
    # has seen the file unchanged for that long, whatever its ctime says
    coarse = _stat_with(1_000_000_000_000_000_000)
    now = coarse.st_ctime + 1000
    assert not files.settled(coarse, now)
    assert not files.settled(coarse, now + settled - 0.5)
    assert files.settled(coarse, now + settled + 0.5)
    changed = _stat_with(coarse.st_ctime_ns + 1_000_000_000)
    assert not files.settled(changed, now + settled + 0.5)   # another file as far as it knows


def test_kept_contents_are_bounded_and_looked_up_by_the_whole_stat(monkeypatch) -> None:
    monkeypatch.setattr(files, "_contents", files.OrderedDict())
    monkeypatch.setattr(files, "_seen", {})
    stats = [_stat_with(1_000_000_000_000_000_001 + i) for i in range(files.KEEP_CONTENTS + 5)]
    for i, st in enumerate(stats):
        files.keep_contents(st, b"%010d" % i)
    assert len(files._contents) == files.KEEP_CONTENTS
    assert files.kept_contents(stats[0]) is None                  # the oldest went
    assert files.kept_contents(stats[-1]) == b"%010d" % (len(stats) - 1)
    assert files.kept_contents(_stat_with(stats[-1].st_ctime_ns, 11)) is None   # other size


@pytest.mark.parametrize("blksize,size", [(512, 0), (512, 300), (512, 512), (512, 4096),
                                          (1468, 1000), (8, 100)])
def test_bytes_source_sends_the_same_packets_as_the_file(blksize: int, size: int) -> None:
    body = pattern(size)
    with TempFd(body) as fd:
        from_file = files.file_source(fd, blksize, size)
        from_bytes = files.BytesSource(body, blksize)
        for i in range(1, size // blksize + 2):
            a, b = from_file.packet(i, i & 0xFFFF), from_bytes.packet(i, i & 0xFFFF)
            assert bytes(a) == bytes(b)
