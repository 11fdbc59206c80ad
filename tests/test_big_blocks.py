"""Big block sizes end to end: files mapped and sent with sendmsg.

At blksize >= 32 KiB the server maps the file (tftpd.files.MappedSource) and
sends each block as header + mapped payload; these tests run that path through
the real server: connected and unconnected transfer sockets, windows, the
remapping every MAP_WINDOW bytes, -s tracing, and a file truncated under a
running transfer (a read error for that client, the server serves on).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tftpclient import DATA, ERROR, OACK, Peer, ack, rrq


def body(size: int, seed: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["v4", "v6"])
def host(request) -> str:
    return request.param


# sizes: 3 blocks (unconnected socket), > 32 blocks across several 2 MiB mappings
# (connected socket, Sender.pump), an exact multiple of the block size (empty last DATA)
@pytest.mark.parametrize("blksize,windowsize,size", [
    (65464, 1, 3 * 65464 - 5),
    (65464, 1, 40 * 65464 + 17),
    (32768, 4, 100 * 32768),
    (40000, 3, 77 * 40000 + 1),
])
def test_big_block_downloads_are_byte_exact(tftpd_server, tmp_path: Path, host: str,
                                            blksize: int, windowsize: int, size: int) -> None:
    root = tmp_path / "root"
    root.mkdir()
    content = body(size, blksize)
    (root / "big.bin").write_bytes(content)
    server = tftpd_server("-v", root=root, host=host)
    opts = {"blksize": str(blksize), "windowsize": str(windowsize)}
    with Peer(server.addr) as peer:
        res = peer.download("big.bin", options=opts)
    assert res.error is None and res.oack == opts
    assert res.data == content
    assert res.blocks == size // blksize + 1


def test_big_blocks_traced_with_s(tftpd_server, tmp_path: Path) -> None:
    """-s prints every datagram, a (header, payload) one like any other."""
    root = tmp_path / "root"
    root.mkdir()
    content = body(5 * 65464 + 3, 7)
    (root / "big.bin").write_bytes(content)
    server = tftpd_server("-v", "-s", root=root)
    with Peer(server.addr) as peer:
        res = peer.download("big.bin", options={"blksize": "65464"})
    assert res.error is None and res.data == content
    server.wait_for_log(r"> DATA 1 \(65464 bytes\)")
    server.wait_for_log(r"> DATA 6 \(3 bytes\)")


def test_file_truncated_during_a_big_block_transfer(tftpd_server, tmp_path: Path,
                                                    host: str) -> None:
    """The client gets ERROR 0 "Read error", the log says why, nothing crashes
    (no SIGBUS from the mapping), and the next client is served."""
    blksize = 65464
    root = tmp_path / "root"
    root.mkdir()
    path = root / "big.bin"
    content = body(60 * blksize, 1)
    path.write_bytes(content)
    server = tftpd_server("-v", "-t", "1", root=root, host=host)
    with Peer(server.addr) as peer:
        peer.send(rrq("big.bin", options={"blksize": str(blksize)}))
        _, tid = peer.expect(op=OACK)
        peer.send(ack(0), tid)
        for block in range(1, 4):
            pkt, _ = peer.expect(op=DATA)
            assert pkt.block == block
            assert pkt.payload == content[(block - 1) * blksize:block * blksize]
            if block < 3:
                peer.send(ack(block), tid)
        os.truncate(path, 4096)
        peer.send(ack(3), tid)
        pkt, _ = peer.expect(op=ERROR, timeout=10.0)
        assert pkt.code == 0 and pkt.message == "Read error"
    server.wait_for_log(r"RRQ big\.bin failed.*file shrank while being sent")
    assert server.proc.poll() is None
    path.write_bytes(content[:100_000])
    with Peer(server.addr) as peer:
        res = peer.download("big.bin", options={"blksize": str(blksize)})
    assert res.error is None and res.data == content[:100_000]


def test_a_file_kept_mapped_is_served_as_it_is_now(tftpd_server, tmp_path: Path) -> None:
    """A file stays mapped for its next download (one process: the same one
    serves both); a file replaced by a rename, or rewritten in place, is
    served new, never from what was mapped before."""
    blksize = 65464
    root = tmp_path / "root"
    root.mkdir()
    path = root / "boot.img"
    server = tftpd_server("-v", "--processes", "1", root=root)
    opts = {"blksize": str(blksize)}
    versions = [body(3 * blksize + 11, seed) for seed in (1, 2, 3)]
    path.write_bytes(versions[0])
    for _ in range(2):
        with Peer(server.addr) as peer:
            assert peer.download("boot.img", options=opts).data == versions[0]
    (root / "boot.new").write_bytes(versions[1])
    os.rename(root / "boot.new", path)                  # a new inode of the same size
    with Peer(server.addr) as peer:
        assert peer.download("boot.img", options=opts).data == versions[1]
    with open(path, "r+b") as f:                        # the same inode and size, new bytes
        f.write(versions[2])
    with Peer(server.addr) as peer:
        assert peer.download("boot.img", options=opts).data == versions[2]
