"""netascii: LF <-> CR LF, CR <-> CR NUL, with a CR that straddles two blocks."""

from __future__ import annotations

import os
import re
import tempfile
from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd import netascii
from tftpd.netascii import Decoder, encode, encoded_size

# bytes rich in the interesting ones
texty = st.lists(st.sampled_from([b"\r", b"\n", b"\0", b"a", b"\r\n", b"\n\r", b"\xff"]),
                 max_size=80).map(b"".join)
any_bytes = st.one_of(texty, st.binary(max_size=300))


def decode_chunks(chunks: List[bytes], view: bool = False) -> bytes:
    d = Decoder()
    out = b"".join(d.feed(memoryview(c) if view else c) for c in chunks)
    return out + d.flush()


def split_at(data: bytes, cuts: List[int]) -> List[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@pytest.mark.parametrize("local,wire", [
    (b"", b""),
    (b"abc", b"abc"),
    (b"a\nb", b"a\r\nb"),
    (b"a\rb", b"a\r\0b"),
    (b"\r\n", b"\r\0\r\n"),
    (b"\n\r", b"\r\n\r\0"),
    (b"\n\n", b"\r\n\r\n"),
    (b"\r\r", b"\r\0\r\0"),
    (b"\0", b"\0"),
    (b"\r\0", b"\r\0\0"),
    (b"line1\nline2\n", b"line1\r\nline2\r\n"),
])
def test_exact_encoding_and_decoding(local: bytes, wire: bytes) -> None:
    assert encode(local) == wire
    assert decode_chunks([wire]) == local


@pytest.mark.parametrize("chunks,local", [
    ([b"a\r", b"\nb"], b"a\nb"),          # CR LF split across two blocks
    ([b"a\r", b"\0b"], b"a\rb"),          # CR NUL split across two blocks
    ([b"a\r", b"", b"\nb"], b"a\nb"),     # with an empty block between
    ([b"\r", b"\n", b"\r", b"\0"], b"\n\r"),
    ([b"x\r\0\r", b"\n"], b"x\r\n"),
    ([b"\r", b""], b"\r"),                # stream ends on a lone CR: kept
])
def test_cr_at_a_block_boundary(chunks: List[bytes], local: bytes) -> None:
    assert decode_chunks(chunks) == local
    assert decode_chunks(chunks, view=True) == local


def test_decoder_holds_back_a_trailing_cr_only() -> None:
    d = Decoder()
    assert d.feed(b"abc\r") == b"abc"
    assert d.feed(b"\ndef") == b"\ndef"
    assert d.feed(b"\r") == b""
    assert d.flush() == b"\r"
    assert d.flush() == b""               # flush resets the state
    assert d.feed(b"\n") == b"\n"


def test_lenient_lone_cr_is_kept() -> None:
    assert decode_chunks([b"a\rb"]) == b"a\rb"
    assert decode_chunks([b"a\r", b"b"]) == b"a\rb"
    assert decode_chunks([b"a\r\r\n"]) == b"a\r\n"


@settings(max_examples=400, deadline=None)
@given(any_bytes, st.integers(1, 70))
def test_round_trip_over_blocks(data: bytes, blksize: int) -> None:
    """Encode, cut into DATA blocks as a sender does, decode block by block."""
    wire = encode(data)
    blocks = [wire[i:i + blksize] for i in range(0, len(wire), blksize)]
    if len(wire) % blksize == 0:
        blocks.append(b"")                # the final short (empty) block
    assert decode_chunks(blocks) == data
    assert decode_chunks(blocks, view=True) == data


@settings(max_examples=400, deadline=None)
@given(any_bytes, st.lists(st.integers(0, 400), max_size=12))
def test_round_trip_at_arbitrary_cuts(data: bytes, cuts: List[int]) -> None:
    wire = encode(data)
    assert decode_chunks(split_at(wire, cuts)) == data


@settings(max_examples=400, deadline=None)
@given(any_bytes, st.lists(st.integers(0, 300), max_size=12))
def test_decoding_any_input_does_not_depend_on_the_cuts(wire: bytes, cuts: List[int]) -> None:
    assert decode_chunks(split_at(wire, cuts)) == decode_chunks([wire])


@settings(max_examples=300, deadline=None)
@given(any_bytes, st.lists(st.integers(0, 300), max_size=12))
def test_encoding_is_bytewise(data: bytes, cuts: List[int]) -> None:
    wire = encode(data)
    assert b"".join(encode(c) for c in split_at(data, cuts)) == wire
    assert len(wire) == len(data) + data.count(b"\r") + data.count(b"\n")
    assert not re.search(rb"\r(?![\n\0])", wire)   # every CR is CR LF or CR NUL
    assert not re.search(rb"(?<!\r)\n", wire)      # no bare LF


@settings(max_examples=150, deadline=None)
@given(any_bytes, st.integers(1, 64))
def test_encoded_size_matches_encode(data: bytes, chunk: int) -> None:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        fd = f.fileno()
        assert encoded_size(fd, chunk=chunk) == len(encode(data))
        assert encoded_size(fd) == len(encode(data))
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(data)    # pread: offset untouched


def test_module_surface() -> None:
    assert set(netascii.__all__) == {"encode", "Decoder", "encoded_size"}
