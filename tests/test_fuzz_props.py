"""Fuzzing the request path: decode -> option negotiation -> admission.

Property (hypothesis): for any datagram, and above all for the ones shaped
like requests (an opcode, NUL-separated fields, options with tricky names and
values), the server's request path raises nothing but ``MalformedPacket``
(drop it) or ``TftpError`` (answer with one ERROR).  Anything else would be a
bug: the request loop would log an internal error instead of answering.
Admission runs against a real directory tree, so every plan it gives is
checked (a real path under the roots, an OACK that decodes) and then closed,
leaving no file behind.

The coverage-guided twin of these properties is tests/fuzz/fuzz_request.py
(atheris); ``test_atheris_harness_short_run`` runs it for a bounded number of
inputs.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import IN_CI, ROOT
from tftpd import paths
from tftpd.admission import Admission, RootsPolicy
from tftpd.config import Config
from tftpd.options import Limits, MAX_BLKSIZE, negotiate
from tftpd.packets import (MalformedPacket, OAck, Opcode, Request, TftpError, decode,
                           oack_packet)

FUZZ = ROOT / "tests" / "fuzz" / "fuzz_request.py"

# -- strategies ---------------------------------------------------------------------------------
NAMES = [b"small.bin", b"sub/deep.txt", b"sub", b"missing.bin", b"..", b"../outside.txt",
         b"/etc/passwd", b"/", b"//", b"./small.bin", b"a/../../outside.txt",
         b"sub/../small.bin", b"link-out", b"link-in", b"fifo", b"\\..\\x", b"%2e%2e",
         b"caf\xe9", b"\xff\xfe", b"x" * 255, b"y" * 300, b"d/" * 200, b"new.bin",
         b"sub/new.bin", b"nodir/new.bin", b"small.bin/", b"small.bin/.."]
MODES = [b"octet", b"netascii", b"OCTET", b"NetAscii", b"mail", b"binary", b"", b"octet "]
OPTION_NAMES = [b"blksize", b"BLKSIZE", b"tsize", b"timeout", b"windowsize", b"rollover",
                b"utimeout", b"multicast", b"x", b"BlkSize", b"tSize"]
VALUES = [b"0", b"1", b"7", b"8", b"512", b"1468", b"65464", b"65465", b"65536", b"255",
          b"256", b"-1", b"+1", b"1e3", b"0x10", b" 1", b"1 ", b"5.5", b"", b"abc",
          b"9" * 19, b"9" * 20, b"9" * 40, b"9" * 41, b"\xff", "\u0661".encode()]


def _field(choices: List[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(choices),
                     st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")))


options = st.lists(st.tuples(_field(OPTION_NAMES), _field(VALUES)), max_size=12)


@st.composite
def requests(draw) -> Request:
    opcode = draw(st.sampled_from([Opcode.RRQ, Opcode.WRQ]))
    name = draw(_field(NAMES).filter(bool))
    mode = draw(_field(MODES).filter(bool))
    opts = tuple((n, v) for n, v in draw(options) if n)
    return Request(opcode, name, mode, opts)


@st.composite
def request_like_datagrams(draw) -> bytes:
    """Bytes that look like a request: most are, many are subtly not."""
    opcode = draw(st.sampled_from([1, 2, 1, 2, 0, 3, 5, 6, 7, 0x0101, 0xFFFF]))
    fields = [draw(_field(NAMES)), draw(_field(MODES))]
    for n, v in draw(options):
        fields += [n, v]
    if draw(st.booleans()):
        fields = fields[:draw(st.integers(0, len(fields)))]       # cut short
    body = b"\0".join(fields)
    tail = draw(st.sampled_from([b"\0", b"", b"\0\0", b"\0\0\0", b"\0x"]))
    return opcode.to_bytes(2, "big") + body + tail


limits = st.builds(Limits,
                   max_blksize=st.integers(8, MAX_BLKSIZE),
                   max_windowsize=st.integers(1, 65535),
                   refused=st.frozensets(st.sampled_from(
                       ["blksize", "tsize", "timeout", "windowsize", "rollover"])))


# -- a file tree to admit requests against ------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Iterator[Tuple[Path, Path, Path]]:
    base = tmp_path_factory.mktemp("fuzzroot")
    root, upload = base / "root", base / "upload"
    (root / "sub").mkdir(parents=True)
    upload.mkdir()
    (base / "outside.txt").write_bytes(b"outside\n")
    for p, content in [(root / "small.bin", b"x" * 1500), (root / "sub" / "deep.txt", b"a\nb\r")]:
        p.write_bytes(content)
        p.chmod(0o644)
    os.symlink(base / "outside.txt", root / "link-out")
    os.symlink(root / "small.bin", root / "link-in")
    os.mkfifo(root / "fifo")
    yield base, root, upload


def snapshot(*dirs: Path) -> List[Tuple[str, int]]:
    out = []
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                out.append((p, os.lstat(p).st_size))
    return sorted(out)


def admission(root: Path, upload: Path, lim: Limits = Limits()) -> Admission:
    config = Config(root=str(root), write_dir=str(upload), allow_write=True,
                    max_blksize=lim.max_blksize, max_windowsize=lim.max_windowsize,
                    refused=lim.refused)
    return Admission(config, RootsPolicy([str(root), str(upload)]))


def check_admit(adm: Admission, req: Request, roots: List[Path]) -> None:
    """Admit: a plan (checked, then closed) or a TftpError; nothing else."""
    try:
        plan = adm.admit(req)
    except TftpError as e:
        assert 0 <= e.code <= 8 and e.packet()[:2] == b"\x00\x05"
        return
    try:
        assert any(paths.within(plan.path, os.path.realpath(r)) for r in roots), plan.path
        assert plan.path == os.path.realpath(plan.path)
        n = plan.negotiated
        assert 8 <= n.blksize <= MAX_BLKSIZE and 1 <= n.windowsize <= 65535
        if plan.oack is not None:
            back = decode(plan.oack)
            assert isinstance(back, OAck) and back.options == n.oack()
        if req.opcode == Opcode.RRQ:
            assert plan.source is not None and os.path.isfile(plan.path)
        else:
            assert plan.sink is not None
    finally:
        plan.close()


# -- properties ----------------------------------------------------------------------------------
FUZZ_SETTINGS = settings(max_examples=400, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.function_scoped_fixture])


@FUZZ_SETTINGS
@given(st.one_of(request_like_datagrams(), st.binary(max_size=600)))
def test_decode_raises_only_malformed_packet(datagram: bytes) -> None:
    try:
        decode(datagram)
    except MalformedPacket:
        pass


@FUZZ_SETTINGS
@given(st.sampled_from([Opcode.RRQ, Opcode.WRQ]), options, limits,
       st.integers(0, 10 ** 12))
def test_negotiation_never_raises_and_acks_within_limits(opcode: Opcode, opts, lim: Limits,
                                                        size: int) -> None:
    opts = tuple((n, v) for n, v in opts if n)
    n = negotiate(opcode, opts, lim, rrq_size=lambda: size)
    names = [k.decode("latin-1") for k, _ in n.acked]
    assert len(names) == len(set(names)), "an option acknowledged twice"
    assert not set(names) & lim.refused
    assert 8 <= n.blksize <= lim.max_blksize or n.blksize == 512
    assert n.windowsize <= max(1, lim.max_windowsize)
    for k, v in n.acked:
        if k == b"blksize":
            assert v == str(n.blksize).encode() and int(v) <= lim.max_blksize
        if k == b"tsize" and opcode == Opcode.RRQ:
            assert v == str(size).encode()
    # what the server would send decodes back to what it decided
    if n.acked:
        assert decode(oack_packet(n.oack())) == OAck(n.oack())


@FUZZ_SETTINGS
@given(requests(), limits)
def test_admission_gives_a_plan_or_a_tftp_error(tree, req: Request, lim: Limits) -> None:
    base, root, upload = tree
    before = snapshot(base)
    check_admit(admission(root, upload, lim), req, [root, upload])
    assert snapshot(base) == before, "admission left something behind"


@FUZZ_SETTINGS
@given(request_like_datagrams())
def test_request_path_raises_only_malformed_or_tftp_error(tree, datagram: bytes) -> None:
    """What the request loop does with a datagram, minus the sockets."""
    base, root, upload = tree
    try:
        packet = decode(datagram)
    except MalformedPacket:
        return
    if isinstance(packet, Request):
        before = snapshot(base)
        check_admit(admission(root, upload), packet, [root, upload])
        assert snapshot(base) == before


# -- the atheris harness, for a bounded run ---------------------------------------------------------
def test_atheris_harness_short_run(tmp_path: Path) -> None:
    import importlib.util
    if importlib.util.find_spec("atheris") is None:
        message = "atheris is not installed (tools/setup-tests installs it with the test extras)"
        if IN_CI and platform.machine() == "x86_64":     # setup.py asks for it there
            pytest.fail(message)
        pytest.skip(message)
    env = dict(os.environ, TFTPD_FUZZ_TMP=str(tmp_path))
    proc = subprocess.run([sys.executable, str(FUZZ), "-runs=20000", "-max_total_time=60",
                           "-seed=1"], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=180, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Done 20000 runs" in out, out[-2000:]
    assert not list(tmp_path.glob("crash-*")), out[-2000:]
