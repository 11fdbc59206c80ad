"""spread.Router and the inbox message: where the main process sends each
new request when it serves with --processes."""

from __future__ import annotations

import socket
from typing import List, Tuple

import pytest

from tftpd import spread
from tftpd.spread import Router, Shared, channel, unpack


def router(count: int) -> Tuple[Router, Shared, List[socket.socket]]:
    shared = Shared(count)
    outs, inboxes = [], []
    for _ in range(count):
        out, inbox = channel()
        outs.append(out)
        inboxes.append(inbox)
    return Router(outs, shared.done, [1000 + i for i in range(count)]), shared, inboxes


def key(port: int) -> tuple:
    return (("192.0.2.1", port), b"\x00\x01f\x00octet\x00")


def test_ties_stay_in_the_main_process_then_the_least_busy_one_is_picked() -> None:
    r, shared, _ = router(2)
    assert r.pick(key(1), 0) == -1                  # all idle: here
    assert r.pick(key(2), 1) == 0                   # here 1, the others 0: the first of them
    assert r.send(0, key(2), ("0.0.0.0", 0), socket.AF_INET, 1.0)
    assert r.pick(key(3), 1) == 1                   # process 0 now has one on its way
    assert r.send(1, key(3), ("0.0.0.0", 0), socket.AF_INET, 1.0)
    assert r.pick(key(4), 1) == -1                  # 1, 1, 1: here
    shared.done[0] = 1                              # process 0 is done with its one
    assert r.pick(key(5), 1) == 0


def test_a_request_seen_before_goes_where_it_went() -> None:
    r, shared, _ = router(3)
    assert r.pick(key(7), 5) == 0
    assert r.send(0, key(7), ("0.0.0.0", 0), socket.AF_INET, 1.0)
    shared.done[0] = -10                            # (however busy it is now)
    assert r.pick(key(7), 0) == 0


def test_remembered_requests_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spread, "STICKY_MAX", 3)
    r, _, _ = router(1)
    for port in range(3):
        assert r.pick(key(port), 1) == 0
    assert len(r.sticky) == 3
    r.pick(key(99), 1)
    assert r.sticky == {key(99): 0}


def test_the_message_carries_the_request_and_where_it_came_from() -> None:
    r, _, inboxes = router(1)
    peer = ("fe80::1", 4000, 0, 2)
    bind = ("fe80::2", 0, 0, 2)
    assert r.send(0, (peer, b"\x00\x01boot\x00octet\x00"), bind, socket.AF_INET6, 12.5)
    message = inboxes[0].recv(spread.MESSAGE_MAX)
    assert unpack(message) == (b"\x00\x01boot\x00octet\x00", peer, bind,
                               int(socket.AF_INET6), 12.5)


@pytest.mark.parametrize("message", [b"junk", b"\xe9\x00", b""])
def test_a_bad_message_is_a_value_error(message: bytes) -> None:
    with pytest.raises(ValueError):
        unpack(message)


def test_a_process_that_is_gone_is_never_picked_again(capsys: pytest.CaptureFixture) -> None:
    r, _, inboxes = router(2)
    inboxes[0].close()
    assert r.pick(key(1), 1) == 0
    assert not r.send(0, key(1), ("0.0.0.0", 0), socket.AF_INET, 1.0)
    assert "serving process 1000 is gone (Broken pipe)" in capsys.readouterr().err
    assert r.pick(key(2), 5) == 1
    assert r.send(1, key(2), ("0.0.0.0", 0), socket.AF_INET, 1.0)
    assert r.pick(key(3), 5) == 1


def test_a_full_inbox_refuses_without_giving_the_process_up() -> None:
    r, _, inboxes = router(1)
    sent = 0
    while r.send(0, key(sent), ("0.0.0.0", 0), socket.AF_INET, 1.0):
        sent += 1
        assert sent < 100000
    assert sent > 10
    inboxes[0].recv(spread.MESSAGE_MAX)
    assert r.send(0, key(sent), ("0.0.0.0", 0), socket.AF_INET, 1.0)


def test_an_overlong_request_is_not_passed_on() -> None:
    r, _, _ = router(1)
    huge = (("192.0.2.1", 1), b"\x00\x01" + b"a" * spread.MESSAGE_MAX)
    assert not r.send(0, huge, ("0.0.0.0", 0), socket.AF_INET, 1.0)
    assert r.sent == [0]
