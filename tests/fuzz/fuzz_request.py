#!/usr/bin/env python3
"""Coverage-guided fuzzing of the request path with atheris (libFuzzer).

Each input is turned into a datagram (raw, or a request assembled from
fuzzer-chosen fields), decoded, negotiated under fuzzer-chosen limits and
admitted against a small file tree made at start-up (files, a subdirectory,
symlinks into and out of the root, a FIFO).  The only exceptions allowed are
``MalformedPacket`` (the datagram is dropped) and ``TftpError`` (one ERROR is
sent); anything else is a crash, saved by libFuzzer as ``crash-*``.

Run by hand, from any directory::

    python tests/fuzz/fuzz_request.py -runs=100000
    python tests/fuzz/fuzz_request.py -max_total_time=600 corpus/

tests/test_fuzz_props.py runs it for 20,000 inputs.  The tree lives in
$TFTPD_FUZZ_TMP (default: the temporary directory) as tftpd-fuzz-PID-*; a run
removes the trees that earlier, finished runs left there.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

with atheris.instrument_imports():
    from tftpd.admission import Admission, RootsPolicy
    from tftpd.config import Config
    from tftpd.options import MAX_BLKSIZE, negotiate
    from tftpd.packets import MalformedPacket, Opcode, Request, TftpError, decode, oack_packet

NAMES = [b"small.bin", b"sub/deep.txt", b"sub", b"..", b"../outside.txt", b"/etc/passwd",
         b"link-out", b"link-in", b"fifo", b"new.bin", b"sub/new.bin", b"a/../../x"]
OPTIONS = [b"blksize", b"tsize", b"timeout", b"windowsize", b"rollover", b"utimeout"]
KNOWN = ["blksize", "tsize", "timeout", "windowsize", "rollover"]


def _remove_stale_trees(parent: str) -> None:
    """libFuzzer ends the process with C exit(), so atexit may not run: remove
    the trees of earlier runs whose process is gone (tftpd-fuzz-PID-*)."""
    for name in os.listdir(parent):
        parts = name.split("-")
        if len(parts) < 4 or parts[:2] != ["tftpd", "fuzz"] or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except OSError:
            pass


def make_tree() -> str:
    parent = os.environ.get("TFTPD_FUZZ_TMP") or tempfile.gettempdir()
    _remove_stale_trees(parent)
    base = tempfile.mkdtemp(prefix=f"tftpd-fuzz-{os.getpid()}-", dir=parent)
    atexit.register(shutil.rmtree, base, True)
    root = os.path.join(base, "root")
    os.makedirs(os.path.join(root, "sub"))
    os.makedirs(os.path.join(base, "upload"))
    with open(os.path.join(base, "outside.txt"), "wb") as f:
        f.write(b"outside\n")
    for rel, content in (("small.bin", b"x" * 1500), ("sub/deep.txt", b"a\nb\r\n")):
        path = os.path.join(root, rel)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o644)
    os.symlink(os.path.join(base, "outside.txt"), os.path.join(root, "link-out"))
    os.symlink(os.path.join(root, "small.bin"), os.path.join(root, "link-in"))
    os.mkfifo(os.path.join(root, "fifo"))
    return base


BASE = make_tree()
ROOT = os.path.join(BASE, "root")
UPLOAD = os.path.join(BASE, "upload")
POLICY = RootsPolicy([ROOT, UPLOAD])


def field(fdp: "atheris.FuzzedDataProvider", choices: list) -> bytes:
    if fdp.ConsumeIntInRange(0, 3):
        return choices[fdp.ConsumeIntInRange(0, len(choices) - 1)]
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)).replace(b"\0", b"")


OPCODES = [1, 2, 1, 2, 1, 2, 1, 2, 0, 3, 4, 5, 6, 7, 9, 0xFFFF]


def datagram(fdp: "atheris.FuzzedDataProvider") -> bytes:
    """Mostly request-shaped bytes (random bytes rarely decode as a request)."""
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 700))
    opcode = OPCODES[fdp.ConsumeIntInRange(0, len(OPCODES) - 1)]
    parts = [field(fdp, NAMES), field(fdp, [b"octet", b"netascii", b"OCTET", b"mail"])]
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        parts += [field(fdp, OPTIONS), fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 45))]
    return opcode.to_bytes(2, "big") + b"\0".join(parts) + b"\0" * fdp.ConsumeIntInRange(0, 3)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    blksize_cap = fdp.ConsumeIntInRange(8, MAX_BLKSIZE)
    window_cap = fdp.ConsumeIntInRange(1, 65535)
    refused = frozenset(k for k in KNOWN if fdp.ConsumeBool())
    wire = datagram(fdp)
    try:
        packet = decode(wire)
    except MalformedPacket:
        return
    if not isinstance(packet, Request):
        return
    config = Config(root=ROOT, write_dir=UPLOAD, allow_write=True, max_blksize=blksize_cap,
                    max_windowsize=window_cap, refused=refused)
    n = negotiate(packet.opcode, packet.options, config.limits, rrq_size=lambda: 1500)
    if n.acked:
        oack_packet(n.oack())
    try:
        plan = Admission(config, POLICY).admit(packet)
    except TftpError:
        return
    try:
        if not (plan.path.startswith(ROOT + "/") or plan.path.startswith(UPLOAD + "/")):
            raise AssertionError(f"admitted outside the roots: {plan.path!r}")
        if plan.opcode == Opcode.RRQ and plan.source is None:
            raise AssertionError("an RRQ plan without a source")
    finally:
        plan.close()


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
