"""A scripted TFTP reader for the front-door tests: plain blocking sockets,
optional options, and a delay before each ACK (a slow client that keeps a
transfer running for as long as a test needs)."""

from __future__ import annotations

import socket
import struct
import time
from typing import Dict, Optional, Tuple


class TftpFailure(Exception):
    """The server sent ERROR, or stopped answering."""

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.code = code


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def request(opcode: int, name: str, mode: str = "octet",
            options: Optional[Dict[str, str]] = None) -> bytes:
    parts = [struct.pack("!H", opcode), name.encode(), b"\0", mode.encode(), b"\0"]
    for k, v in (options or {}).items():
        parts += [k.encode(), b"\0", v.encode(), b"\0"]
    return b"".join(parts)


def fetch(addr: Tuple[str, int], name: str, *, mode: str = "octet",
          options: Optional[Dict[str, str]] = None, ack_delay: float = 0.0,
          timeout: float = 5.0, retries: int = 5) -> bytes:
    """Read ``name``; returns the bytes.  ``ack_delay`` seconds pass before
    each ACK.  Raises TftpFailure on ERROR or silence."""
    sock = socket.socket(_family(addr[0]), socket.SOCK_DGRAM)
    try:
        return _fetch(sock, addr, name, mode, options, ack_delay, timeout, retries)
    finally:
        sock.close()


def _fetch(sock: socket.socket, addr: Tuple[str, int], name: str, mode: str,
           options: Optional[Dict[str, str]], ack_delay: float, timeout: float,
           retries: int) -> bytes:
    sock.settimeout(timeout)
    blksize = int((options or {}).get("blksize", 512))
    last = request(1, name, mode, options)
    dest = addr
    peer: Optional[Tuple] = None
    expect = 1
    out = bytearray()
    tries = 0
    sock.sendto(last, dest)
    while True:
        try:
            data, src = sock.recvfrom(65536)
        except socket.timeout:
            tries += 1
            if tries > retries:
                raise TftpFailure(f"no answer after {retries} retries (block {expect})")
            sock.sendto(last, dest)
            continue
        if peer is None:
            peer, dest = src, src
        elif src[:2] != peer[:2]:
            continue
        tries = 0
        op = struct.unpack("!H", data[:2])[0]
        if op == 5:
            code = struct.unpack("!H", data[2:4])[0]
            raise TftpFailure(data[4:].split(b"\0", 1)[0].decode("utf-8", "replace"), code)
        if op == 6:                                   # OACK
            fields = data[2:].split(b"\0")[:-1]
            acked = dict(zip(fields[0::2], fields[1::2]))
            if b"blksize" in acked:
                blksize = int(acked[b"blksize"])
            last = struct.pack("!HH", 4, 0)
            sock.sendto(last, dest)
            continue
        if op != 3:
            continue
        block = struct.unpack("!H", data[2:4])[0]
        if block == expect & 0xFFFF:
            out += data[4:]
            expect += 1
            if ack_delay:
                time.sleep(ack_delay)
            last = struct.pack("!HH", 4, block)
            sock.sendto(last, dest)
            if len(data) - 4 < blksize:
                return bytes(out)
        else:
            sock.sendto(struct.pack("!HH", 4, block), dest)   # duplicate: re-ACK
