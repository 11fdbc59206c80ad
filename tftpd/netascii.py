"""netascii (RFC 764 as used by RFC 1350): LF <-> CR LF, CR <-> CR NUL.

Encoding maps every byte on its own, so any chunking of the input gives the
same output.  Decoding needs one byte of state: a CR at the end of one block
whose LF or NUL starts the next.
"""

from __future__ import annotations

import os

__all__ = ["encode", "Decoder", "encoded_size"]


def encode(data: bytes) -> bytes:
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def encoded_size(fd: int, chunk: int = 1 << 20) -> int:
    """Size of the file behind ``fd`` after netascii encoding (reads it once)."""
    total = 0
    offset = 0
    while True:
        data = os.pread(fd, chunk, offset)
        if not data:
            return total
        offset += len(data)
        total += len(data) + data.count(b"\n") + data.count(b"\r")


class Decoder:
    """Stateful netascii to local text decoder.

    CR LF becomes LF, CR NUL becomes CR; a CR followed by anything else is
    kept as it is (lenient, as most servers are).
    """

    __slots__ = ("_cr",)

    def __init__(self) -> None:
        self._cr = False

    def feed(self, chunk: "bytes | memoryview") -> bytes:
        data = b"\r" + chunk if self._cr else bytes(chunk)
        if data.endswith(b"\r"):
            self._cr = True
            data = data[:-1]
        else:
            self._cr = False
        return data.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")

    def flush(self) -> bytes:
        """End of stream: a trailing lone CR is kept."""
        if self._cr:
            self._cr = False
            return b"\r"
        return b""
