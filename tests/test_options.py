"""Option negotiation: what is acknowledged, with which value, and never a crash."""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd.options import (
    DEFAULT_BLKSIZE, KNOWN_OPTIONS, MAX_BLKSIZE, MIN_BLKSIZE, Limits, Negotiated, negotiate,
    parse_uint,
)
from tftpd.packets import Opcode

RRQ, WRQ = Opcode.RRQ, Opcode.WRQ
TWENTY_DIGITS = b"1" * 20


def neg(opcode: Opcode, *pairs: Tuple[bytes, bytes], limits: Limits = Limits(),
        size: Optional[int] = 1234) -> Negotiated:
    return negotiate(opcode, tuple(pairs), limits,
                     rrq_size=(lambda: size) if size is not None else None)


# --------------------------------------------------------------------------- tables

def test_known_options_and_defaults() -> None:
    assert set(KNOWN_OPTIONS) == {"blksize", "tsize", "timeout", "windowsize", "rollover"}
    n = neg(RRQ)
    assert (n.blksize, n.windowsize, n.timeout, n.tsize, n.tsize_requested, n.rollover) == (
        DEFAULT_BLKSIZE, 1, None, None, False, 0)
    assert n.acked == [] and n.oack() == ()
    assert (MIN_BLKSIZE, MAX_BLKSIZE, DEFAULT_BLKSIZE) == (8, 65464, 512)


def test_all_options_acked_in_client_order() -> None:
    n = neg(RRQ, (b"windowsize", b"8"), (b"tsize", b"0"), (b"timeout", b"3"),
            (b"blksize", b"1428"), (b"rollover", b"1"), size=99)
    assert n.oack() == ((b"windowsize", b"8"), (b"tsize", b"99"), (b"timeout", b"3"),
                        (b"blksize", b"1428"), (b"rollover", b"1"))
    assert (n.windowsize, n.tsize_requested, n.timeout, n.blksize, n.rollover) == (
        8, True, 3.0, 1428, 1)


@pytest.mark.parametrize("name", [b"BLKSIZE", b"BlkSize", b"blkSIZE", b"blksize"])
def test_names_are_case_insensitive(name: bytes) -> None:
    n = neg(RRQ, (name, b"1024"))
    assert n.acked == [(b"blksize", b"1024")] and n.blksize == 1024


@pytest.mark.parametrize("value,acked", [
    (b"8", b"8"), (b"512", b"512"), (b"1468", b"1468"), (b"65464", b"65464"),
    (b"0001024", b"1024"), (b"7", None), (b"0", None), (b"65465", None), (b"65535", None),
])
def test_blksize_range(value: bytes, acked: Optional[bytes]) -> None:
    n = neg(WRQ, (b"blksize", value))
    if acked is None:
        assert n.acked == [] and n.blksize == 512
    else:
        assert n.acked == [(b"blksize", acked)] and n.blksize == int(acked)


@pytest.mark.parametrize("asked,cap,got", [(65464, 1468, 1468), (1468, 1468, 1468),
                                           (1000, 1468, 1000), (9000, 8, 8)])
def test_blksize_capped_by_max_blksize(asked: int, cap: int, got: int) -> None:
    n = neg(RRQ, (b"blksize", str(asked).encode()), limits=Limits(max_blksize=cap))
    assert n.acked == [(b"blksize", str(got).encode())] and n.blksize == got


@pytest.mark.parametrize("value,acked", [
    (b"1", b"1"), (b"255", b"255"), (b"05", b"5"), (b"0", None), (b"256", None),
])
def test_timeout_range(value: bytes, acked: Optional[bytes]) -> None:
    n = neg(RRQ, (b"timeout", value))
    assert n.acked == ([(b"timeout", acked)] if acked else [])
    assert n.timeout == (float(acked) if acked else None)


@pytest.mark.parametrize("value,cap,acked", [
    (b"1", 64, b"1"), (b"64", 64, b"64"), (b"65", 64, b"64"), (b"65535", 65535, b"65535"),
    (b"65535", 64, b"64"), (b"0", 64, None), (b"65536", 65535, None),
])
def test_windowsize_range_and_cap(value: bytes, cap: int, acked: Optional[bytes]) -> None:
    n = neg(WRQ, (b"windowsize", value), limits=Limits(max_windowsize=cap))
    assert n.acked == ([(b"windowsize", acked)] if acked else [])
    assert n.windowsize == (int(acked) if acked else 1)


@pytest.mark.parametrize("value,acked", [(b"0", b"0"), (b"1", b"1"), (b"2", None), (b"", None)])
def test_rollover_zero_or_one(value: bytes, acked: Optional[bytes]) -> None:
    n = neg(RRQ, (b"rollover", value))
    assert n.acked == ([(b"rollover", acked)] if acked else [])
    assert n.rollover == (int(acked) if acked else 0)


def test_tsize_rrq_is_the_real_size() -> None:
    calls: List[int] = []

    def size() -> int:
        calls.append(1)
        return 1 << 40
    n = negotiate(RRQ, ((b"tsize", b"0"),), Limits(), rrq_size=size)
    assert n.acked == [(b"tsize", b"1099511627776")] and n.tsize_requested
    assert calls == [1]
    n = negotiate(RRQ, ((b"blksize", b"1024"),), Limits(), rrq_size=size)
    assert calls == [1]                   # not asked for tsize: not measured


def test_tsize_rrq_without_a_size_is_not_acked() -> None:
    n = neg(RRQ, (b"tsize", b"0"), size=None)
    assert n.acked == [] and not n.tsize_requested


def test_tsize_wrq_is_the_clients_size() -> None:
    n = neg(WRQ, (b"tsize", b"123456789"))
    assert n.acked == [(b"tsize", b"123456789")] and n.tsize == 123456789
    n = neg(WRQ, (b"tsize", b"0"))
    assert n.acked == [(b"tsize", b"0")] and n.tsize == 0
    n = neg(WRQ, (b"tsize", b"9" * 19))
    assert n.tsize == 10 ** 19 - 1


def test_tsize_wrq_huge_is_parsed_so_it_can_be_refused() -> None:
    """A WRQ announcing more than any disk holds must get ERROR 3 before any
    data moves (SPEC 3.6), so a 20-digit tsize is a number, not junk."""
    n = neg(WRQ, (b"tsize", TWENTY_DIGITS))
    assert n.tsize == int(TWENTY_DIGITS)
    n = neg(WRQ, (b"tsize", b"9" * 41))       # any length: still more than any disk
    assert n.tsize is not None and n.tsize >= 10 ** 40
    n = neg(WRQ, (b"tsize", b"1" * 4000))
    assert n.tsize is not None and n.tsize >= 10 ** 40
    assert neg(RRQ, (b"tsize", b"9" * 41)).acked == []


BAD_VALUES = [b"", b"-1", b"abc", b"1e3", TWENTY_DIGITS, b"5.5", b" 512", b"512 ", b"+512",
              b"0x200", b"\xd9\xa1\xd9\xa2", b"\xef\xbc\x95\xef\xbc\x91\xef\xbc\x92", b"51 2",
              b"512\n", b"1" * 11]


@pytest.mark.parametrize("name", sorted(KNOWN_OPTIONS))
@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("opcode", [RRQ, WRQ])
def test_bad_values_are_not_acked(name: str, value: bytes, opcode: Opcode) -> None:
    if name == "tsize" and value in (b"1" * 11, TWENTY_DIGITS):
        return                            # a fine (if huge) file size: see below
    n = neg(opcode, (name.encode(), value))
    assert n.acked == []
    assert (n.blksize, n.windowsize, n.timeout, n.tsize, n.rollover) == (512, 1, None, None, 0)
    assert not n.tsize_requested


@pytest.mark.parametrize("refused", sorted(KNOWN_OPTIONS))
def test_refused_option_is_ignored_as_unknown(refused: str) -> None:
    pairs = ((b"blksize", b"1024"), (b"tsize", b"0"), (b"timeout", b"2"),
             (b"windowsize", b"4"), (b"rollover", b"1"))
    n = neg(RRQ, *pairs, limits=Limits(refused=frozenset({refused})), size=5)
    names = [k for k, _ in n.acked]
    assert refused.encode() not in names
    assert names == [k for k, _ in pairs if k != refused.encode()]
    defaults = {"blksize": 512, "timeout": None, "windowsize": 1, "rollover": 0}
    if refused == "tsize":
        assert not n.tsize_requested
    else:
        assert getattr(n, refused) == defaults[refused]
    upper = neg(RRQ, (refused.upper().encode(), b"1"),
                limits=Limits(refused=frozenset({refused})))
    assert upper.acked == []


def test_unknown_options_ignored() -> None:
    n = neg(RRQ, (b"multicast", b""), (b"utimeout", b"100"), (b"\xff\x00", b"1"),
            (b"blksize", b"1024"), (b"x" * 300, b"y"))
    assert n.acked == [(b"blksize", b"1024")]


@pytest.mark.parametrize("first,second,expected", [
    ((b"blksize", b"1024"), (b"BLKSIZE", b"2048"), [(b"blksize", b"1024")]),
    ((b"blksize", b"abc"), (b"blksize", b"2048"), []),
    ((b"timeout", b"5"), (b"Timeout", b"9"), [(b"timeout", b"5")]),
    ((b"windowsize", b"0"), (b"windowsize", b"4"), []),
])
def test_duplicates_first_wins(first: tuple, second: tuple, expected: list) -> None:
    n = neg(WRQ, first, second)
    assert n.acked == expected


def test_parse_uint() -> None:
    assert parse_uint(b"0") == 0 and parse_uint(b"0123") == 123
    assert parse_uint(b"9999999999") == 9999999999
    for bad in (b"", b"99999999999", b"-1", b"1.0", b"1e3", b" 1", b"\xd9\xa1"):
        assert parse_uint(bad) is None
    assert parse_uint(b"1" * 20, max_digits=20) == int("1" * 20)


# --------------------------------------------------------------------------- property

RANGES: Dict[str, Tuple[int, int]] = {
    "blksize": (8, 65464), "timeout": (1, 255), "windowsize": (1, 65535), "rollover": (0, 1)}


def _oracle_number(value: bytes, digits: int) -> Optional[int]:
    return int(value) if re.fullmatch(rb"[0-9]{1,%d}" % digits, value) else None


def oracle(opcode: Opcode, options: Tuple[Tuple[bytes, bytes], ...], limits: Limits,
           size: Optional[int]) -> List[Tuple[bytes, bytes]]:
    """The acknowledgements RFC 2347/2348/2349/7440 and the rollover draft call for."""
    out = []
    seen = set()
    for raw, value in options:
        name = raw.decode("latin-1").lower()
        if name in seen:
            continue
        seen.add(name)
        if name in limits.refused:
            continue
        if name == "tsize":
            v = _oracle_number(value, 40)
            if v is None:
                continue
            if opcode == RRQ:
                if size is not None:
                    out.append((b"tsize", str(size).encode()))
            else:
                out.append((b"tsize", value))
            continue
        if name not in RANGES:
            continue
        v = _oracle_number(value, 10)
        lo, hi = RANGES[name]
        if v is None or not lo <= v <= hi:
            continue
        if name == "blksize":
            v = min(v, limits.max_blksize)
        if name == "windowsize":
            v = min(v, limits.max_windowsize)
        out.append((name.encode(), str(v).encode()))
    return out


def _random_case(name: str) -> st.SearchStrategy[bytes]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda ups: "".join(c.upper() if u else c for c, u in zip(name, ups)).encode())



names = st.one_of(
    st.sampled_from(sorted(KNOWN_OPTIONS)).flatmap(_random_case),
    st.sampled_from([b"multicast", b"utimeout", b"blksize2", b"tsiz", b"\xc0blksize"]),
    st.binary(min_size=1, max_size=12),
)
values = st.one_of(
    st.sampled_from(BAD_VALUES + [b"0", b"1", b"2", b"7", b"8", b"255", b"256", b"512",
                                  b"1468", b"65464", b"65465", b"65535", b"65536",
                                  b"9" * 10, b"0" * 10, b"9" * 19, b"0" * 19 + b"1"]),
    st.integers(0, 10 ** 12).map(lambda i: str(i).encode()),
    st.binary(max_size=12),
)
limits = st.builds(Limits, max_blksize=st.integers(8, 65464),
                   max_windowsize=st.integers(1, 65535),
                   refused=st.frozensets(st.sampled_from(sorted(KNOWN_OPTIONS))))


@settings(max_examples=800, deadline=None)
@given(st.sampled_from([RRQ, WRQ]), st.lists(st.tuples(names, values), max_size=10),
       limits, st.one_of(st.none(), st.integers(0, 2 ** 63 - 1)))
def test_negotiation_never_raises_and_acks_only_valid_values(
        opcode: Opcode, pairs: list, lim: Limits, size: Optional[int]) -> None:
    calls: List[int] = []

    def rrq_size() -> int:
        calls.append(1)
        assert size is not None
        return size
    n = negotiate(opcode, tuple(pairs), lim, rrq_size=rrq_size if size is not None else None)
    assert n.acked == oracle(opcode, tuple(pairs), lim, size)
    acked = dict(n.acked)
    assert len(acked) == len(n.acked)                  # each name at most once
    for name, value in n.acked:
        assert name.decode() in KNOWN_OPTIONS and name.decode() not in lim.refused
        assert re.fullmatch(rb"[0-9]+", value)
    if b"blksize" in acked:
        assert 8 <= n.blksize <= min(65464, lim.max_blksize)
        assert acked[b"blksize"] == str(n.blksize).encode()
    else:
        assert n.blksize == 512
    if b"windowsize" in acked:
        assert 1 <= n.windowsize <= min(65535, lim.max_windowsize)
        assert acked[b"windowsize"] == str(n.windowsize).encode()
    else:
        assert n.windowsize == 1
    if b"timeout" in acked:
        assert n.timeout is not None and 1 <= n.timeout <= 255
        assert acked[b"timeout"] == b"%d" % n.timeout
    else:
        assert n.timeout is None
    assert n.rollover == (int(acked[b"rollover"]) if b"rollover" in acked else 0)
    assert n.rollover in (0, 1)
    if opcode == RRQ:
        assert n.tsize is None
        assert n.tsize_requested == (b"tsize" in acked)
        assert len(calls) == (1 if b"tsize" in acked else 0)
    else:
        assert not n.tsize_requested and not calls
        assert n.tsize == (int(acked[b"tsize"]) if b"tsize" in acked else None)
