"""tftpaccess.ctl: the AIX decision as a pure function, with hostile tables;
the access table's reload and fail-closed behaviour; the file rules of
admission (SPEC 3.5, 3.6) on a real directory tree."""

from __future__ import annotations

import ast
import contextlib
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from tftpd import access, admission, paths
from tftpd import log as tftpd_log
from tftpd.access import AccessTable, decide, parse, resolve
from tftpd.admission import Admission
from tftpd.config import Config
from tftpd.packets import ErrorCode, Opcode, Request, TftpError


class LogCapture(tftpd_log.Handler):
    """pytest's caplog for tftpd's own logger (tftpd.log, not the standard
    library's logging): the messages logged inside ``at_level``."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: tftpd_log.Record) -> None:
        self.messages.append(record.getMessage())

    @property
    def text(self) -> str:
        return "".join(m + "\n" for m in self.messages)

    @contextlib.contextmanager
    def at_level(self, level: str, logger: str = "tftpd") -> Iterator[None]:
        log = tftpd_log.getLogger(logger)
        old, handlers = log.level, list(log.handlers)
        log.setLevel(getattr(tftpd_log, level))
        log.handlers[:] = [self]
        try:
            yield
        finally:
            log.handlers[:] = handlers
            log.setLevel(old)


@pytest.fixture
def logged() -> LogCapture:
    return LogCapture()


def rules(*lines: str) -> access.Rules:
    return parse(os.fsencode("\n".join(lines)))


def verdict(table: access.Rules, path: str) -> Tuple[bool, Optional[int]]:
    d = decide(table, path)
    return d.allowed, (d.rule.line if d.rule else None)


# -- the decision: tables -----------------------------------------------------

IBM = [
    # IBM's page: allow:/a/b + deny:/a -> /a/b/c allowed (no deny at /a/b or below)
    (("allow:/a/b", "deny:/a"), "/a/b/c", True, 1),
    # allow:/a + deny:/a/b -> /a/b/c denied (deny below the allow)
    (("allow:/a", "deny:/a/b"), "/a/b/c", False, 2),
    # allow:/a/b + deny:/a/b -> denied (allowed names are searched first; the tie denies)
    (("allow:/a/b", "deny:/a/b"), "/a/b/c", False, 2),
    # IBM's prose: /usr allowed, /usr/ucb denied
    (("allow:/usr", "deny:/usr/ucb"), "/usr/bin/ls", True, 1),
    (("allow:/usr", "deny:/usr/ucb"), "/usr/ucb/vi", False, 2),
    (("allow:/usr", "deny:/usr/ucb"), "/usr/ucb", False, 2),
    (("allow:/usr", "deny:/usr/ucb"), "/usr/ucbx", True, 1),
]

TABLE = IBM + [
    # allow:/ alone opens everything
    (("allow:/",), "/etc/passwd", True, 1),
    (("allow:/",), "/", True, 1),
    # deny: alone (no allow) closes everything
    (("deny:/tmp",), "/etc/passwd", False, None),
    (("deny:/tmp",), "/tmp/x", False, None),
    (("deny:/",), "/x", False, None),
    ((), "/tftpboot/x", False, None),
    # an empty deny: is not absolute: ignored, so it cannot deny anything
    (("allow:/tftpboot", "deny:"), "/tftpboot/x", True, 1),
    # whole components: /tftp does not cover /tftpboot
    (("allow:/tftp",), "/tftpboot/x", False, None),
    (("allow:/tftp",), "/tftp/x", True, 1),
    (("allow:/tftp",), "/tftp", True, 1),
    (("allow:/tftpboot", "deny:/tftp"), "/tftpboot/x", True, 1),
    (("allow:/", "deny:/tftp"), "/tftpboot/x", True, 1),
    # a deny above the longest allow does not count; allow:/ + deny:/ is a tie
    (("allow:/", "deny:/"), "/x", False, 2),
    (("allow:/", "deny:/a", "allow:/a/b"), "/a/b/c", True, 3),
    (("allow:/", "deny:/a", "allow:/a/b"), "/a/c", False, 2),
    (("allow:/", "deny:/a", "allow:/a/b", "deny:/a/b/c/d"), "/a/b/c/d/e", False, 4),
    (("allow:/", "deny:/a", "allow:/a/b", "deny:/a/b/c/d"), "/a/b/c/x", True, 3),
    # the deny that decides is the longest one below the allow
    (("allow:/a", "deny:/a/b", "deny:/a/b/c"), "/a/b/c/d", False, 3),
    # trailing slashes, '//' and '.' in rules are normalised
    (("allow:/tftpboot/",), "/tftpboot/x", True, 1),
    (("allow://tftpboot//sub//",), "/tftpboot/sub/x", True, 1),
    (("allow:/tftpboot/./sub/.",), "/tftpboot/sub/x", True, 1),
    (("allow:/tftpboot/other/../sub",), "/tftpboot/sub/x", True, 1),
    (("allow:/tftpboot/other/../sub",), "/tftpboot/other/x", False, None),
    (("allow:/tftpboot", "deny:/tftpboot/private/"), "/tftpboot/private/x", False, 2),
    # ...and so are requests
    (("allow:/tftpboot", "deny:/tftpboot/private"), "/tftpboot//private/x", False, 2),
    (("allow:/tftpboot", "deny:/tftpboot/private"), "/tftpboot/./private/x", False, 2),
    (("allow:/tftpboot", "deny:/tftpboot/private"), "/tftpboot/x/../private/k", False, 2),
    (("allow:/tftpboot",), "/tftpboot/../etc/passwd", False, None),
    (("allow:/tftpboot",), "/tftpboot/../../../etc/passwd", False, None),
    (("allow:/tftpboot",), "//tftpboot/x", True, 1),
    (("allow:/tftpboot",), "/tftpboot/", True, 1),
    (("allow:/tftpboot",), "tftpboot/x", False, None),          # not absolute
    (("allow:/tftpboot",), "", False, None),
    # blanks around the path, CR at the end of a line, indented rules
    (("allow: /tftpboot \r",), "/tftpboot/x", True, 1),
    (("   deny:/tftpboot/p", "allow:/tftpboot"), "/tftpboot/p/x", False, 1),
    # other lines are ignored: comments, wrong case, spaces before the colon
    (("# allow:/etc", "Allow:/etc", "ALLOW:/etc", "allow :/etc", "allowed:/etc",
      "xallow:/etc", "allow/etc"), "/etc/passwd", False, None),
    # relative rule paths are ignored
    (("allow:tftpboot", "allow:./x", "allow:~/x"), "/tftpboot/x", False, None),
    # the first of duplicate rules is the one reported
    (("allow:/a", "allow:/a/"), "/a/x", True, 1),
    # names with non-UTF-8 bytes and odd characters are plain components
    (("allow:/tftpboot", "deny:/tftpboot/\udcff\udcfe"), "/tftpboot/\udcff\udcfe/x", False, 2),
    (("allow:/tftpboot", "deny:/tftpboot/\udcff"), "/tftpboot/\udcff\udcfe", True, 1),
    (("allow:/tftpboot/caf\u00e9",), "/tftpboot/caf\u00e9/x", True, 1),
    (("allow:/tftpboot/caf\u00e9",), "/tftpboot/cafe/x", False, None),
    (("allow:/t f/x:y",), "/t f/x:y/z", True, 1),
    # a NUL cannot be in a real path: it matches nothing it should not
    (("allow:/tftpboot",), "/tftpboot\0/x", False, None),
    (("allow:/tftpboot",), "/tftpboot/\0", True, 1),
]


@pytest.mark.parametrize("lines,path,allowed,line", TABLE,
                         ids=[f"{i}:{p!r}" for i, (_, p, _, _) in enumerate(TABLE)])
def test_decision_table(lines: Sequence[str], path: str, allowed: bool,
                        line: Optional[int]) -> None:
    assert verdict(rules(*lines), path) == (allowed, line)


def test_ibm_examples_report_the_rule_text() -> None:
    d = decide(rules("allow:/a", "deny:/a/b"), "/a/b/c")
    assert not d.allowed and d.rule is not None
    assert (d.rule.kind, d.rule.path, d.rule.line, d.rule.text) == ("deny", "/a/b", 2, "deny:/a/b")
    assert d.show() == "denied (line 2: deny:/a/b)"
    d = decide(rules("allow:/a/b", "deny:/a"), "/a/b/c")
    assert d.show() == "allowed (line 1: allow:/a/b)"
    d = decide(rules("deny:/a"), "/a/b/c")
    assert d.rule is None and "no allow" in d.reason


def test_non_utf8_rule_bytes_match_request_bytes() -> None:
    table = parse(b"allow:/tftpboot\ndeny:/tftpboot/\xff\xfe\n")
    name = paths.lexical(b"\xff\xfe/x", "/tftpboot")
    assert not decide(table, name).allowed
    assert decide(table, paths.lexical(b"\xff/x", "/tftpboot")).allowed
    assert "\\xff" in decide(table, name).show()      # shown escaped, never raw


def test_nul_in_a_rule_is_ignored_with_a_warning() -> None:
    table = parse(b"allow:/a\0b\nallow:/c\n")
    assert list(table.allow) == ["/c"]
    assert any("NUL" in w for w in table.warnings)


def test_warnings_name_the_line() -> None:
    table = parse(b"# header\nallow:tftpboot\nAllow:/x\ndeny:\nallow:/ok\n", origin="F")
    assert table.warnings == (
        "F: line 2: 'allow:tftpboot': the path is not absolute: ignored",
        "F: line 3: 'Allow:' is not a rule (write 'allow:'): ignored",
        "F: line 4: 'deny:': the path is not absolute: ignored",
    )
    assert list(table.allow) == ["/ok"] and not table.deny


@pytest.mark.parametrize("name,allowed", [
    (b"x", True),
    (b"sub/x", True),
    (b"./x", True),
    (b"sub/../x", True),
    (b"../../etc/passwd", False),
    (b"sub/../../x", False),
    (b"../tftpboot/x", True),
    (b"../tftpbootx/x", False),
    (b"/etc/passwd", False),
    (b"//etc/passwd", False),
    (b"/tftpboot/../etc/passwd", False),
    (b"/tftpboot/x", True),
    (b"//tftpboot//x", True),
    (b"/./tftpboot/./x/", True),
    (b"private/x", False),
    (b"sub/../private/x", False),
    (b"./private/../x", True),
    (b"\xff\xfe", True),
    (b"../../../../../../../../..", False),
])
def test_request_names_through_lexical_normalisation(name: bytes, allowed: bool) -> None:
    table = rules("allow:/tftpboot", "deny:/tftpboot/private")
    assert decide(table, paths.lexical(name, "/tftpboot")).allowed is allowed


def test_resolve_adds_the_real_path_of_symlinked_rules() -> None:
    links = {"/tftpboot": "/srv/tftp", "/tftpboot/private": "/srv/tftp/private"}
    table = resolve(rules("allow:/tftpboot", "deny:/tftpboot/private", "allow:/plain"),
                    realpath=lambda p: links.get(p, p))
    assert verdict(table, "/srv/tftp/x") == (True, 1)
    assert verdict(table, "/srv/tftp/private/x") == (False, 2)
    assert verdict(table, "/tftpboot/x") == (True, 1)        # the written form stays
    assert verdict(table, "/plain/x") == (True, 3)
    assert table.count() == (2, 1)


# -- the decision: property against a brute-force reference -------------------

COMPONENTS = ["a", "b", "ab", "c", "\udcff"]
comp_lists = st.lists(st.sampled_from(COMPONENTS), min_size=0, max_size=4)


def reference(rule_set: List[Tuple[str, List[str]]], path: List[str]) -> bool:
    """Brute force, by component lists: the longest allow covering the path, then
    any deny covering it that is at least as long."""
    def covers(rule: List[str]) -> bool:
        return len(rule) <= len(path) and all(r == p for r, p in zip(rule, path))
    allow_lengths = [len(r) for kind, r in rule_set if kind == "allow" and covers(r)]
    if not allow_lengths:
        return False
    longest = max(allow_lengths)
    return not any(kind == "deny" and covers(r) and len(r) >= longest
                   for kind, r in rule_set)


@st.composite
def spelled(draw, components: List[str]) -> str:
    """A path for these components with harmless noise: '//', '.', 'x/..', '/' at the end."""
    out = ""
    for c in components:
        noise = draw(st.sampled_from(["/", "//", "/./", "/zz/../"]))
        out += noise + c
    if not out:
        return draw(st.sampled_from(["/", "//", "/.", "/./"]))
    return out + draw(st.sampled_from(["", "/", "/.", "//"]))


@st.composite
def scenario(draw):
    rule_set = draw(st.lists(st.tuples(st.sampled_from(["allow", "deny"]), comp_lists),
                             max_size=6))
    path = draw(comp_lists)
    lines = []
    for kind, comps in rule_set:
        lines.append(f"{kind}:{draw(spelled(comps))}")
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["# comment", "", "deny:relative", "Allow:/",
                                               "allow:a/b", "junk: /"])))
    return rule_set, path, "\n".join(lines), draw(spelled(path))


@settings(max_examples=600, deadline=None)
@given(scenario())
def test_decision_equals_brute_force_reference(case) -> None:
    rule_set, path, text, written = case
    table = parse(os.fsencode(text))
    d = decide(table, written)
    assert d.allowed is reference(rule_set, path)
    if d.allowed:
        assert d.rule is not None and d.rule.kind == "allow"
    elif d.rule is not None:
        assert d.rule.kind == "deny"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=60))
def test_parse_and_decide_never_crash(data: bytes, name: bytes) -> None:
    table = parse(data)
    for rule in list(table.allow.values()) + list(table.deny.values()):
        assert rule.path.startswith("/") and "\0" not in rule.path
    d = decide(table, os.fsdecode(name))
    assert isinstance(d.allowed, bool)


# -- the access table: default, reload, fail closed --------------------------

def test_missing_file_serves_only_root_and_write_dir(tmp_path: Path) -> None:
    root, incoming = tmp_path / "root", tmp_path / "in"
    root.mkdir()
    incoming.mkdir()
    table = AccessTable(str(tmp_path / "absent.ctl"), [str(root), str(incoming)])
    assert table.allowed(str(root / "x"))
    assert table.allowed(str(incoming / "y"))
    assert not table.allowed(str(tmp_path / "x"))
    assert not table.allowed("/etc/passwd")
    assert "no access file" in table.describe()


def test_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    ctl = tmp_path / "tftpaccess.ctl"
    ctl.write_text("allow:/a\n")
    table = AccessTable(str(ctl), [str(tmp_path)])
    assert table.allowed("/a/x") and not table.allowed("/b/x")
    ctl.write_text("allow:/b\n")                                # same size, new content
    os.utime(ctl, ns=(1, 1))                                    # and an old mtime: ctime differs
    assert table.allowed("/b/x") and not table.allowed("/a/x")
    new = tmp_path / "new.ctl"
    new.write_text("allow:/c\n")
    os.replace(new, ctl)                                        # an editor's atomic save
    assert table.allowed("/c/x") and not table.allowed("/b/x")
    ctl.unlink()                                                # gone: the default
    assert table.allowed(str(tmp_path / "f")) and not table.allowed("/c/x")
    ctl.write_text("allow:/d\n")                                # back
    assert table.allowed("/d/x") and not table.allowed(str(tmp_path / "f"))


def test_unchanged_file_is_not_reread(tmp_path: Path, monkeypatch) -> None:
    ctl = tmp_path / "tftpaccess.ctl"
    ctl.write_text("allow:/a\n")
    table = AccessTable(str(ctl), [])
    reads = []
    real_read = table._read
    monkeypatch.setattr(table, "_read", lambda: reads.append(1) or real_read())
    for _ in range(20):
        assert table.allowed("/a/x")
    assert len(reads) == 1
    table.invalidate()                                          # SIGHUP
    assert table.allowed("/a/x")
    assert len(reads) == 2


def test_remembered_decisions_are_bounded_and_forgotten_on_reload(tmp_path: Path,
                                                                 monkeypatch) -> None:
    ctl = tmp_path / "tftpaccess.ctl"
    ctl.write_text("allow:/a\ndeny:/a/no\n")
    table = AccessTable(str(ctl), [])
    monkeypatch.setattr(access, "MEMO_SIZE", 8)
    for round in range(2):
        for i in range(30):
            assert table.allowed(f"/a/{i}") and not table.allowed(f"/a/no/{i}")
            assert not table.allowed(f"/b/{i}")
            assert len(table._state[2]) <= 8
    ctl.write_text("allow:/b\n")
    table.invalidate()
    assert table.allowed("/b/1") and not table.allowed("/a/1")


def test_unreadable_file_refuses_everything(tmp_path: Path, monkeypatch,
                                            logged: LogCapture) -> None:
    ctl = tmp_path / "tftpaccess.ctl"
    ctl.write_text("allow:/\n")
    real_open = os.open

    def no_access(path, flags, *a):
        if path == str(ctl):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a)
    monkeypatch.setattr(access.os, "open", no_access)
    table = AccessTable(str(ctl), [str(tmp_path)])
    with logged.at_level("ERROR", logger="tftpd"):
        assert not table.allowed(str(tmp_path / "x"))
        assert not table.allowed("/etc/passwd")
    assert "refusing every request" in logged.text and "Permission denied" in logged.text
    d = table.decide("/x")
    assert not d.allowed and d.rule is None and "cannot be read" in d.reason
    monkeypatch.setattr(access.os, "open", real_open)
    os.chmod(ctl, 0o600)                                        # ctime moves: re-read
    assert table.allowed("/x")


@pytest.mark.parametrize("kind", ["directory", "fifo", "huge"])
def test_access_file_that_is_not_a_plain_file_refuses_everything(tmp_path: Path,
                                                                 kind: str) -> None:
    ctl = tmp_path / "tftpaccess.ctl"
    if kind == "directory":
        ctl.mkdir()
    elif kind == "fifo":
        os.mkfifo(ctl)                                          # must not block
    else:
        with open(ctl, "wb") as f:
            f.write(b"allow:/\n")
            f.truncate(access.MAX_FILE_SIZE + 1)
    table = AccessTable(str(ctl), [str(tmp_path)])
    assert not table.allowed(str(tmp_path / "x"))
    assert table.describe().startswith("refusing every request")


def test_warnings_are_logged_once_per_load(tmp_path: Path, logged: LogCapture) -> None:
    ctl = tmp_path / "tftpaccess.ctl"
    ctl.write_text("allow:relative\nallow:/a\n")
    table = AccessTable(str(ctl), [])
    with logged.at_level("INFO", logger="tftpd"):
        for _ in range(5):
            table.allowed("/a/x")
    assert logged.text.count("not absolute") == 1
    assert "1 allow and 0 deny" in logged.text


def test_world_writable_access_file_is_warned_about(tmp_path: Path,
                                                    logged: LogCapture) -> None:
    ctl = tmp_path / "tftpaccess.ctl"
    ctl.write_text("allow:/a\n")
    os.chmod(ctl, 0o666)
    with logged.at_level("WARNING", logger="tftpd"):
        assert AccessTable(str(ctl), []).allowed("/a/x")
    assert "writable by others" in logged.text


def test_symlinked_rule_paths_cover_the_real_tree(tmp_path: Path) -> None:
    real = tmp_path / "srv"
    (real / "private").mkdir(parents=True)
    (tmp_path / "tftpboot").symlink_to(real)
    ctl = tmp_path / "tftpaccess.ctl"
    ctl.write_text(f"allow:{tmp_path}/tftpboot\ndeny:{tmp_path}/tftpboot/private\n")
    table = AccessTable(str(ctl), [])
    assert table.allowed(str(real / "x"))
    assert not table.allowed(str(real / "private" / "x"))


def test_access_module_is_pure() -> None:
    tree = ast.parse((ROOT / "tftpd" / "access.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    assert not names & {"socket", "threading", "select", "selectors", "time", "daemon"}


# -- admission: the file rules on real files ------------------------------------

@pytest.fixture(params=["o_path", "by_name"])
def tree(request, tmp_path: Path, monkeypatch):
    """root/ allowed (private/ denied), outside/ not allowed; every admission
    test runs twice: with the kernel's resolution (O_PATH and /proc, where
    there is one) and with realpath and open by name only."""
    if request.param == "by_name":
        monkeypatch.setattr(admission, "_RESOLVE_FLAGS", 0)
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "sub", root / "private", root / "dir", outside):
        d.mkdir(parents=True)
    (root / "ok.txt").write_text("ok\n")
    (root / "private" / "p.txt").write_text("private\n")
    (root / "secret.txt").write_text("secret\n")
    os.chmod(root / "secret.txt", 0o600)
    (outside / "o.txt").write_text("outside\n")
    (tmp_path / "x").write_text("above the root\n")
    (root / "out-link").symlink_to(outside / "o.txt")
    (root / "out-dir").symlink_to(outside)
    (root / "in-link").symlink_to(root / "ok.txt")
    (root / "priv-link").symlink_to(root / "private" / "p.txt")
    (root / "loop").symlink_to(root / "loop")
    os.mkfifo(root / "fifo")
    os.chmod(root / "fifo", 0o666)
    ctl = tmp_path / "tftpaccess.ctl"
    ctl.write_text(f"allow:{root}\ndeny:{root}/private\n")
    for p in (root, outside, tmp_path / "x", root / "ok.txt", root / "private" / "p.txt",
              outside / "o.txt"):
        os.chmod(p, os.stat(p).st_mode | 0o005 if p.is_dir() else 0o644)
    return root, outside, ctl


def admit(root: Path, ctl: Path, opcode: Opcode, name: bytes, **config) -> object:
    cfg = Config(root=str(root), access_file=str(ctl), **config)
    adm = Admission(cfg, AccessTable(str(ctl), [str(root)]))
    try:
        plan = adm.admit(Request(opcode, name, b"octet"))
    except TftpError as e:
        return e.code
    plan.close()
    return plan


@pytest.mark.parametrize("name,code", [
    (b"private/p.txt", ErrorCode.ACCESS_VIOLATION),
    (b"priv-link", ErrorCode.ACCESS_VIOLATION),
    (b"out-link", ErrorCode.ACCESS_VIOLATION),
    (b"out-dir/o.txt", ErrorCode.ACCESS_VIOLATION),
    (b"../x", ErrorCode.ACCESS_VIOLATION),
    (b"sub/../../x", ErrorCode.ACCESS_VIOLATION),
    (b"../../../../etc/passwd", ErrorCode.ACCESS_VIOLATION),
    (b"/etc/passwd", ErrorCode.ACCESS_VIOLATION),
    (b"/etc/does-not-exist", ErrorCode.ACCESS_VIOLATION),    # no existence leak outside
    (b"secret.txt", ErrorCode.ACCESS_VIOLATION),             # not o+r
    (b"dir", ErrorCode.ACCESS_VIOLATION),
    (b"sub/", ErrorCode.ACCESS_VIOLATION),
    (b"fifo", ErrorCode.ACCESS_VIOLATION),                    # refused without blocking
    (b"loop", ErrorCode.ACCESS_VIOLATION),
    (b"missing", ErrorCode.FILE_NOT_FOUND),
    (b"missing-dir/x", ErrorCode.FILE_NOT_FOUND),
    (b"ok.txt/x", ErrorCode.FILE_NOT_FOUND),
])
def test_rrq_refusals(tree, name: bytes, code: ErrorCode) -> None:
    root, _, ctl = tree
    assert admit(root, ctl, Opcode.RRQ, name) == code


@pytest.mark.parametrize("name", [b"ok.txt", b"in-link", b"sub/../ok.txt", b"./ok.txt"])
def test_rrq_allowed(tree, name: bytes) -> None:
    root, _, ctl = tree
    plan = admit(root, ctl, Opcode.RRQ, name)
    assert not isinstance(plan, ErrorCode)
    assert plan.path == str(root / "ok.txt")


def test_rrq_absolute_name_inside_allowed_tree(tree) -> None:
    root, _, ctl = tree
    assert not isinstance(admit(root, ctl, Opcode.RRQ, os.fsencode(root / "ok.txt")), ErrorCode)


def test_rrq_device_is_refused_before_open(tree) -> None:
    root, _, ctl = tree
    ctl.write_text(f"allow:{root}\nallow:/dev\n")
    assert admit(root, ctl, Opcode.RRQ, b"/dev/null") == ErrorCode.ACCESS_VIOLATION
    assert admit(root, ctl, Opcode.RRQ, b"/dev/zero") == ErrorCode.ACCESS_VIOLATION


def test_names_with_nul_are_refused(tree) -> None:
    root, _, ctl = tree
    assert admit(root, ctl, Opcode.RRQ, b"ok.txt\0x") == ErrorCode.ACCESS_VIOLATION
    assert admit(root, ctl, Opcode.WRQ, b"new\0x", allow_write=True) == \
        ErrorCode.ACCESS_VIOLATION


def _listing(*dirs: Path) -> List[str]:
    return sorted(str(p) for d in dirs for p in d.rglob("*"))


@pytest.mark.parametrize("name,code", [
    (b"../new.txt", ErrorCode.ACCESS_VIOLATION),
    (b"sub/../../new.txt", ErrorCode.ACCESS_VIOLATION),
    (b"out-dir/new.txt", ErrorCode.ACCESS_VIOLATION),
    (b"out-link", ErrorCode.ACCESS_VIOLATION),                # would replace outside/o.txt
    (b"private/new.txt", ErrorCode.ACCESS_VIOLATION),
    (b"/etc/tftpd-test-must-not-exist", ErrorCode.ACCESS_VIOLATION),
    (b"missing-dir/new.txt", ErrorCode.FILE_NOT_FOUND),
    (b"dir", ErrorCode.FILE_EXISTS),
    (b"fifo", ErrorCode.FILE_EXISTS),
])
def test_wrq_refusals_create_nothing(tree, name: bytes, code: ErrorCode) -> None:
    root, outside, ctl = tree
    before = _listing(root.parent)
    assert admit(root, ctl, Opcode.WRQ, name, allow_write=True) == code
    assert _listing(root.parent) == before
    assert (outside / "o.txt").read_text() == "outside\n"
    assert not os.path.exists("/etc/tftpd-test-must-not-exist")


def test_wrq_needs_n(tree) -> None:
    root, _, ctl = tree
    assert admit(root, ctl, Opcode.WRQ, b"new.txt") == ErrorCode.ACCESS_VIOLATION
    assert not (root / "new.txt").exists()


def test_wrq_new_file_and_replacement(tree) -> None:
    root, _, ctl = tree
    for name in (b"new.txt", b"ok.txt", b"sub/new.txt"):
        plan = admit(root, ctl, Opcode.WRQ, name, allow_write=True)
        assert not isinstance(plan, ErrorCode), name
    assert (root / "ok.txt").read_text() == "ok\n"               # aborted: old file intact
    assert not (root / "new.txt").exists()


def test_wrq_to_unwritable_file_is_refused(tree, monkeypatch) -> None:
    root, _, ctl = tree
    os.chmod(root / "ok.txt", 0o444)
    if os.geteuid() == 0:
        # root may write any file: answer access() as the server's user would
        # (tests/test_privileges.py does it for real, as nobody)
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k:
                            False if mode & os.W_OK else real_access(path, mode, *a, **k))
    assert admit(root, ctl, Opcode.WRQ, b"ok.txt", allow_write=True) == \
        ErrorCode.ACCESS_VIOLATION


def test_write_dir_default_without_access_file(tree, tmp_path: Path) -> None:
    root, _, _ = tree
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    cfg = Config(root=str(root), write_dir=str(incoming), allow_write=True)
    adm = Admission(cfg, AccessTable(str(tmp_path / "none.ctl"), [str(root), str(incoming)]))
    plan = adm.admit(Request(Opcode.WRQ, b"up.bin", b"octet"))
    assert plan.path == str(incoming / "up.bin")
    plan.close()
    with pytest.raises(TftpError) as e:
        adm.admit(Request(Opcode.WRQ, os.fsencode(tmp_path / "elsewhere.bin"), b"octet"))
    assert e.value.code == ErrorCode.ACCESS_VIOLATION


def test_refusal_messages_reveal_nothing(tree) -> None:
    root, outside, ctl = tree
    cfg = Config(root=str(root), access_file=str(ctl), allow_write=True)
    adm = Admission(cfg, AccessTable(str(ctl), [str(root)]))
    for opcode in (Opcode.RRQ, Opcode.WRQ):
        for name in (b"out-link", b"out-dir/o.txt", b"../x", b"/etc/passwd", b"private/p.txt",
                     b"dir", b"missing" if opcode == Opcode.RRQ else b"missing-dir/x"):
            with pytest.raises(TftpError) as e:
                adm.admit(Request(opcode, name, b"octet"))
            message = e.value.message
            assert str(root) not in message and str(outside) not in message
            assert "/" not in message and "etc" not in message


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd") or not hasattr(os, "O_PATH"),
                    reason="needs O_PATH and /proc")
def test_rrq_by_o_path_takes_no_detour_and_leaks_nothing(tree, monkeypatch) -> None:
    """Where the kernel resolves names, a servable file is opened without
    realpath; every other name (refused, missing...) leaves no descriptor."""
    root, _, ctl = tree
    cfg = Config(root=str(root), access_file=str(ctl))
    adm = Admission(cfg, AccessTable(str(ctl), [str(root)]))
    if admission._RESOLVE_FLAGS:
        monkeypatch.setattr(paths, "real", lambda path: pytest.fail("realpath called"))
        plan = adm.admit(Request(Opcode.RRQ, b"in-link", b"octet"))
        assert plan.path == str(root / "ok.txt")
        plan.close()
        monkeypatch.undo()
    before = _open_fds()
    for _ in range(3):
        for name in (b"ok.txt", b"in-link", b"private/p.txt", b"out-link", b"secret.txt",
                     b"dir", b"fifo", b"loop", b"missing", b"ok.txt/x", b"/dev/null"):
            try:
                adm.admit(Request(Opcode.RRQ, name, b"octet")).close()
            except TftpError:
                pass
    assert _open_fds() == before


def test_file_swapped_for_a_symlink_after_resolution_is_not_served(tree, monkeypatch) -> None:
    """The file opened is the file checked: a name resolved to a real path
    that is replaced (by a symlink out of the tree) before the open."""
    root, outside, ctl = tree
    target = root / "swap.txt"
    target.write_text("inside\n")
    os.chmod(target, 0o644)
    cfg = Config(root=str(root), access_file=str(ctl))
    table = AccessTable(str(ctl), [str(root)])
    adm = Admission(cfg, table)
    real_allowed = table.allowed

    def swap_then_decide(path: str) -> bool:
        verdict = real_allowed(path)
        if target.is_file() and not target.is_symlink():
            target.unlink()
            target.symlink_to(outside / "o.txt")
        return verdict
    monkeypatch.setattr(table, "allowed", swap_then_decide)
    try:
        plan = adm.admit(Request(Opcode.RRQ, b"swap.txt", b"octet"))
    except TftpError as e:
        assert e.code in (ErrorCode.ACCESS_VIOLATION, ErrorCode.FILE_NOT_FOUND)
        return
    try:                          # O_PATH: the descriptor still holds the checked file
        assert os.pread(plan.fd, 100, 0) == b"inside\n"
    finally:
        plan.close()


# -- small files' contents kept for their next request (files.kept_contents) ----

class _Clock:
    """time.time for an Admission, moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _sent(plan: object) -> bytes:
    """What a plan's source sends as block 1, and its file closed."""
    packet = plan.source.packet(1, 1)          # type: ignore[attr-defined]
    plan.close()                               # type: ignore[attr-defined]
    return bytes(packet)[4:]


@pytest.fixture
def fresh_contents(monkeypatch):
    """An empty cache of contents for the test (and none left behind)."""
    from tftpd import files
    monkeypatch.setattr(files, "_contents", files.OrderedDict())
    monkeypatch.setattr(files, "_seen", {})
    return files


def test_a_small_file_sent_again_is_neither_opened_nor_read(tree, fresh_contents,
                                                             monkeypatch) -> None:
    root, _, ctl = tree
    clock = _Clock(os.stat(root / "ok.txt").st_ctime + 10)
    adm = Admission(Config(root=str(root), access_file=str(ctl)),
                    AccessTable(str(ctl), [str(root)]), clock=clock)
    request = Request(Opcode.RRQ, b"in-link", b"octet")
    first = adm.admit(request)
    assert _sent(first) == b"ok\n"
    if admission._RESOLVE_FLAGS:               # the kernel resolves: kept from the first
        real_open = os.open

        def no_read_open(path, flags, *args):  # type: ignore[no-untyped-def]
            assert flags & os.O_PATH, f"{path} opened for reading"
            return real_open(path, flags, *args)
        monkeypatch.setattr(os, "open", no_read_open)
        monkeypatch.setattr(os, "pread", lambda *a: pytest.fail("read again"))
        plan = adm.admit(request)
        assert plan.fd == -1 and plan.path == str(root / "ok.txt")
        assert _sent(plan) == b"ok\n"
        monkeypatch.undo()
    else:                                      # by name: every request opens the file
        plan = adm.admit(request)
        assert plan.fd >= 0 and _sent(plan) == b"ok\n"


def test_kept_contents_never_outlive_a_change(tree, fresh_contents) -> None:
    """Same size, write time set back: the ctime still tells; and a file
    made private, or a rule that denies it, refuses it as before."""
    root, _, ctl = tree
    path = root / "ok.txt"
    clock = _Clock(0.0)
    adm = Admission(Config(root=str(root), access_file=str(ctl)),
                    AccessTable(str(ctl), [str(root)]), clock=clock)
    request = Request(Opcode.RRQ, b"ok.txt", b"octet")
    for body in (b"one\n", b"two\n", b"six\n"):
        before = os.stat(path)
        path.write_bytes(body)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))   # same size, same mtime
        clock.now = os.stat(path).st_ctime + 10
        for _ in range(3):
            assert _sent(adm.admit(request)) == body
    if admission._RESOLVE_FLAGS:
        assert len(fresh_contents._contents) >= 1     # it was kept, and let go on each change
    os.chmod(path, 0o640)
    with pytest.raises(TftpError) as e:
        adm.admit(request)
    assert e.value.code == ErrorCode.ACCESS_VIOLATION
    os.chmod(path, 0o644)
    assert _sent(adm.admit(request)) == b"six\n"
    ctl.write_text(f"allow:{root}\ndeny:{path}\n")
    with pytest.raises(TftpError) as e:
        adm.admit(request)
    assert e.value.code == ErrorCode.ACCESS_VIOLATION


def test_contents_are_kept_only_for_octet_small_files_and_a_clock(tree, fresh_contents) -> None:
    root, _, ctl = tree
    (root / "big.txt").write_bytes(b"b" * (fresh_contents.KEEP_CONTENTS_MAX + 1))
    os.chmod(root / "big.txt", 0o644)
    ctl_path = str(ctl)
    for clock in (None, _Clock(os.stat(root / "big.txt").st_ctime + 10)):
        adm = Admission(Config(root=str(root), access_file=ctl_path),
                        AccessTable(ctl_path, [str(root)]), clock=clock)
        for name, mode in ((b"big.txt", b"octet"), (b"ok.txt", b"netascii"),
                           (b"ok.txt", b"octet")):
            for _ in range(2):
                adm.admit(Request(Opcode.RRQ, name, mode)).close()
                if clock is None or name == b"big.txt" or mode == b"netascii":
                    assert not fresh_contents._contents, (clock, name, mode)
