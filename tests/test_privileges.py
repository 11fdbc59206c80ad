"""Privileges (SPEC 5): started as root, tftpd binds and then runs as --user
(default nobody) with that user's group and no supplementary groups, and
refuses to serve if it cannot.

The server tests need root (CI runs as root).  pytest's tmp_path is 0700 and
nobody could read nothing in it, so the served tree is a fresh world-readable
directory under /var/tmp, removed afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import ROOT, need
from tftpclient import Peer
from tftpd import privileges
from tftpd.privileges import PrivilegeError

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this system")


def status_ids(pid: int, task: str = "") -> Dict[str, List[str]]:
    where = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    out = {}
    with open(where) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                out[key] = value.split()
    return out


@dataclass
class Tree:
    base: Path
    root: Path
    incoming: Path
    ctl: Path


@pytest.fixture
def tree():
    base = Path(tempfile.mkdtemp(prefix="tftpd-priv-test-", dir="/var/tmp"))
    try:
        os.chmod(base, 0o755)
        root, incoming = base / "root", base / "incoming"
        root.mkdir(mode=0o755)
        incoming.mkdir(mode=0o755)
        os.chmod(incoming, 0o777)                     # nobody may create files here
        (root / "pub.txt").write_text("PUBLIC\n" * 50)
        (root / "secret.txt").write_text("SECRET-0600\n")
        (root / "rootonly").mkdir(mode=0o700)
        (root / "rootonly" / "f.txt").write_text("BEHIND-0700\n")
        (incoming / "owned-by-root.txt").write_text("ROOT-OWNED\n")
        for f in (root / "pub.txt", root / "rootonly" / "f.txt", incoming / "owned-by-root.txt"):
            os.chmod(f, 0o644)
        os.chmod(root / "secret.txt", 0o600)
        os.chmod(root / "rootonly", 0o700)
        ctl = base / "tftpaccess.ctl"
        ctl.write_text(f"allow:{root}\nallow:{incoming}\n")
        os.chmod(ctl, 0o644)
        yield Tree(base, root, incoming, ctl)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def get(server, name: str, dest: Path):
    exe = need("atftp")
    proc = subprocess.run([exe, "--get", "-r", name, "-l", str(dest), server.host,
                           str(server.port)], capture_output=True, text=True, timeout=60)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def put(server, local: Path, name: str):
    exe = need("atftp")
    proc = subprocess.run([exe, "--put", "-l", str(local), "-r", name, server.host,
                           str(server.port)], capture_output=True, text=True, timeout=60)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def assert_is_nobody(pid: int) -> None:
    pw = nobody()
    uid, gid = str(pw.pw_uid), str(pw.pw_gid)
    tasks = os.listdir(f"/proc/{pid}/task")
    for task in [""] + tasks:
        ids = status_ids(pid, task)
        assert ids["Uid"] == [uid] * 4, (task, ids)          # real, effective, saved, fs
        assert ids["Gid"] == [gid] * 4, (task, ids)
        assert ids["Groups"] == [], (task, ids)


# -- the server as nobody --------------------------------------------------------

@as_root
def test_big_block_download_as_nobody(tftpd_server, tree: Tree, tmp_path: Path) -> None:
    """A mapped download (blksize >= 32768) after the drop: the module it
    needs was loaded as root (here the interpreter is root-only)."""
    content = bytes(range(256)) * 2000
    (tree.root / "big.bin").write_bytes(content)
    os.chmod(tree.root / "big.bin", 0o644)
    server = tftpd_server("--user", "nobody", "--access-file", str(tree.ctl), root=tree.root)
    assert_is_nobody(server.proc.pid)
    with Peer(server.addr) as peer:
        res = peer.download("big.bin", options={"blksize": "65464"})
    assert res.error is None and res.data == content
    assert "internal error" not in server.log()


@as_root
def test_standalone_server_runs_as_nobody(tftpd_server, tree: Tree, tmp_path: Path) -> None:
    server = tftpd_server("--user", "nobody", "--access-file", str(tree.ctl), root=tree.root)
    assert_is_nobody(server.proc.pid)
    assert get(server, "pub.txt", tmp_path / "a")[0]       # workers exist now
    assert_is_nobody(server.proc.pid)
    line = server.wait_for_log(r"running as nobody")
    assert "no supplementary groups" in line


@as_root
def test_default_user_is_nobody(tree: Tree) -> None:
    from conftest import start_server
    server = start_server(["--access-file", str(tree.ctl)], tree.root)   # no --user at all
    try:
        assert_is_nobody(server.proc.pid)
    finally:
        server.stop()


@as_root
def test_root_only_files_are_not_served(tftpd_server, tree: Tree, tmp_path: Path) -> None:
    server = tftpd_server("--user", "nobody", "--access-file", str(tree.ctl), root=tree.root)
    ok, said = get(server, "pub.txt", tmp_path / "pub")
    assert ok, said
    assert (tmp_path / "pub").read_bytes() == (tree.root / "pub.txt").read_bytes()
    for name in ("secret.txt", "rootonly/f.txt", str(tree.root / "rootonly" / "f.txt")):
        dest = tmp_path / name.replace("/", "_")
        ok, said = get(server, name, dest)
        assert not ok and "Access violation" in said, (name, said)
        assert not dest.exists() or dest.stat().st_size == 0, name


@as_root
def test_control_root_would_serve_the_file_behind_0700(tftpd_server, tree: Tree,
                                                       tmp_path: Path) -> None:
    """The refusal above comes from the dropped privileges, not from a rule."""
    server = tftpd_server("--user", "root", "--access-file", str(tree.ctl), root=tree.root)
    assert get(server, "rootonly/f.txt", tmp_path / "f")[0]


@as_root
def test_writes_as_nobody(tftpd_server, tree: Tree, tmp_path: Path) -> None:
    server = tftpd_server("-n", "-d", str(tree.incoming), "--user", "nobody",
                          "--access-file", str(tree.ctl), root=tree.root)
    local = tmp_path / "up.bin"
    local.write_bytes(b"UP\n" * 1000)
    ok, said = put(server, local, "new.bin")                   # into the 0777 directory
    assert ok, said
    end = time.monotonic() + 10
    while not (tree.incoming / "new.bin").exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert (tree.incoming / "new.bin").read_bytes() == local.read_bytes()
    assert (tree.incoming / "new.bin").stat().st_uid == nobody().pw_uid
    # replacing a file nobody may not write, creating in a root-only directory
    ok, said = put(server, local, "owned-by-root.txt")
    assert not ok and "Access violation" in said, said
    assert (tree.incoming / "owned-by-root.txt").read_text() == "ROOT-OWNED\n"
    ok, said = put(server, local, str(tree.root / "new.bin"))
    assert not ok, said
    assert not (tree.root / "new.bin").exists()
    assert sorted(p.name for p in tree.incoming.iterdir()) == ["new.bin", "owned-by-root.txt"]


@as_root
def test_unreadable_access_file_refuses_everything(tftpd_server, tree: Tree,
                                                   tmp_path: Path) -> None:
    os.chmod(tree.ctl, 0o600)                                  # nobody cannot read it
    server = tftpd_server("--user", "nobody", "--access-file", str(tree.ctl), root=tree.root)
    server.wait_for_log(r"refusing every request: access file .*Permission denied")
    ok, said = get(server, "pub.txt", tmp_path / "a")
    assert not ok and "Access violation" in said
    os.chmod(tree.ctl, 0o644)                                  # fixed: no restart needed
    ok, said = get(server, "pub.txt", tmp_path / "b")
    assert ok, said + server.log()


@as_root
def test_inetd_mode_drops_privileges_too(tree: Tree, tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tftpd", "--root", str(tree.root),
                             "--access-file", str(tree.ctl), "--idle-timeout", "30"],
                            cwd=str(ROOT), stdin=sock.fileno(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    sock.close()
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if status_ids(proc.pid)["Uid"][0] == str(nobody().pw_uid):
                break
            time.sleep(0.05)
        exe = need("atftp")
        got = subprocess.run([exe, "--get", "-r", "pub.txt", "-l", str(tmp_path / "p"),
                              "127.0.0.1", str(port)], capture_output=True, timeout=60)
        assert got.returncode == 0, got
        assert_is_nobody(proc.pid)
    finally:
        proc.terminate()
        proc.wait(15)


# -- refusing to serve -------------------------------------------------------------

def test_unknown_user_is_a_usage_error(tree: Tree) -> None:
    if os.geteuid() != 0:
        pytest.skip("--user only matters when started as root")
    proc = subprocess.run([sys.executable, "-m", "tftpd", "-p", "0", "--address", "127.0.0.1",
                           "--root", str(tree.root), "--user", "no-such-user-tftpd"],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tftpd: --user: unknown user 'no-such-user-tftpd'\n")


@as_root
def test_failed_drop_refuses_to_serve(tree: Tree) -> None:
    """Root without CAP_SETUID/CAP_SETGID (a confined container) cannot drop."""
    setpriv = need("setpriv")
    proc = subprocess.run([setpriv, "--inh-caps=-setuid,-setgid",
                           "--bounding-set=-setuid,-setgid",
                           sys.executable, "-m", "tftpd", "-p", "0", "--address", "127.0.0.1",
                           "--root", str(tree.root), "--user", "nobody"],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert "refusing to serve: cannot become user 'nobody'" in proc.stderr
    assert "listening on" not in proc.stderr


# -- the functions ---------------------------------------------------------------

def test_lookup() -> None:
    pw = nobody()
    assert privileges.lookup("nobody").uid == pw.pw_uid
    assert privileges.lookup(str(pw.pw_uid)).name == pw.pw_name
    with pytest.raises(PrivilegeError, match="unknown user 'no-such-user-tftpd'"):
        privileges.lookup("no-such-user-tftpd")
    with pytest.raises(PrivilegeError):
        privileges.lookup("99999999999999999999")


def test_not_root_serves_as_itself(monkeypatch) -> None:
    monkeypatch.setattr(privileges.os, "geteuid", lambda: 4321)
    monkeypatch.setattr(privileges.os, "setuid", lambda uid: pytest.fail("setuid called"))
    assert "not started as root" in privileges.drop("no-such-user-tftpd")


@as_root
def test_a_drop_that_did_not_take_is_detected(monkeypatch) -> None:
    """setuid "succeeding" without effect must not pass the verification."""
    nobody()
    for name in ("setgroups", "setgid", "setuid"):
        monkeypatch.setattr(privileges.os, name, lambda *a: None)
    with pytest.raises(PrivilegeError, match="uid is"):
        privileges.drop("nobody")
    assert os.geteuid() == 0                                  # nothing happened for real


@as_root
def test_drop_in_a_child_process() -> None:
    """The real sequence, in a forked child (the test process stays root)."""
    pw = nobody()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                              # child
        code = 1
        try:
            os.close(r)
            os.setgroups([0, 1, 2])                           # groups to be cleared
            said = privileges.drop("nobody")
            again = privileges.drop("nobody")                 # as nobody: serve as is
            report = f"{os.getresuid()}|{os.getresgid()}|{os.getgroups()}|{said}|{again}"
            os.write(w, report.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    resuid, resgid, groups, said, again = data.decode().split("|")
    assert resuid == str((pw.pw_uid,) * 3)
    assert resgid == str((pw.pw_gid,) * 3)
    assert groups == "[]"
    assert said.startswith("running as nobody")
    assert "not started as root" in again


def test_every_lazy_import_is_loaded_before_the_drop() -> None:
    """After the switch the interpreter's files may be unreadable (CI's Python lives
    under /root): an import inside a function must name a module that preload()
    or some module's top level has already imported."""
    import ast

    def package_modules(node: ast.ImportFrom) -> List[str]:
        """``from .x import y`` -> tftpd.x; ``from . import x, y`` -> tftpd.x, tftpd.y."""
        if node.module:
            return [f"tftpd.{node.module}"]
        return [f"tftpd.{a.name}" for a in node.names]

    top, lazy = set(), {}
    for path in sorted((ROOT / "tftpd").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                top.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                top.update(package_modules(node))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    for a in node.names:
                        lazy[a.name] = path.name
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if not node.module.startswith("tftpd"):
                        lazy[node.module] = path.name
                elif isinstance(node, ast.ImportFrom) and node.level == 1:
                    for name in package_modules(node):
                        lazy[name] = path.name
    # python-daemon is imported by the parent, before it detaches and drops privileges;
    # select: the foreground waiting for the daemon; ipaddress: --address, parsed
    # and bound before the drop (kept out of the inetd start-up path)
    before_drop = {"daemon", "daemon.pidfile", "lockfile", "select", "ipaddress",
                   # tftpd's own: the server (both front doors) and the daemon
                   # are imported before the drop; --check serves nothing
                   "tftpd.server", "tftpd.daemonize", "tftpd.check"}
    missing = {m: f for m, f in lazy.items()
               if m not in top and m not in privileges.PRELOAD and m not in before_drop
               and m not in sys.builtin_module_names}      # compiled in: no file to read
    assert not missing, f"lazy imports not preloaded (add to privileges.PRELOAD): {missing}"
