"""The ``-s`` packet trace: one debug line per datagram sent or received.

Only built when socket debugging is on (``-s``, or SIGUSR1 at run time): the
worker driver wraps its send and receive calls with a tracer, so a transfer
without ``-s`` pays nothing for it.
"""

from __future__ import annotations

from .log import DEBUG, getLogger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Sequence, Tuple, Union

    Buffer = Union[bytes, bytearray, memoryview]
    Trace = Callable[[str, Tuple[Any, ...], Sequence[Buffer]], None]

__all__ = ["describe", "tracer"]

_NAMES = {1: "RRQ", 2: "WRQ", 3: "DATA", 4: "ACK", 5: "ERROR", 6: "OACK"}

log = getLogger("tftpd")


def _text(raw: bytes, limit: int = 80) -> str:
    s = raw[:limit].decode("utf-8", "backslashreplace")
    s = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)
    return s + ("..." if len(raw) > limit else "")


def describe(buffers: Sequence[Buffer]) -> str:
    """A short text for a TFTP datagram given as one or more buffers."""
    size = sum(len(b) for b in buffers)
    head = bytes(buffers[0][:4]) if buffers else b""
    if len(head) < 4 and len(buffers) > 1:
        head = b"".join(bytes(b) for b in buffers)[:4]
    if len(head) < 2:
        return f"junk ({size} bytes)"
    opcode = int.from_bytes(head[:2], "big")
    name = _NAMES.get(opcode)
    if name is None:
        return f"opcode {opcode} ({size} bytes)"
    if opcode in (3, 4) and len(head) >= 4:
        block = int.from_bytes(head[2:4], "big")
        return f"{name} {block} ({size - 4} bytes)" if opcode == 3 else f"{name} {block}"
    whole = b"".join(bytes(b) for b in buffers)
    if opcode == 5 and len(whole) >= 4:
        code = int.from_bytes(whole[2:4], "big")
        message = whole[4:].split(b"\0", 1)[0]
        return f"ERROR {code} {_text(message)}"
    fields = whole[2:].split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if opcode in (1, 2):
        return f"{name} " + " ".join(_text(f) for f in fields)
    return f"{name} " + " ".join(f"{_text(k)}={_text(v)}"
                                 for k, v in zip(fields[0::2], fields[1::2]))


def tracer(show: Callable[[Tuple[Any, ...]], str]) -> Trace:
    """A trace function: ``trace(">", peer, buffers)`` for a datagram sent,
    ``"<"`` for one received."""
    def trace(direction: str, peer: Tuple[Any, ...], buffers: Sequence[Buffer]) -> None:
        if log.isEnabledFor(DEBUG):
            log.debug("trace %s %s %s", show(peer), direction, describe(buffers))
    return trace
