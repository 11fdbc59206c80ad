"""The packet codec: exact bytes, round trips, and one exception for junk."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd.packets import (
    Ack, Data, Error, ErrorCode, MalformedPacket, OAck, Opcode, Request, TftpError,
    ack_packet, data_header, decode, encode, error_packet, oack_packet,
)

# --------------------------------------------------------------------------- exact bytes

ENCODED = [
    (Request(Opcode.RRQ, b"pxelinux.0", b"octet"), b"\x00\x01pxelinux.0\x00octet\x00"),
    (Request(Opcode.WRQ, b"/tftpboot/a.info", b"NetASCII"),
     b"\x00\x02/tftpboot/a.info\x00NetASCII\x00"),
    (Request(Opcode.RRQ, b"f", b"octet", ((b"tsize", b"0"), (b"BLKSIZE", b"1428"))),
     b"\x00\x01f\x00octet\x00tsize\x000\x00BLKSIZE\x001428\x00"),
    (Request(Opcode.RRQ, b"f", b"octet", ((b"x", b""),)), b"\x00\x01f\x00octet\x00x\x00\x00"),
    (Request(Opcode.RRQ, b"\xff\xfe\x80", b"octet"), b"\x00\x01\xff\xfe\x80\x00octet\x00"),
    (Data(1, b"hello"), b"\x00\x03\x00\x01hello"),
    (Data(65535, b""), b"\x00\x03\xff\xff"),
    (Data(0, b"\x00" * 3), b"\x00\x03\x00\x00\x00\x00\x00"),
    (Ack(0), b"\x00\x04\x00\x00"),
    (Ack(258), b"\x00\x04\x01\x02"),
    (Error(1, b"File not found"), b"\x00\x05\x00\x01File not found\x00"),
    (Error(0, b""), b"\x00\x05\x00\x00\x00"),
    (Error(65535, b"x"), b"\x00\x05\xff\xffx\x00"),
    (OAck(()), b"\x00\x06"),
    (OAck(((b"blksize", b"1428"), (b"tsize", b"12345"))),
     b"\x00\x06blksize\x001428\x00tsize\x0012345\x00"),
]


@pytest.mark.parametrize("packet,wire", ENCODED)
def test_encode_exact_bytes(packet: object, wire: bytes) -> None:
    assert encode(packet) == wire          # type: ignore[arg-type]


@pytest.mark.parametrize("packet,wire", ENCODED)
def test_decode_exact_bytes(packet: object, wire: bytes) -> None:
    got = decode(wire)
    assert got == packet and type(got) is type(packet)
    assert decode(memoryview(wire)) == packet
    assert decode(bytearray(wire)) == packet


def test_request_opcode_is_the_enum() -> None:
    req = decode(b"\x00\x02f\x00octet\x00")
    assert isinstance(req, Request) and req.opcode == Opcode.WRQ


def test_wire_values() -> None:
    assert [Opcode.RRQ, Opcode.WRQ, Opcode.DATA, Opcode.ACK, Opcode.ERROR,
            Opcode.OACK] == [1, 2, 3, 4, 5, 6]
    assert [ErrorCode.UNDEFINED, ErrorCode.FILE_NOT_FOUND, ErrorCode.ACCESS_VIOLATION,
            ErrorCode.DISK_FULL, ErrorCode.ILLEGAL_OPERATION, ErrorCode.UNKNOWN_TID,
            ErrorCode.FILE_EXISTS, ErrorCode.NO_SUCH_USER,
            ErrorCode.OPTION_REFUSED] == list(range(9))


def test_helpers_exact_bytes() -> None:
    assert data_header(513) == b"\x00\x03\x02\x01"
    assert ack_packet(65535) == b"\x00\x04\xff\xff"
    assert error_packet(ErrorCode.DISK_FULL, "Disk full") == b"\x00\x05\x00\x03Disk full\x00"
    assert error_packet(2, "a\0b é") == b"\x00\x05\x00\x02a b \xc3\xa9\x00"
    assert oack_packet(((b"tsize", b"7"),)) == b"\x00\x06tsize\x007\x00"
    assert oack_packet(()) == b"\x00\x06"


def test_tftp_error_carries_code_and_packet() -> None:
    e = TftpError(ErrorCode.FILE_NOT_FOUND, "File not found")
    assert e.code == ErrorCode.FILE_NOT_FOUND and e.message == "File not found"
    assert e.packet() == b"\x00\x05\x00\x01File not found\x00"
    assert TftpError(6, "exists").code is ErrorCode.FILE_EXISTS   # type: ignore[arg-type]
    assert decode(e.packet()) == Error(1, b"File not found")


# --------------------------------------------------------------------------- malformed

MALFORMED = [
    b"", b"\x00", b"\x01",
    b"\x00\x00", b"\x00\x07", b"\xff\xff\x00\x00", b"\x00\x00\x00\x04\x00\x00",
    # requests
    b"\x00\x01", b"\x00\x01\x00", b"\x00\x01file", b"\x00\x01file\x00",
    b"\x00\x01file\x00octet", b"\x00\x01\x00octet\x00", b"\x00\x01file\x00\x00",
    b"\x00\x01file\x00octet\x00blksize\x00",
    b"\x00\x01file\x00octet\x00\x00512\x00", b"\x00\x01file\x00octet\x00blksize\x00512",
    b"\x00\x02file\x00octet\x00tsize",
    # data and ack
    b"\x00\x03", b"\x00\x03\x00", b"\x00\x04", b"\x00\x04\x00", b"\x00\x04\x00\x01\x00",
    # error
    b"\x00\x05", b"\x00\x05\x00", b"\x00\x05\x00\x01", b"\x00\x05\x00\x01message",
    b"\x00\x05\x00\x01a\x00b\x00", b"\x00\x05\x00\x01\x00\x00",
    # oack
    b"\x00\x06\x00", b"\x00\x06blksize", b"\x00\x06blksize\x00", b"\x00\x06blksize\x00512",
    b"\x00\x06\x00512\x00",
]


@pytest.mark.parametrize("wire", MALFORMED)
def test_malformed_raises_malformed_packet(wire: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode(wire)


def test_malformed_packet_is_a_value_error() -> None:
    assert issubclass(MalformedPacket, ValueError)


@pytest.mark.parametrize("bad", [
    Request(Opcode.RRQ, b"", b"octet"),
    Request(Opcode.RRQ, b"f", b""),
    Request(Opcode.RRQ, b"a\0b", b"octet"),
    Request(Opcode.RRQ, b"f", b"oc\0tet"),
    Request(Opcode.RRQ, b"f", b"octet", ((b"", b"1"),)),
    Request(Opcode.RRQ, b"f", b"octet", ((b"a\0", b"1"),)),
    Request(Opcode.RRQ, b"f", b"octet", ((b"a", b"1\0"),)),
    Error(1, b"a\0b"),
    Error(65536, b"x"),
    Error(-1, b"x"),
    Data(65536, b""),
    Data(-1, b""),
    Ack(65536),
    Ack(-1),
    OAck(((b"", b"1"),)),
    OAck(((b"a", b"\0"),)),
])
def test_encode_refuses_what_cannot_be_decoded(bad: object) -> None:
    with pytest.raises(ValueError):
        encode(bad)                        # type: ignore[arg-type]


def test_encode_refuses_non_packets() -> None:
    with pytest.raises(TypeError):
        encode(b"\x00\x04\x00\x01")        # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties

text = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)
maybe_empty = st.binary(max_size=40).filter(lambda b: b"\0" not in b)
options = st.lists(st.tuples(text, maybe_empty), max_size=6).map(tuple)
packets = st.one_of(
    st.builds(Request, st.sampled_from([Opcode.RRQ, Opcode.WRQ]), text, text, options),
    st.builds(Data, st.integers(0, 65535), st.binary(max_size=600)),
    st.builds(Ack, st.integers(0, 65535)),
    st.builds(Error, st.integers(0, 65535), maybe_empty),
    st.builds(OAck, options),
)


@settings(max_examples=500, deadline=None)
@given(packets)
def test_round_trip(packet: object) -> None:
    wire = encode(packet)                  # type: ignore[arg-type]
    assert decode(wire) == packet
    assert encode(decode(wire)) == wire


def _fuzz_datagrams() -> st.SearchStrategy[bytes]:
    """Raw bytes, and bytes behind a real opcode built from NULs and short words."""
    words = st.lists(st.sampled_from([b"", b"\0", b"\0\0", b"a", b"octet", b"blksize",
                                      b"512", b"\xff"]), max_size=8).map(b"".join)
    prefixed = st.builds(lambda op, body: struct.pack("!H", op) + body,
                         st.integers(0, 8), st.one_of(words, st.binary(max_size=30)))
    return st.one_of(st.binary(max_size=64), prefixed)


@settings(max_examples=1000, deadline=None)
@given(_fuzz_datagrams())
def test_arbitrary_bytes_decode_or_raise_malformed(wire: bytes) -> None:
    try:
        packet = decode(wire)
    except MalformedPacket:
        return
    # anything accepted is canonical: it encodes back to the very same bytes,
    # but for NUL padding after the last field of a request
    if isinstance(packet, Request) and wire.endswith(b"\0\0"):
        assert wire.startswith(encode(packet)) and not wire[len(encode(packet)):].strip(b"\0")
    else:
        assert encode(packet) == wire
    assert isinstance(packet, (Request, Data, Ack, Error, OAck))


@pytest.mark.parametrize("wire, options", [
    (b"\x00\x01file\x00octet\x00\x00", ()),
    (b"\x00\x01file\x00octet\x00\x00\x00\x00\x00", ()),
    (b"\x00\x01file\x00octet\x00blksize\x001024\x00\x00\x00", ((b"blksize", b"1024"),)),
    (b"\x00\x01file\x00octet\x00tsize\x00\x00", ((b"tsize", b""),)),
    (b"\x00\x01file\x00octet\x00tsize\x00\x00\x00\x00", ((b"tsize", b""),)),
])
def test_request_padded_with_nuls_is_accepted(wire: bytes, options) -> None:
    """Some boot ROMs pad requests with NULs (tftp-hpa accepts them too)."""
    assert decode(wire) == Request(Opcode.RRQ, b"file", b"octet", options)
