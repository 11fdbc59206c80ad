"""tftpd's own bound on amplification (issue 6, item 6; bench/amplification.py
measures it beside tftp-hpa): a first reply to a peer that never answers is
sent at most FIRST_REPLY_TIMEOUTS (3) times, so the bytes sent in reply to one
forged request are at most 3 x the size of that first reply -- whatever the
options, the direction or -x.  Not a timing test: it waits for the log line
that says the transfer was abandoned, then counts what arrived.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tftpclient import Peer, rrq, wrq
from tftpd.transfer import FIRST_REPLY_TIMEOUTS

CASES = [
    ("RRQ", {}), ("RRQ", {"blksize": "512"}), ("RRQ", {"blksize": "65464"}),
    ("RRQ", {"blksize": "65464", "windowsize": "64", "tsize": "0"}),
    ("WRQ", {}), ("WRQ", {"blksize": "65464", "windowsize": "64", "tsize": "1000"}),
]


@pytest.mark.parametrize("x", ["1", "6", "100"])
def test_unanswered_first_reply_is_sent_at_most_3_times(tftpd_server, tmp_path: Path,
                                                        x: str) -> None:
    assert FIRST_REPLY_TIMEOUTS == 3
    root = tmp_path / "root"
    root.mkdir()
    (root / "f.bin").write_bytes(os.urandom(1 << 20))
    (root / "f.bin").chmod(0o644)
    server = tftpd_server("-n", "-i", "-t", "0.05", "-x", x, "--max-windowsize", "64",
                          root=root)
    victims = [Peer(server.addr) for _ in CASES]
    try:
        requests = []
        for i, ((kind, options), victim) in enumerate(zip(CASES, victims)):
            request = (rrq("f.bin", options=options) if kind == "RRQ"
                       else wrq(f"new{i}.bin", options=options))
            requests.append(request)
            victim.send(request)
        for (kind, options), victim, request in zip(CASES, victims, requests):
            first, tid = victim.expect(what="the first reply")
            server.wait_for_log(rf":{victim.port} {kind} \S+ failed after 0 bytes: no answer")
            copies = [first] + [p for p, _ in victim.listen(0.2, limit=100)]
            what = f"{kind} {options}"
            assert all(p.raw == first.raw for p in copies), f"{what}: not all the first reply"
            assert len(copies) <= min(FIRST_REPLY_TIMEOUTS, int(x)), what
            out = sum(len(p.raw) for p in copies)
            assert out <= FIRST_REPLY_TIMEOUTS * len(first.raw), what
            if kind == "RRQ" and not options:
                # the worst case bench/amplification.py reports: a full DATA block
                assert len(first.raw) == 516 and out <= 3 * 516
    finally:
        for victim in victims:
            victim.close()
    assert [p.name for p in root.iterdir()] == ["f.bin"]
