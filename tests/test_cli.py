"""The command line, run as ``python -m tftpd ...`` subprocesses.

Every AIX flag in its getopt forms (combined, attached, separate); every bad
value gives one line naming the flag and the value, then the usage, exit 2;
--help and --version; no -p on something that is not a datagram socket; a
busy port.
"""

from __future__ import annotations

import getopt
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT, ServerProcess, launch
from tftpd import cli
from tftpclient import Peer

AIX_FLAGS = ["-c", "-n", "-p", "-r", "-t", "-x", "-z", "-v", "-i", "-s", "-d"]


def tftpd(*args: str, stdin=subprocess.DEVNULL, timeout: float = 20.0
          ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tftpd", *args], cwd=str(ROOT),
                          stdin=stdin, capture_output=True, text=True, timeout=timeout)


def hermetic(tmp_path: Path) -> List[str]:
    return ["--access-file", str(tmp_path / "no-tftpaccess.ctl"), "--user", "root"]


def start(args: List[str], timeout: float = 15.0) -> ServerProcess:
    """Start ``python -m tftpd ARGS`` and wait for its "listening on" line."""
    return launch(args, timeout=timeout)


# -- --help and --version ---------------------------------------------------------
def test_help() -> None:
    r = tftpd("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: tftpd")
    for flag in AIX_FLAGS + ["--root", "--address", "--idle-timeout", "--user",
                             "--access-file", "--help", "--version"]:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", r.stdout), flag
    assert r.stderr == ""


def test_version() -> None:
    r = tftpd("--version")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"tftpd \d+\.\d+(\.\d+)?\S*\n", r.stdout), r.stdout


# -- bad values ------------------------------------------------------------------
BAD = [
    # (arguments, text the message must name: flag, value)
    (["-c", "abc"], ["-c", "abc"]),
    (["-c", "-1"], ["-c", "-1"]),
    (["-c", "0"], ["-c", "0"]),
    (["-cabc"], ["-c", "abc"]),
    (["-p", "70000"], ["-p", "70000"]),
    (["-p", "-1"], ["-p", "-1"]),
    (["-p", "x69"], ["-p", "x69"]),
    (["-t", "0"], ["-t", "0"]),
    (["-t", "abc"], ["-t", "abc"]),
    (["-t", "nan"], ["-t", "nan"]),
    (["-t", "-1"], ["-t", "-1"]),
    (["-x", "0"], ["-x", "0"]),
    (["-x", "many"], ["-x", "many"]),
    (["-z", "7"], ["-z", "7"]),
    (["-z", "65465"], ["-z", "65465"]),
    (["-r", "bogus"], ["-r", "bogus"]),
    (["-rbogus"], ["-r", "bogus"]),
    (["-d", "/nonexistent"], ["-d", "/nonexistent"]),
    (["--root", "/nonexistent"], ["--root", "/nonexistent"]),
    (["--root=/nonexistent"], ["--root", "/nonexistent"]),
    (["--idle-timeout", "-1"], ["--idle-timeout", "-1"]),
    (["--idle-timeout", "soon"], ["--idle-timeout", "soon"]),
    (["--address", "bogus"], ["--address", "bogus"]),
    (["--address", "300.1.1.1"], ["--address", "300.1.1.1"]),
    (["-q"], ["-q"]),
    (["-nq"], ["-q"]),
    (["--bogus"], ["--bogus"]),
    (["--bogus=1"], ["--bogus"]),
    (["extra"], ["extra"]),
    (["-n", "extra"], ["extra"]),
    (["-c"], ["-c"]),
    (["--root"], ["--root"]),
    (["--help=yes"], ["--help"]),
    (["-r", "a\nb"], ["-r", "a\\nb"]),
]


@pytest.mark.parametrize("args,named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_one_line_usage_exit_2(tmp_path: Path, args: List[str],
                                         named: List[str]) -> None:
    root = [] if any(a.startswith("--root") for a in args) else ["--root", str(tmp_path)]
    r = tftpd(*root, *hermetic(tmp_path), *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    message, usage = lines
    assert message.startswith("tftpd: ")
    for text in named:
        assert text in message, f"{text!r} not named in {message!r}"
    assert usage.startswith("usage: tftpd")
    assert r.stdout == ""


def test_unknown_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("--user is looked up only when started as root")
    r = tftpd("--root", str(tmp_path), "-p", "0", "--address", "127.0.0.1",
              "--user", "no-such-user-tftpd")
    assert r.returncode == 2
    assert "--user" in r.stderr.splitlines()[0]
    assert "no-such-user-tftpd" in r.stderr.splitlines()[0]


# -- the parser is getopt's ------------------------------------------------------
# tftpd parses with its own getopt (the module costs an inetd start 2 ms): it
# must split every command line as getopt.getopt does, and fail where it fails.
SHORTOPTS = "".join(f.short + (":" if f.metavar else "") for f in cli.FLAGS if f.short)
LONGOPTS = [f.long + ("=" if f.metavar else "") for f in cli.FLAGS if f.long]
TOKENS = ["-n", "-v", "-nv", "-c", "-c10", "-nc", "-nc5", "-x", "-q", "-nq", "-:", "-", "--",
          "--root", "--root=/r", "--root=", "--ro", "--r", "--he", "--help", "--help=1",
          "--check", "--ch", "--bogus", "--bogus=1", "--=x", "--x", "--queue", "--d",
          "--daemon", "--pidfile=f", "--idle", "--user", "10", "", "extra", "-r", "tsize"]


def expected_message(e: getopt.GetoptError) -> str:
    name = ("--" if e.msg.startswith("option --") else "-") + e.opt
    if "requires argument" in e.msg:
        return f"{name}: missing value"
    if "must not have an argument" in e.msg:
        return f"{name}: takes no value"
    if "not a unique prefix" in e.msg:
        return f"{name}: ambiguous option"
    return f"{name}: unknown option"


def same_as_getopt(argv: List[str]) -> None:
    try:
        want = getopt.getopt(argv, SHORTOPTS, LONGOPTS)
    except getopt.GetoptError as e:
        with pytest.raises(cli.UsageError) as got:
            cli.getopt(argv)
        assert str(got.value) == expected_message(e)
    else:
        assert cli.getopt(argv) == want


@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=6)), max_size=8))
def test_own_getopt_splits_as_getopt_does(argv: List[str]) -> None:
    same_as_getopt(argv)


@pytest.mark.parametrize("argv", [["--root"], ["--ro", "x"], ["--help=yes"], ["--r"],
                                  ["-c"], ["-nq"], ["--", "-n"], ["-", "-n"], ["--=x"],
                                  ["-nvc", "3", "x"], ["--idle", "5", "--check", "a", "-n"]])
def test_own_getopt_examples(argv: List[str]) -> None:
    same_as_getopt(argv)


# -- flags that parse --------------------------------------------------------------
FORMS = [
    ["-nv", "-c10"],
    ["-n", "-v", "-c", "10"],
    ["-vn", "-c", "10", "-t", "0.5", "-x3", "-z", "1024"],
    ["-nvisc3", "-x", "4"],
    ["-c10", "-t2", "-x6", "-z8192", "-rtsize", "-r", "timeout", "-r", "BLKSIZE"],
    ["-i", "-s", "-d", "{upload}", "-n"],
    ["-d{upload}", "-nvi"],
    ["--idle-timeout", "0", "--max-windowsize", "16", "--queue", "10", "-n"],
    ["--root={root}", "--address=127.0.0.1", "-p0"],
]


@pytest.mark.parametrize("form", FORMS, ids=[" ".join(f) for f in FORMS])
def test_flag_forms_start_a_server(tmp_path: Path, form: List[str]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    upload = tmp_path / "upload"
    upload.mkdir()
    args = [a.format(root=root, upload=upload) for a in form]
    base = ["-p", "0", "--address", "127.0.0.1", "--root", str(root)]
    server = start(base + hermetic(tmp_path) + args)
    try:
        assert server.proc.poll() is None
    finally:
        assert server.stop() == 0


def test_combined_flags_take_effect(tmp_path: Path) -> None:
    """-nv -z1024 -rtsize -d DIR: writes allowed into DIR, blksize capped,
    tsize not negotiated, transfers logged."""
    root = tmp_path / "root"
    root.mkdir()
    upload = tmp_path / "upload"
    upload.mkdir()
    (root / "f.bin").write_bytes(b"z" * 3000)
    (root / "f.bin").chmod(0o644)
    server = start(["-p0", "--address", "127.0.0.1", "--root", str(root)] + hermetic(tmp_path)
                   + ["-nv", "-z1024", "-rtsize", f"-d{upload}", "-c", "2"])
    try:
        with Peer(server.addr) as peer:
            res = peer.download("f.bin", options={"blksize": "4096", "tsize": "0"})
        assert res.error is None and res.oack == {"blksize": "1024"}
        assert res.data == b"z" * 3000
        with Peer(server.addr) as peer:
            res = peer.upload("new.bin", b"written")
        assert res.error is None
        assert (upload / "new.bin").read_bytes() == b"written"
        assert not (root / "new.bin").exists()
        server.wait_for_log(r"RRQ from 127\.0\.0\.1:\d+ ")
    finally:
        assert server.stop() == 0


def test_address_v6_and_port_flag(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    server = start(["-p", "0", "--address", "::1", "--root", str(root)] + hermetic(tmp_path))
    try:
        assert re.search(r"listening on \[::1\]:\d+", server.log()), server.log()
        with Peer(("::1", server.port)) as peer:
            res = peer.download("missing")
        assert res.error is not None and res.error.code == 1
    finally:
        assert server.stop() == 0


# -- the front door ----------------------------------------------------------------
def _not_a_socket(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "-p" in lines[0] and lines[0].startswith("tftpd: ")


def test_no_p_with_devnull_stdin(tmp_path: Path) -> None:
    _not_a_socket(tftpd("--root", str(tmp_path), *hermetic(tmp_path),
                        stdin=subprocess.DEVNULL))


def test_no_p_with_pipe_stdin(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        _not_a_socket(tftpd("--root", str(tmp_path), *hermetic(tmp_path), stdin=r))
    finally:
        os.close(r)
        os.close(w)


def test_no_p_with_stream_socket_stdin(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _not_a_socket(tftpd("--root", str(tmp_path), *hermetic(tmp_path), stdin=a.fileno()))
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", None], ids=["v4", "v6", "default"])
def test_bind_failure_on_busy_port(tmp_path: Path, address: Optional[str]) -> None:
    family = socket.AF_INET6 if address and ":" in address else socket.AF_INET
    busy = socket.socket(family, socket.SOCK_DGRAM)
    try:
        busy.bind((address or "127.0.0.1", 0))
        port = busy.getsockname()[1]
        where = ["--address", address] if address else []
        r = tftpd("-p", str(port), *where, "--root", str(tmp_path), *hermetic(tmp_path),
                  timeout=15)
    finally:
        busy.close()
    if address is None and r.returncode == 0:
        pytest.fail("started although the port was in use")
    assert r.returncode != 0
    assert str(port) in r.stderr and "tftpd:" in r.stderr
    assert re.search(r"in use|cannot bind", r.stderr, re.I), r.stderr


def test_no_p_and_no_root_at_a_terminal_says_use_p(tmp_path: Path) -> None:
    """``tftpd`` typed by hand: the first thing to hear is -p, even when the
    default read root /tftpboot does not exist."""
    _not_a_socket(tftpd(*hermetic(tmp_path), stdin=subprocess.DEVNULL))


def test_missing_default_root_standalone(tmp_path: Path) -> None:
    if os.path.isdir("/tftpboot"):
        pytest.skip("/tftpboot exists here")
    r = tftpd("-p", "0", "--address", "127.0.0.1", *hermetic(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and "--root" in lines[0] and "/tftpboot" in lines[0]
    assert lines[1].startswith("usage: tftpd")


def test_missing_default_root_inetd(tmp_path: Path) -> None:
    """inetd mode (a UDP socket as stdin) without /tftpboot: exit 2, said on stderr."""
    if os.path.isdir("/tftpboot"):
        pytest.skip("/tftpboot exists here")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 0))
        r = tftpd(*hermetic(tmp_path), stdin=s.fileno())
    finally:
        s.close()
    assert r.returncode == 2, r.stderr
    assert "--root" in r.stderr and "/tftpboot" in r.stderr



def test_reread_is_a_flag(tmp_path: Path) -> None:
    assert cli.parse_args(["-p", "0", "--root", str(tmp_path), "--reread"]).config.reread is True
    assert cli.parse_args(["-p", "0", "--root", str(tmp_path)]).config.reread is False
    res = tftpd("--reread=yes", "-p", "0")
    assert res.returncode == 2 and "--reread: takes no value" in res.stderr
