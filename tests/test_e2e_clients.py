"""End to end: the real clients (tftp-hpa ``tftp``, ``atftp``, ``curl``,
``busybox tftp``) against the real server on 127.0.0.1 and ::1.

Files are a few MiB of random bytes, compared by SHA-256.  A missing client
skips the test on a developer's machine and fails it in CI (``need``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from conftest import ServerProcess, need, start_server
from tftpclient import Peer

pytestmark = pytest.mark.e2e

SIZE = 3 * 1024 * 1024 + 123          # not a multiple of any block size used
CLIENT_TIMEOUT = 60


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_file() -> bytes:
    """LF, CR LF and bare CR, with CRs landing on every block boundary offset."""
    out = bytearray()
    for k in range(700):
        out += b"x" * (k % 37)
        out += (b"\n", b"\r\n", b"\r", b"\r\r\n", b"\n\r")[k % 5]
    return bytes(out) + b"last line without newline"


class Env:
    def __init__(self, server: ServerProcess, tmp: Path) -> None:
        self.server = server
        self.root = server.root
        self.tmp = tmp
        self.big = self.root / "random.bin"
        self.text = self.root / "text.txt"
        self.big_sha = sha_file(self.big)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> str:
        return str(self.server.port)

    def url(self, name: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tftp://{host}:{self.port}/{name}"

    def local(self, name: str) -> Path:
        return self.tmp / name


@pytest.fixture(scope="module", params=["127.0.0.1", "::1"], ids=["v4", "v6"])
def env(request, tmp_path_factory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("e2e")
    root = base / "root"
    root.mkdir()
    (root / "random.bin").write_bytes(os.urandom(SIZE))
    (root / "text.txt").write_bytes(text_file())
    for p in root.iterdir():
        p.chmod(0o644)
    local = base / "local"
    local.mkdir()
    server = start_server(["-n", "-v", "--access-file", str(base / "none.ctl"),
                           "--user", "root"], root, request.param)
    yield Env(server, local)
    server.stop()


def run(cmd: List[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=str(cwd), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=CLIENT_TIMEOUT)
    return r


def check(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"{r.args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"


# -- tftp-hpa ------------------------------------------------------------------
def hpa(env: Env, mode: str, command: str) -> subprocess.CompletedProcess:
    tftp = need("tftp")
    family = "-6" if ":" in env.host else "-4"
    return run([tftp, family, "-m", mode, env.host, env.port, "-c", *command.split()],
               env.tmp)


def test_tftp_hpa_get_octet(env: Env) -> None:
    out = env.local("hpa-get.bin")
    check(hpa(env, "octet", f"get random.bin {out}"))
    assert sha_file(out) == env.big_sha


def test_tftp_hpa_put_octet(env: Env) -> None:
    check(hpa(env, "octet", f"put {env.big} hpa-put.bin"))
    assert sha_file(env.root / "hpa-put.bin") == env.big_sha


def test_tftp_hpa_netascii_get(env: Env) -> None:
    """The server sends LF as CR LF and CR as CR NUL; the client turns them back.
    Without the conversion CR LF and bare CR would not survive the round trip."""
    original = env.text.read_bytes()
    out = env.local("hpa-get.txt")
    check(hpa(env, "netascii", f"get text.txt {out}"))
    assert out.read_bytes() == original
    # octet mode is not converted
    raw = env.local("hpa-get-octet.txt")
    check(hpa(env, "octet", f"get text.txt {raw}"))
    assert raw.read_bytes() == original


def test_tftp_hpa_netascii_put(env: Env) -> None:
    """The client sends netascii; the server stores the local form."""
    original = env.text.read_bytes()
    src = env.local("hpa-src.txt")
    src.write_bytes(original)
    check(hpa(env, "netascii", f"put {src} hpa-put.txt"))
    assert (env.root / "hpa-put.txt").read_bytes() == original
    # and what is on the wire in netascii mode, checked with the scripted peer
    with Peer(env.server.addr) as peer:
        res = peer.download("hpa-put.txt", mode="netascii")
    assert res.error is None
    assert res.data == original.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def test_tftp_hpa_missing_file(env: Env) -> None:
    out = env.local("hpa-missing.bin")
    r = hpa(env, "octet", f"get no-such-file {out}")
    assert "Error code 1" in r.stdout + r.stderr


# -- atftp ---------------------------------------------------------------------------
ATFTP_OPTIONS = ["blksize 1468", "tsize 0", "timeout 2", "windowsize 4", "windowsize 16"]


@pytest.mark.parametrize("option", ATFTP_OPTIONS)
def test_atftp_get(env: Env, option: str) -> None:
    atftp = need("atftp")
    out = env.local(f"atftp-get-{option.replace(' ', '-')}.bin")
    r = run([atftp, "--option", option, "-g", "-r", "random.bin", "-l", str(out),
             env.host, env.port], env.tmp)
    check(r)
    assert sha_file(out) == env.big_sha


@pytest.mark.parametrize("option", ATFTP_OPTIONS)
def test_atftp_put(env: Env, option: str) -> None:
    atftp = need("atftp")
    name = f"atftp-put-{option.replace(' ', '-')}.bin"
    r = run([atftp, "--option", option, "-p", "-r", name, "-l", str(env.big),
             env.host, env.port], env.tmp)
    check(r)
    assert sha_file(env.root / name) == env.big_sha


def test_atftp_all_options_at_once(env: Env) -> None:
    atftp = need("atftp")
    out = env.local("atftp-all.bin")
    r = run([atftp, "--option", "blksize 8192", "--option", "tsize 0", "--option", "timeout 2",
             "--option", "windowsize 8", "-g", "-r", "random.bin", "-l", str(out),
             env.host, env.port], env.tmp)
    check(r)
    assert sha_file(out) == env.big_sha


# -- curl ------------------------------------------------------------------------------
@pytest.mark.parametrize("blksize", [None, "512", "1468", "8192"])
def test_curl_get(env: Env, blksize) -> None:
    curl = need("curl")
    out = env.local(f"curl-get-{blksize}.bin")
    extra = ["--tftp-blksize", blksize] if blksize else []
    check(run([curl, "-sS", "-g", *extra, "-o", str(out), env.url("random.bin")], env.tmp))
    assert sha_file(out) == env.big_sha


@pytest.mark.parametrize("blksize", [None, "1468"])
def test_curl_upload(env: Env, blksize) -> None:
    curl = need("curl")
    name = f"curl-put-{blksize}.bin"
    extra = ["--tftp-blksize", blksize] if blksize else []
    check(run([curl, "-sS", "-g", *extra, "-T", str(env.big), env.url(name)], env.tmp))
    assert sha_file(env.root / name) == env.big_sha


def test_curl_missing_file_fails(env: Env) -> None:
    curl = need("curl")
    r = run([curl, "-sS", "-g", "-o", str(env.local("curl-missing")), env.url("no-such-file")],
            env.tmp)
    assert r.returncode != 0      # curl: TFTP: File Not Found (exit 68)


# -- busybox -------------------------------------------------------------------------------
@pytest.mark.parametrize("blksize", [None, "1468"])
def test_busybox_get(env: Env, blksize) -> None:
    busybox = need("busybox")
    out = env.local(f"bb-get-{blksize}.bin")
    extra = ["-b", blksize] if blksize else []
    check(run([busybox, "tftp", "-g", *extra, "-r", "random.bin", "-l", str(out),
               env.host, env.port], env.tmp))
    assert sha_file(out) == env.big_sha


@pytest.mark.parametrize("blksize", [None, "1468"])
def test_busybox_put(env: Env, blksize) -> None:
    busybox = need("busybox")
    name = f"bb-put-{blksize}.bin"
    extra = ["-b", blksize] if blksize else []
    check(run([busybox, "tftp", "-p", *extra, "-r", name, "-l", str(env.big),
               env.host, env.port], env.tmp))
    assert sha_file(env.root / name) == env.big_sha


def test_server_log_and_no_leftovers(env: Env) -> None:
    """After all of the above: no temporary upload files, nothing failed."""
    assert [p.name for p in env.root.iterdir() if p.name.startswith(".tftpd-")] == []
    assert not any(" failed after " in line for line in env.server.lines), env.server.log()
    assert "::ffff:" not in env.server.log()


def test_tftp_hpa_session_reuses_its_port(env: Env) -> None:
    """tftp-hpa's interactive client sends every request from one port.  Each
    request must be answered the first time: with ``trace`` the client prints
    every request it sends, so a request the server dropped shows up twice."""
    tftp = need("tftp")
    family = "-6" if ":" in env.host else "-4"
    src = env.local("session-up.bin")
    src.write_bytes(os.urandom(5000))
    script = "\n".join([
        "binary", "trace",
        "get random.bin session-1.bin",
        "get text.txt session-2.txt",
        f"put {src} session-up-1.bin",       # the server dallies after this one
        "get random.bin session-3.bin",
        f"put {src} session-up-2.bin",
        "get text.txt session-4.txt",
        "quit", ""])
    r = subprocess.run([tftp, family, env.host, env.port], cwd=str(env.tmp), input=script,
                       capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    requests = [line.split("sent ", 1)[1] for line in r.stdout.splitlines()
                if "sent RRQ" in line or "sent WRQ" in line]
    assert len(requests) == 6, "a request was sent more than once:\n" + "\n".join(requests)
    for name in ("session-1.bin", "session-3.bin"):
        assert sha_file(env.local(name)) == env.big_sha
    for name in ("session-2.txt", "session-4.txt"):
        assert env.local(name).read_bytes() == env.text.read_bytes()
    for name in ("session-up-1.bin", "session-up-2.bin"):
        assert (env.root / name).read_bytes() == src.read_bytes()


def test_every_client_at_once_from_one_process(env: Env, tmp_path: Path) -> None:
    """Six real clients download at once from a server with one serving
    process, so that its multiplexer pumps them together (lock-step at 512
    and 1468, a window of 4): every copy is exact and nothing failed."""
    clients = [need(c) for c in ("tftp", "atftp", "curl", "busybox")]
    server = start_server(["-v", "--processes", "1", "--access-file", str(tmp_path / "none.ctl"),
                           "--user", "root"], env.root, env.host)
    try:
        tftp, atftp, curl, busybox = clients
        host, port = server.host, str(server.port)
        url = f"tftp://{'[' + host + ']' if ':' in host else host}:{port}/random.bin"
        family = "-6" if ":" in host else "-4"
        out = {name: tmp_path / f"{name}.bin"
               for name in ("hpa", "atftp", "curl", "curl1468", "busybox", "hpa2")}
        commands = [
            [tftp, family, "-m", "octet", host, port, "-c", "get", "random.bin", str(out["hpa"])],
            [tftp, family, "-m", "octet", host, port, "-c", "get", "random.bin", str(out["hpa2"])],
            [atftp, "--option", "blksize 1468", "--option", "windowsize 4", "-g", "-r",
             "random.bin", "-l", str(out["atftp"]), host, port],
            [curl, "-sS", "-g", "-o", str(out["curl"]), url],
            [curl, "-sS", "-g", "--tftp-blksize", "1468", "-o", str(out["curl1468"]), url],
            [busybox, "tftp", "-g", "-b", "1468", "-r", "random.bin", "-l", str(out["busybox"]),
             host, port],
        ]
        procs = [subprocess.Popen(c, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for c in commands]
        for p, c in zip(procs, commands):
            output, _ = p.communicate(timeout=CLIENT_TIMEOUT)
            assert p.returncode == 0, f"{c} exited {p.returncode}: {output!r}"
        for name, path in out.items():
            assert sha_file(path) == env.big_sha, name
        deadline = time.monotonic() + 10
        while sum("random.bin: sent " in line for line in server.lines) < 6:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert not any(" failed after " in line for line in server.lines), server.log()
    finally:
        server.stop()
