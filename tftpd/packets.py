"""TFTP packet codec (RFC 1350, RFC 2347).

Pure functions over bytes: ``decode()`` turns a datagram into one of the frozen
packet classes or raises :class:`MalformedPacket`; ``encode()`` does the
reverse.  File names, modes and options stay ``bytes``: a file name on the wire
is not necessarily UTF-8, and the server must judge exactly what it was sent.

The transfer engine does not use these classes on its per-block path; it
reads ACK/DATA headers straight from its receive buffer (see ``transfer.py``).
"""

from __future__ import annotations

import struct

from .record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Tuple, Union

    Options = Tuple[Tuple[bytes, bytes], ...]
    Packet = Union["Request", "Data", "Ack", "Error", "OAck"]

__all__ = [
    "Opcode", "ErrorCode", "MalformedPacket", "TftpError",
    "Request", "Data", "Ack", "Error", "OAck",
    "decode", "encode", "data_header", "ack_packet", "error_packet", "oack_packet",
]


# Plain ints, not enum.IntEnum: with socket.py and signal.py (see server.py)
# the enum module costs every inetd start over 1 ms.
class Opcode:
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode:
    UNDEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


class MalformedPacket(ValueError):
    """The bytes are not a well-formed TFTP packet."""


class TftpError(Exception):
    """A refusal that becomes an ERROR packet for the peer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = int(code)
        self.message = message

    def packet(self) -> bytes:
        return error_packet(self.code, self.message)


class Request(Frozen):
    """RRQ or WRQ. ``options`` keeps the client's order and spelling."""
    __slots__ = ("opcode", "filename", "mode", "options")
    opcode: int      # Opcode.RRQ or Opcode.WRQ
    filename: bytes
    mode: bytes
    options: Options

    def __init__(self, opcode: int, filename: bytes, mode: bytes,
                 options: Options = ()) -> None:
        # one per request: the fields set directly, not by _init's loop
        _set(self, "opcode", opcode)
        _set(self, "filename", filename)
        _set(self, "mode", mode)
        _set(self, "options", options)


class Data(Frozen):
    __slots__ = ("block", "payload")
    block: int
    payload: bytes

    def __init__(self, block: int, payload: bytes) -> None:
        self._init(block, payload)


class Ack(Frozen):
    __slots__ = ("block",)
    block: int

    def __init__(self, block: int) -> None:
        self._init(block)


class Error(Frozen):
    __slots__ = ("code", "message")
    code: int
    message: bytes

    def __init__(self, code: int, message: bytes) -> None:
        self._init(code, message)


class OAck(Frozen):
    __slots__ = ("options",)
    options: Options

    def __init__(self, options: Options) -> None:
        self._init(options)


_HDR = struct.Struct("!HH")
_OP = struct.Struct("!H")
_set = object.__setattr__      # (Request sets its fields directly)


def _strings(body: bytes) -> List[bytes]:
    """Split NUL-terminated strings; the body must end with a NUL."""
    if not body.endswith(b"\0"):
        raise MalformedPacket("string not terminated by NUL")
    return body[:-1].split(b"\0")


def _pairs(fields: List[bytes]) -> Options:
    if len(fields) % 2:
        raise MalformedPacket("option without a value")
    it = iter(fields)
    pairs = tuple(zip(it, it))
    for name, _value in pairs:
        if not name:
            raise MalformedPacket("empty option name")
    return pairs


_REQUEST_OPS = (Opcode.RRQ, Opcode.WRQ)


def decode(datagram: bytes) -> Packet:
    """Decode one datagram; raise MalformedPacket for anything else."""
    data = bytes(datagram)
    if len(data) < 2:
        raise MalformedPacket("datagram shorter than an opcode")
    (op,) = _OP.unpack_from(data)
    body = data[2:]
    if op in _REQUEST_OPS:
        fields = _strings(body)
        padded = len(fields)
        while len(fields) > 2 and not fields[-1]:
            fields.pop()       # NUL padding after the last field (some boot ROMs)
        if len(fields) < padded and len(fields) % 2:
            fields.append(b"")  # ...but the last option's value was empty
        if len(fields) < 2:
            raise MalformedPacket("request without a mode")
        filename, mode = fields[0], fields[1]
        if not filename:
            raise MalformedPacket("empty file name")
        if not mode:
            raise MalformedPacket("empty mode")
        return Request(op, filename, mode,
                       _pairs(fields[2:]) if len(fields) > 2 else ())
    if op == Opcode.DATA:
        if len(data) < 4:
            raise MalformedPacket("DATA shorter than its header")
        return Data(_HDR.unpack_from(data)[1], data[4:])
    if op == Opcode.ACK:
        if len(data) != 4:
            raise MalformedPacket("ACK is not 4 bytes")
        return Ack(_HDR.unpack_from(data)[1])
    if op == Opcode.ERROR:
        if len(data) < 5:
            raise MalformedPacket("ERROR shorter than its header")
        code = _HDR.unpack_from(data)[1]
        rest = data[4:]
        if not rest.endswith(b"\0") or b"\0" in rest[:-1]:
            raise MalformedPacket("ERROR message not one NUL-terminated string")
        return Error(code, rest[:-1])
    if op == Opcode.OACK:
        if not body:
            return OAck(())
        return OAck(_pairs(_strings(body)))
    raise MalformedPacket(f"unknown opcode {op}")


def _check_string(s: bytes, what: str) -> bytes:
    if b"\0" in s:
        raise ValueError(f"{what} contains NUL")
    return s


def _check_u16(n: int, what: str) -> int:
    if not 0 <= n <= 0xFFFF:
        raise ValueError(f"{what} {n} does not fit in 16 bits")
    return n


def encode(packet: Packet) -> bytes:
    if isinstance(packet, Request):
        if not packet.filename or not packet.mode:
            raise ValueError("request needs a file name and a mode")
        parts = [packet.filename, packet.mode]
        for name, value in packet.options:
            if not name:
                raise ValueError("empty option name")
            parts += [name, value]
        return _OP.pack(packet.opcode) + b"".join(
            _check_string(p, "request field") + b"\0" for p in parts)
    if isinstance(packet, Data):
        return _HDR.pack(Opcode.DATA, _check_u16(packet.block, "block")) + packet.payload
    if isinstance(packet, Ack):
        return _HDR.pack(Opcode.ACK, _check_u16(packet.block, "block"))
    if isinstance(packet, Error):
        return (_HDR.pack(Opcode.ERROR, _check_u16(packet.code, "error code"))
                + _check_string(packet.message, "error message") + b"\0")
    if isinstance(packet, OAck):
        return oack_packet(packet.options)
    raise TypeError(f"not a packet: {packet!r}")


def oack_packet(options: Options) -> bytes:
    out = [_OP.pack(Opcode.OACK)]
    for name, value in options:
        if not name:
            raise ValueError("empty option name")
        out += [_check_string(name, "option"), b"\0",
                _check_string(value, "option value"), b"\0"]
    return b"".join(out)


def data_header(block: int) -> bytes:
    return _HDR.pack(Opcode.DATA, block)


def ack_packet(block: int) -> bytes:
    return _HDR.pack(Opcode.ACK, block)


def error_packet(code: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace").replace(b"\0", b" ")
    return _HDR.pack(Opcode.ERROR, code) + text + b"\0"
