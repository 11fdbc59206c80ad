"""tftpaccess.ctl and the file rules end to end: the real server on loopback,
real clients (tftp-hpa ``tftp``, ``atftp``, ``curl``) asking for hostile names.

Every refusal must reach the client as an ERROR, leak none of the refused file,
and (for WRQ) create nothing anywhere.  The access file is edited while the
server runs and takes effect without a restart; an access file that cannot be
read refuses everything.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import need

pytestmark = pytest.mark.e2e

CLIENTS = ["tftp", "atftp", "curl"]


@dataclass
class Site:
    base: Path
    root: Path
    outside: Path
    ctl: Path
    work: Path

    def rules(self, *extra: str) -> None:
        text = f"# test site\nallow:{self.root}\ndeny:{self.root}/private\n" + \
            "".join(line + "\n" for line in extra)
        tmp = self.ctl.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, self.ctl)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    base = tmp_path / "site"
    root, outside, work = base / "root", base / "outside", tmp_path / "work"
    for d in (root / "sub", root / "private", root / "dir", outside, work):
        d.mkdir(parents=True)
    (root / "ok.txt").write_text("OK-CONTENT\n" * 100)
    (root / "sub" / "deep.txt").write_text("DEEP-CONTENT\n")
    (root / "private" / "p.txt").write_text("PRIVATE-CONTENT\n")
    (root / "secret.txt").write_text("SECRET-CONTENT\n")
    (outside / "o.txt").write_text("OUTSIDE-CONTENT\n")
    (base / "x").write_text("ABOVE-CONTENT\n")
    for f in (root / "ok.txt", root / "sub" / "deep.txt", root / "private" / "p.txt",
              outside / "o.txt", base / "x"):
        os.chmod(f, 0o644)
    os.chmod(root / "secret.txt", 0o600)
    (root / "out-link").symlink_to(outside / "o.txt")
    (root / "out-dir").symlink_to(outside)
    (root / "priv-link").symlink_to(root / "private" / "p.txt")
    (root / "up-link").symlink_to(base / "x")
    (root / "in-link").symlink_to("sub/deep.txt")
    os.mkfifo(root / "fifo")
    os.chmod(root / "fifo", 0o666)
    s = Site(base, root, outside, base / "tftpaccess.ctl", work)
    s.rules()
    return s


def _url(server, name: str) -> str:
    return f"tftp://{server.host}:{server.port}/{urllib.parse.quote(name, safe='/')}"


def get(client: str, server, name: str, dest: Path) -> Tuple[bool, str]:
    """Fetch ``name``; (succeeded, what the client said)."""
    exe = need(client)
    port = str(server.port)
    if client == "tftp":
        cmd = [exe, "-m", "binary", server.host, port, "-c", "get", name, str(dest)]
    elif client == "atftp":
        cmd = [exe, "--get", "-r", name, "-l", str(dest), server.host, port]
    else:
        cmd = [exe, "-sS", "--path-as-is", "--max-time", "20", "-o", str(dest),
               _url(server, name)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    said = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0 and "Error" not in said and "error" not in said, said


def put(client: str, server, local: Path, name: str) -> Tuple[bool, str]:
    exe = need(client)
    port = str(server.port)
    if client == "tftp":
        cmd = [exe, "-m", "binary", server.host, port, "-c", "put", str(local), name]
    elif client == "atftp":
        cmd = [exe, "--put", "-l", str(local), "-r", name, server.host, port]
    else:
        cmd = [exe, "-sS", "--path-as-is", "--max-time", "20", "-T", str(local),
               _url(server, name)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    said = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0 and "Error" not in said and "error" not in said, said


def start(tftpd_server, site: Site, *args: str):
    return tftpd_server("--access-file", str(site.ctl), *args, root=site.root)


def leaked(path: Path) -> str:
    if not path.exists():
        return ""
    return path.read_bytes().decode("latin-1")         # any byte of a refused file


def listing(base: Path) -> List[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*"))


def refused_in_log(server, kind: str, name: str, timeout: float = 10.0) -> str:
    return server.wait_for_log(rf"{kind} {re.escape(name)} refused: ", timeout)


def hostile_names(site: Site) -> List[Tuple[str, str]]:
    """(name as the client sends it, the reason it must be refused)."""
    return [
        ("private/p.txt", "denied tree"),
        ("/etc/passwd", "absolute path outside"),
        ("../../etc/passwd", "traversal"),
        ("../../../../../../../../etc/passwd", "deep traversal"),
        ("sub/../../x", "traversal through a subdirectory"),
        ("out-link", "symlink to a file outside"),
        ("out-dir/o.txt", "symlinked directory outside"),
        ("priv-link", "symlink into the denied tree"),
        ("up-link", "symlink above the root"),
        (str(site.outside / "o.txt"), "absolute path to an unlisted tree"),
        (f"{site.root}/../x", "absolute traversal"),
        ("secret.txt", "0600 file"),
        ("dir", "directory"),
        ("sub/", "directory with a slash"),
        ("fifo", "FIFO"),
    ]


@pytest.mark.parametrize("client", CLIENTS)
def test_allowed_files_are_served(tftpd_server, site: Site, client: str) -> None:
    server = start(tftpd_server, site)
    for i, name in enumerate(["ok.txt", "sub/deep.txt", "in-link", "sub/../ok.txt",
                              str(site.root / "ok.txt")]):
        dest = site.work / f"got{i}"
        ok, said = get(client, server, name, dest)
        assert ok, f"{client} get {name}: {said}\n{server.log()}"
        want = (site.root / ("sub/deep.txt" if "deep" in name or name == "in-link"
                             else "ok.txt")).read_bytes()
        assert dest.read_bytes() == want, name


@pytest.mark.parametrize("client", CLIENTS)
def test_hostile_reads_are_refused_and_leak_nothing(tftpd_server, site: Site,
                                                    client: str) -> None:
    server = start(tftpd_server, site)
    problems = []
    for i, (name, why) in enumerate(hostile_names(site)):
        dest = site.work / f"out{i}"
        started = time.monotonic()
        ok, said = get(client, server, name, dest)
        if ok:
            problems.append(f"{name} ({why}): served")
        if leaked(dest):
            problems.append(f"{name} ({why}): leaked {leaked(dest)[:40]!r}")
        if client != "curl" and "Access violation" not in said:
            problems.append(f"{name} ({why}): client said {said!r}, not an access violation")
        if time.monotonic() - started > 15:
            problems.append(f"{name} ({why}): took {time.monotonic() - started:.1f} s")
        try:
            refused_in_log(server, "RRQ", name, timeout=5)
        except AssertionError:
            problems.append(f"{name} ({why}): no 'refused' log line for exactly this name")
    assert not problems, "\n".join(problems) + "\n" + server.log()
    assert "Access violation" in server.log()
    assert server.proc.poll() is None


@pytest.mark.parametrize("client", CLIENTS)
def test_writes_outside_allowed_trees_create_nothing(tftpd_server, site: Site,
                                                     client: str) -> None:
    server = start(tftpd_server, site, "-n")
    local = site.work / "upload.bin"
    local.write_bytes(b"UPLOADED\n" * 300)
    before = listing(site.base)
    problems = []
    for name in ["../new1.txt", "sub/../../new2.txt", "../../new3.txt", "out-dir/new4.txt",
                 "private/new5.txt", str(site.outside / "new6.txt"), "out-link", "up-link",
                 "priv-link", "/etc/tftpd-e2e-must-not-exist", "dir", "fifo"]:
        ok, said = put(client, server, local, name)
        if ok:
            problems.append(f"{name}: accepted ({said!r})")
        try:
            refused_in_log(server, "WRQ", name, timeout=5)
        except AssertionError:
            problems.append(f"{name}: no 'refused' log line for exactly this name")
    assert not problems, "\n".join(problems) + "\n" + server.log()
    assert listing(site.base) == before
    assert not os.path.exists("/etc/tftpd-e2e-must-not-exist")
    assert not (site.base.parent / "new3.txt").exists()
    assert (site.outside / "o.txt").read_text() == "OUTSIDE-CONTENT\n"
    assert (site.base / "x").read_text() == "ABOVE-CONTENT\n"
    # ...while a write inside the allowed tree works
    ok, said = put(client, server, local, "sub/up.txt")
    assert ok, said
    end = time.monotonic() + 10
    while not (site.root / "sub" / "up.txt").exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert (site.root / "sub" / "up.txt").read_bytes() == local.read_bytes()


def test_writes_need_n(tftpd_server, site: Site) -> None:
    server = start(tftpd_server, site)
    local = site.work / "upload.bin"
    local.write_bytes(b"x")
    ok, said = put("tftp", server, local, "sub/new.txt")
    assert not ok and "Access violation" in said
    assert not (site.root / "sub" / "new.txt").exists()


@pytest.mark.parametrize("client", ["tftp", "atftp"])
def test_access_file_edit_takes_effect_without_restart(tftpd_server, site: Site,
                                                       client: str) -> None:
    server = start(tftpd_server, site)
    pid = server.proc.pid
    assert get(client, server, "ok.txt", site.work / "a")[0]
    assert not get(client, server, "/etc/hostname", site.work / "b")[0]

    site.rules(f"deny:{site.root}/ok.txt", "allow:/etc/hostname")
    ok, said = get(client, server, "ok.txt", site.work / "c")
    assert not ok and "Access violation" in said
    assert not leaked(site.work / "c")
    if os.path.isfile("/etc/hostname") and os.stat("/etc/hostname").st_mode & 0o004:
        assert get(client, server, "/etc/hostname", site.work / "d")[0]
    server.wait_for_log(r"access file .*\(reloaded\)")

    site.ctl.write_text(f"allow:{site.root}\n")                # edited in place this time
    assert get(client, server, "ok.txt", site.work / "e")[0]
    assert get(client, server, "private/p.txt", site.work / "f")[0]
    assert server.proc.pid == pid and server.proc.poll() is None


def test_deleted_access_file_falls_back_to_the_root(tftpd_server, site: Site) -> None:
    site.rules(f"allow:{site.outside}")
    server = start(tftpd_server, site)
    assert get("atftp", server, str(site.outside / "o.txt"), site.work / "a")[0]
    site.ctl.unlink()
    assert not get("atftp", server, str(site.outside / "o.txt"), site.work / "b")[0]
    assert get("atftp", server, "ok.txt", site.work / "c")[0]
    assert get("atftp", server, "private/p.txt", site.work / "d")[0]  # root: all of it
    server.wait_for_log(r"no access file .*: serving only ")


def test_unreadable_access_file_refuses_everything(tftpd_server, site: Site) -> None:
    """Root reads any file, so when the tests run as root a directory stands in for
    "exists but cannot be read"; tests/test_privileges.py covers a 0600 file with
    the server running as nobody."""
    server = start(tftpd_server, site)
    assert get("tftp", server, "ok.txt", site.work / "a")[0]
    saved = site.ctl.read_text()
    if os.geteuid() == 0:
        site.ctl.unlink()
        site.ctl.mkdir()
    else:
        os.chmod(site.ctl, 0)
    for i, name in enumerate(["ok.txt", "sub/deep.txt", "/etc/passwd"]):
        ok, said = get("tftp", server, name, site.work / f"b{i}")
        assert not ok and "Access violation" in said, said
        assert not leaked(site.work / f"b{i}")
    server.wait_for_log(r"refusing every request")
    if site.ctl.is_dir():
        site.ctl.rmdir()
        site.ctl.write_text(saved)
    else:
        os.chmod(site.ctl, 0o644)
    assert get("tftp", server, "ok.txt", site.work / "c")[0]


def test_check_mode_reviews_an_access_file(site: Site) -> None:
    import sys
    from conftest import ROOT
    cmd = [sys.executable, "-m", "tftpd", "--check", "--access-file", str(site.ctl),
           "--root", str(site.root)]
    proc = subprocess.run(cmd + ["ok.txt", "private/p.txt", "out-link", "/etc/passwd"],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=30)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"allowed {site.root}/ok.txt (line 2: allow:{site.root})"
    assert lines[1] == f"denied {site.root}/private/p.txt (line 3: deny:{site.root}/private)"
    assert lines[2] == (f"denied {site.root}/out-link -> {site.outside}/o.txt "
                        f"(no allow: rule covers this path)")
    assert lines[3] == "denied /etc/passwd (no allow: rule covers this path)"
    assert "1 allow and 1 deny" in proc.stderr
    proc = subprocess.run(cmd + ["ok.txt", "sub/deep.txt"], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=30)
    assert proc.returncode == 0 and proc.stdout.count("allowed") == 2
    proc = subprocess.run(cmd + ["secret.txt"], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=30)
    assert proc.returncode == 0 and "not readable by others" in proc.stdout


def test_sighup_rereads_the_access_file(tftpd_server, site: Site) -> None:
    import signal
    server = start(tftpd_server, site)
    assert get("tftp", server, "ok.txt", site.work / "a")[0]
    assert "(reloaded)" not in server.log()
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    assert server.proc.poll() is None                          # SIGHUP does not kill it
    assert get("tftp", server, "ok.txt", site.work / "b")[0]
    server.wait_for_log(r"access file .*\(reloaded\)")
