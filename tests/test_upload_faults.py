"""Uploads survive faults (issue 6, item 5).

* ``kill -9`` of the server in the middle of a WRQ: the old file is intact, no
  partial file appears under the target name, and the temporary left behind
  (``.tftpd-<name>.XXXXXXXX.part``) is removed by the next start -- and only
  such files: the right shape, regular, owned by the server's user, not
  written to for tftpd.cleanup.MIN_AGE seconds, directly in the read root or
  the -d directory, never through a symbolic link.
* A disk that fills during a WRQ (a 1 MiB tmpfs mounted by the test, as root):
  ERROR 3, the old file intact, nothing of the new one left, the space back.
* Several clients writing one file at once: the file is always one complete
  version, never a mix, for readers during the uploads as well as at the end.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List

import pytest

from conftest import IN_CI
from lossy import get, put
from tftpclient import ERROR, Peer
from tftpd.cleanup import MIN_AGE, is_temporary, sweep


def temporaries(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tftpd-"))


def age(path: Path, seconds: float) -> None:
    """Make a file look last written ``seconds`` ago (without following links)."""
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


# -- kill -9 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
def test_kill_9_mid_upload_then_clean_up_at_next_start(tftpd_server, tmp_path: Path,
                                                      existing: bool) -> None:
    root = tmp_path / "root"
    upload = tmp_path / "upload"
    root.mkdir()
    upload.mkdir()
    old = os.urandom(100_000)
    if existing:
        (upload / "target.bin").write_bytes(old)
    server = tftpd_server("-n", "-v", "-d", str(upload), root=root)
    with Peer(server.addr) as peer:
        res = peer.upload("target.bin", os.urandom(2_000_000), stop_after=800)
        assert res.error is None and res.blocks == 800
        server.proc.kill()                          # SIGKILL, by PID
        server.proc.wait(10)
    # the old file (or no file) under the target name; the new data only in a
    # temporary that says what it is
    if existing:
        assert (upload / "target.bin").read_bytes() == old
    else:
        assert not (upload / "target.bin").exists()
    temps = temporaries(upload)
    assert len(temps) == 1 and is_temporary(temps[0]), temps
    assert temps[0].startswith(".tftpd-target.bin.") and temps[0].endswith(".part")
    leftover = upload / temps[0]
    assert leftover.stat().st_mode & 0o777 == 0o600

    # a restart at once keeps it: it could be another instance's running upload
    server = tftpd_server("-n", "-v", "-d", str(upload), root=root)
    assert temporaries(upload) == temps
    assert not any("leftover" in l or "removed" in l for l in server.lines)
    server.stop()

    # once it has not been written to for MIN_AGE seconds, the next start removes it
    age(leftover, MIN_AGE + 5)
    server = tftpd_server("-n", "-v", "-d", str(upload), root=root)
    line = server.wait_for_log(r"removed .*\.tftpd-target\.bin\..*\.part, left by an "
                               r"interrupted upload")
    assert str(upload) in line
    assert temporaries(upload) == []
    if existing:
        assert (upload / "target.bin").read_bytes() == old
    # and the upload can be done again, in full
    content = os.urandom(300_000)
    with Peer(server.addr) as peer:
        res = peer.upload("target.bin", content)
    assert res.error is None and (upload / "target.bin").read_bytes() == content


def test_start_up_removes_only_leftover_temporaries(tftpd_server, tmp_path: Path) -> None:
    root = tmp_path / "root"
    upload = tmp_path / "upload"
    elsewhere = tmp_path / "elsewhere"
    for d in (root, upload, elsewhere, root / "sub"):
        d.mkdir()
    (elsewhere / "precious").write_bytes(b"not ours to remove")

    def make(path: Path, content: bytes = b"partial upload", old: bool = True) -> Path:
        path.write_bytes(content)
        path.chmod(0o600)
        if old:
            age(path, 3600)
        return path

    removed = [make(root / ".tftpd-a.bin.abcd1234.part"),
               make(upload / ".tftpd-b.bin.x_y0z9qq.part"),
               make(upload / ".tftpd-with.dots.in.name.k2j4h6g8.part")]
    kept = [
        make(root / ".tftpd-fresh.bin.abcd1234.part", old=False),   # may be running elsewhere
        make(root / ".tftpd-notes.part"),                           # not the shape
        make(root / ".tftpd-a.bin.ABCD1234.part"),                  # not tempfile's letters
        make(root / ".tftpd-a.bin.abcd123.part"),                   # seven characters
        make(root / "tftpd-a.bin.abcd1234.part"),                   # no dot in front
        make(root / ".tftpd-a.bin.abcd1234.part.old"),
        make(root / "sub" / ".tftpd-deep.bin.abcd1234.part"),       # a subdirectory
        make(elsewhere / ".tftpd-else.bin.abcd1234.part"),          # not a served directory
    ]
    link = root / ".tftpd-link.bin.abcd1234.part"                    # a symlink: never followed
    os.symlink(elsewhere / "precious", link)
    age(link, 3600)
    kept.append(link)
    folder = root / ".tftpd-dir.bin.abcd1234.part"                   # a directory
    folder.mkdir()
    age(folder, 3600)
    kept.append(folder)
    if os.geteuid() == 0:                                            # someone else's file
        other = make(upload / ".tftpd-other.bin.abcd1234.part")
        os.chown(other, pwd.getpwnam("nobody").pw_uid, -1)
        kept.append(other)

    # without -n the server writes nothing, and removes nothing
    server = tftpd_server("-v", "-d", str(upload), root=root)
    server.stop()
    assert all(os.path.lexists(p) for p in removed + kept)

    server = tftpd_server("-n", "-v", "-d", str(upload), root=root)
    assert server.wait_for_log(r"removed .*\.tftpd-with\.dots")
    time.sleep(0.2)
    gone = [p for p in removed + kept if not os.path.lexists(p)]
    assert sorted(gone) == sorted(removed), gone
    assert (elsewhere / "precious").read_bytes() == b"not ours to remove"
    lines = [l for l in server.lines if "interrupted upload" in l]
    assert len(lines) == len(removed), lines


def test_sweep_function_edge_cases(tmp_path: Path) -> None:
    """The same rules, on the function: missing directories are reported, the
    same directory twice is swept once, the age is measured from mtime."""
    d = tmp_path / "d"
    d.mkdir()
    f = d / ".tftpd-x.abcdefgh.part"
    f.write_bytes(b"x")
    now = time.time()
    os.utime(f, (now - 100, now - 100))
    removed, problems = sweep([str(d), str(d), str(tmp_path / "missing")], min_age=50, now=now)
    assert len(removed) == 1 and not f.exists()
    assert len(problems) == 1 and "missing" in problems[0]
    f.write_bytes(b"x")
    os.utime(f, (now - 10, now - 10))
    assert sweep([str(d)], min_age=50, now=now) == ([], []) and f.exists()


# -- disk full ----------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, mounted for this test and unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        message = f"cannot mount a tmpfs: {proc.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mnt
    finally:
        for attempt in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True,
                              timeout=30).returncode == 0:
                break
            time.sleep(0.1)                       # the server may still hold a file
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


@pytest.mark.parametrize("size,old_size", [(2_000_000, 300_000), (200_000, 900_000)],
                         ids=["fills-mid-transfer", "fills-at-the-last-block"])
@pytest.mark.parametrize("mode", ["octet", "netascii"])
def test_disk_full_during_upload(tftpd_server, tmp_path: Path, small_disk: Path,
                                 size: int, old_size: int, mode: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    old = os.urandom(old_size)
    (small_disk / "target.bin").write_bytes(old)
    before = free(small_disk)
    assert before < size                          # it cannot fit
    server = tftpd_server("-n", "-v", "-d", str(small_disk), root=root)
    content = os.urandom(size)
    with Peer(server.addr) as peer:
        res = peer.upload("target.bin", content, mode)
        assert res.error is not None, "an upload larger than the disk succeeded"
        assert res.error.code == 3, res.error
        assert "disk full" in res.error.message.lower()
        peer.listen(0.3)                          # room for a (wrong) second ERROR
    assert len(peer.received(ERROR)) == 1
    server.wait_for_log(r"WRQ target\.bin failed after \d+ bytes: disk full")
    assert (small_disk / "target.bin").read_bytes() == old
    deadline = time.monotonic() + 5
    while temporaries(small_disk) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(p.name for p in small_disk.iterdir()) == ["target.bin"]
    assert free(small_disk) == before             # nothing of the new file is left
    # a file that fits is still accepted
    with Peer(server.addr) as peer:
        res = peer.upload("fits.bin", b"small enough" * 100)
    assert res.error is None
    assert (small_disk / "fits.bin").read_bytes() == b"small enough" * 100


# -- concurrent writers of one file -------------------------------------------------------------
def test_concurrent_writers_of_one_file_never_mix(tftpd_server, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    target = root / "shared.bin"
    original = os.urandom(50_000)
    target.write_bytes(original)
    target.chmod(0o644)
    server = tftpd_server("-n", "-c", "32", root=root)
    # 8 writers with different contents and sizes (one ends on a block boundary),
    # windows and block sizes, three rounds
    versions = {hashlib.sha256(original).hexdigest(): "original"}
    jobs = []
    for i in range(24):
        size = [0, 512, 4096, 65_536, 100_000, 333_333, 512 * 700, 1_000_000][i % 8]
        content = os.urandom(size)
        versions[hashlib.sha256(content).hexdigest()] = f"writer {i}"
        jobs.append((content, {"blksize": ["512", "1468", "8192"][i % 3],
                               "windowsize": ["1", "4"][i % 2]}))
    stop = threading.Event()
    seen: List[str] = []
    mixed: List[int] = []

    def reader() -> None:
        for _ in range(200):
            if stop.is_set():
                return
            out = get(server.addr, "shared.bin", {"blksize": "1468"}, dally=0.0)
            if out.error is None and out.ok:
                digest = hashlib.sha256(out.data).hexdigest()
                if digest in versions:
                    seen.append(versions[digest])
                else:
                    mixed.append(len(out.data))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda job: put(server.addr, "shared.bin", job[0], job[1]),
                                    jobs))
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert all(r.ok and r.error is None for r in results), [r.error for r in results]
    final = hashlib.sha256(target.read_bytes()).hexdigest()
    assert final in versions and versions[final] != "original"
    assert mixed == [], f"readers saw {len(mixed)} mixed versions"
    assert len(seen) > 0
    assert temporaries(root) == []
