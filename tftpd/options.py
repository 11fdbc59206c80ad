"""Option negotiation (RFC 2347, 2348, 2349, 7440 and the ``rollover`` option).

One table of option handlers, as tftp-hpa keeps it: ``-r NAME`` removes a row.
Names are matched case-insensitively; an unknown, refused, repeated or
out-of-range option is simply not acknowledged (RFC 2347), never an error.
"""

from __future__ import annotations

from .packets import Opcode
from .record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

    from .packets import Options

    Handler = Callable[["Negotiated", int, bytes, "Limits"], Optional[bytes]]

__all__ = ["Limits", "Negotiated", "negotiate", "KNOWN_OPTIONS", "parse_uint",
           "MIN_BLKSIZE", "MAX_BLKSIZE", "DEFAULT_BLKSIZE"]

MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
DEFAULT_BLKSIZE = 512
MAX_WINDOWSIZE = 65535


class Limits(Frozen):
    """What the server is prepared to negotiate."""
    __slots__ = ("max_blksize", "max_windowsize", "refused")
    max_blksize: int                # -z
    max_windowsize: int             # server cap on RFC 7440 windowsize
    refused: FrozenSet[str]         # -r NAME ...

    def __init__(self, max_blksize: int = MAX_BLKSIZE, max_windowsize: int = 64,
                 refused: FrozenSet[str] = frozenset()) -> None:
        self._init(max_blksize, max_windowsize, refused)


class Negotiated:
    """What was agreed (filled in by the option handlers)."""

    __slots__ = ("blksize", "windowsize", "timeout", "tsize", "tsize_requested",
                 "rollover", "acked")

    def __init__(self, blksize: int = DEFAULT_BLKSIZE, windowsize: int = 1,
                 timeout: Optional[float] = None, tsize: Optional[int] = None,
                 tsize_requested: bool = False, rollover: int = 0,
                 acked: Optional[List[Tuple[bytes, bytes]]] = None) -> None:
        self.blksize = blksize
        self.windowsize = windowsize
        self.timeout = timeout                  # client's fixed timeout, seconds
        self.tsize = tsize                      # WRQ: size announced by the client
        self.tsize_requested = tsize_requested  # RRQ: client asked for the size
        self.rollover = rollover                # block number after 65535
        self.acked: List[Tuple[bytes, bytes]] = [] if acked is None else acked

    def _fields(self) -> Tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:    # (so unhashable: it is mutable)
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Negotiated)
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        return "Negotiated(" + ", ".join(f"{name}={getattr(self, name)!r}"
                                         for name in self.__slots__) + ")"

    def oack(self) -> Options:
        return tuple(self.acked)


def parse_uint(value: bytes, max_digits: int = 10) -> Optional[int]:
    """A plain decimal number, or None (no sign, blanks, exponent or junk)."""
    if not value or len(value) > max_digits or not value.isdigit():
        return None
    return int(value)


def _blksize(n: Negotiated, op: int, value: bytes, lim: Limits) -> Optional[bytes]:
    v = parse_uint(value)
    if v is None or not MIN_BLKSIZE <= v <= MAX_BLKSIZE:
        return None
    n.blksize = min(v, lim.max_blksize)
    return str(n.blksize).encode()


# A size has at most 19 digits: 20 digits do not fit a 64-bit off_t, and the
# WRQ value is echoed back to a client that could not hold it either.
# tsize has no upper bound (RFC 2349): a WRQ announcing more than any disk holds
# must get ERROR 3 "before any data moves", so huge values are parsed, not ignored.
MAX_TSIZE_DIGITS = 40


def _tsize(n: Negotiated, op: int, value: bytes, lim: Limits) -> Optional[bytes]:
    v = parse_uint(value, max_digits=MAX_TSIZE_DIGITS)
    if v is None:
        if op == Opcode.WRQ and value.isdigit():
            n.tsize = 10 ** MAX_TSIZE_DIGITS   # longer still: more than any disk
            return value
        return None
    if op == Opcode.RRQ:
        n.tsize_requested = True
        return b""  # filled in with the real size by the caller
    n.tsize = v
    return value


def _timeout(n: Negotiated, op: int, value: bytes, lim: Limits) -> Optional[bytes]:
    v = parse_uint(value)
    if v is None or not 1 <= v <= 255:
        return None
    n.timeout = float(v)
    return str(v).encode()


def _windowsize(n: Negotiated, op: int, value: bytes, lim: Limits) -> Optional[bytes]:
    v = parse_uint(value)
    if v is None or not 1 <= v <= MAX_WINDOWSIZE:
        return None
    n.windowsize = min(v, lim.max_windowsize)
    return str(n.windowsize).encode()


def _rollover(n: Negotiated, op: int, value: bytes, lim: Limits) -> Optional[bytes]:
    v = parse_uint(value)
    if v not in (0, 1):
        return None
    n.rollover = v
    return str(v).encode()


HANDLERS: Dict[str, Handler] = {
    "blksize": _blksize,
    "tsize": _tsize,
    "timeout": _timeout,
    "windowsize": _windowsize,
    "rollover": _rollover,
}
KNOWN_OPTIONS = tuple(HANDLERS)


def negotiate(opcode: int, options: Options, limits: Limits,
              rrq_size: Optional[Callable[[], int]] = None) -> Negotiated:
    """Decide which options to acknowledge.

    ``rrq_size`` is called only when an RRQ asks for ``tsize``; it returns the
    number of bytes the transfer will carry (after netascii conversion).
    """
    n = Negotiated()
    if not options:
        return n
    seen = set()
    for raw_name, value in options:
        name = raw_name.decode("latin-1").lower()
        if name in seen:
            continue
        seen.add(name)
        handler = HANDLERS.get(name)
        if handler is None or name in limits.refused:
            continue
        reply = handler(n, opcode, value, limits)
        if reply is None:
            continue
        if name == "tsize" and opcode == Opcode.RRQ:
            if rrq_size is None:
                n.tsize_requested = False
                continue
            reply = str(rrq_size()).encode()
        n.acked.append((name.encode(), reply))
    return n
