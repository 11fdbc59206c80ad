"""tftpd.record.Frozen: what the frozen dataclasses gave, without dataclasses."""

from __future__ import annotations

import copy
import pickle

import pytest

from tftpd.access import Rule, Rules
from tftpd.config import Config
from tftpd.options import Limits, Negotiated
from tftpd.packets import Ack, Data, Opcode, Request


def test_equality_and_hash_by_fields_and_class() -> None:
    assert Request(Opcode.RRQ, b"a", b"octet") == Request(Opcode.RRQ, b"a", b"octet", ())
    assert Request(Opcode.RRQ, b"a", b"octet") != Request(Opcode.WRQ, b"a", b"octet")
    assert hash(Ack(7)) == hash(Ack(7)) and len({Ack(7), Ack(7), Ack(8)}) == 2
    assert Ack(7) != Data(7, b"")            # same values, another class
    assert Ack(7) != (7,) and Ack(7) != 7
    assert Config() == Config() and hash(Config()) == hash(Config())
    assert Config(port=69) != Config()


def test_no_assignment() -> None:
    ack = Ack(1)
    with pytest.raises(AttributeError):
        ack.block = 2                        # type: ignore[misc]
    with pytest.raises(AttributeError):
        del ack.block
    with pytest.raises(AttributeError):
        ack.other = 1                        # type: ignore[attr-defined]
    assert ack.block == 1


def test_repr_names_the_fields() -> None:
    assert repr(Ack(3)) == "Ack(block=3)"
    assert repr(Limits()) == ("Limits(max_blksize=65464, max_windowsize=64, "
                              "refused=frozenset())")


def test_copy_and_pickle() -> None:
    for value in (Request(Opcode.WRQ, b"x", b"netascii", ((b"tsize", b"0"),)),
                  Config(root="/srv", refused=frozenset({"tsize"})),
                  Rule("allow", "/a", 1, "allow:/a")):
        assert copy.copy(value) == value and copy.deepcopy(value) == value
        assert pickle.loads(pickle.dumps(value)) == value


def test_config_replace() -> None:
    base = Config()
    changed = base.replace(port=69, allow_write=True)
    assert (changed.port, changed.allow_write, changed.root) == (69, True, base.root)
    assert base.port is None                 # a copy; the original is unchanged
    with pytest.raises(TypeError):
        base.replace(no_such_field=1)


def test_rules_holds_dicts_and_is_unhashable_like_the_dataclass() -> None:
    assert Rules() == Rules() and Rules().allow == {} and Rules().allow is not Rules().allow
    with pytest.raises(TypeError):
        hash(Rules())


def test_negotiated_is_mutable_with_equality() -> None:
    n = Negotiated()
    n.blksize = 1024
    assert n == Negotiated(blksize=1024) and n != Negotiated()
    assert Negotiated().acked is not Negotiated().acked
