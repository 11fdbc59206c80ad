"""tftpaccess.ctl: AIX's ``allow:``/``deny:`` rules and the decision on a real path.

The decision is a pure function of the rules and a path (SPEC 3.3):

* the prefixes of the path are walked from ``/`` down to the path itself, by
  whole components (``/tftp`` is not a prefix of ``/tftpboot``);
* the longest prefix that is an ``allow:`` entry is A; without one: denied;
* a ``deny:`` entry equal to A or to any longer prefix denies; otherwise the
  path is allowed.

``AccessTable`` is the policy the server asks: it re-reads the file when a
cheap ``stat`` shows it changed, serves only the read root and the ``-d``
directory when there is no file, and refuses everything when the file exists
but cannot be read (both deliberate deviations from AIX).  No sockets,
threads or clocks here.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat

from .log import Logger, getLogger
from .record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

    _Signature = Tuple[object, ...]
    _State = Tuple[_Signature, "Rules", Dict[str, bool]]

__all__ = ["Rule", "Rules", "Decision", "AccessTable", "parse", "decide",
           "normalise", "prefixes", "defaults", "refuse_all", "resolve", "MAX_FILE_SIZE"]

ALLOW = "allow"
DENY = "deny"
MAX_FILE_SIZE = 4 * 1024 * 1024      # a larger tftpaccess.ctl is a mistake: refuse all
MEMO_SIZE = 4096                     # decisions remembered per load of the rules


class Rule(Frozen):
    """One ``allow:`` or ``deny:`` line."""

    __slots__ = ("kind", "path", "line", "text")
    kind: str        # "allow" or "deny"
    path: str        # absolute, normalised
    line: int        # 1-based line of the access file; 0 for a built-in rule
    text: str        # the line as written (surrounding blanks removed)

    def __init__(self, kind: str, path: str, line: int, text: str) -> None:
        self._init(kind, path, line, text)

    def show(self) -> str:
        where = f"line {self.line}" if self.line else "built-in"
        return f"{where}: {_printable(self.text)}"


class Rules(Frozen):
    """The entries of one access file, by normalised path."""

    __slots__ = ("allow", "deny", "warnings", "refused", "origin")
    allow: Dict[str, Rule]
    deny: Dict[str, Rule]
    warnings: Tuple[str, ...]
    refused: Optional[str]            # set: every path is denied, for this reason
    origin: str

    def __init__(self, allow: Optional[Dict[str, Rule]] = None,
                 deny: Optional[Dict[str, Rule]] = None, warnings: Tuple[str, ...] = (),
                 refused: Optional[str] = None, origin: str = "tftpaccess.ctl") -> None:
        self._init({} if allow is None else allow, {} if deny is None else deny,
                   warnings, refused, origin)

    def count(self) -> Tuple[int, int]:
        """Distinct (allow, deny) rules (a rule and its resolved form count once)."""
        return (len({id(r) for r in self.allow.values()}),
                len({id(r) for r in self.deny.values()}))


class Decision(Frozen):
    __slots__ = ("allowed", "rule", "reason")
    allowed: bool
    rule: Optional[Rule]     # the rule that decided; None when no rule did
    reason: str

    def __init__(self, allowed: bool, rule: Optional[Rule], reason: str) -> None:
        self._init(allowed, rule, reason)

    def show(self) -> str:
        word = "allowed" if self.allowed else "denied"
        return f"{word} ({self.rule.show()})" if self.rule else f"{word} ({self.reason})"


def _printable(text: str) -> str:
    raw = os.fsencode(text)
    out = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)


def normalise(path: str) -> Optional[str]:
    """``//``, ``.``, ``..`` and trailing ``/`` removed; None unless absolute."""
    if not path.startswith("/"):
        return None
    norm = posixpath.normpath(path)
    if norm.startswith("//"):          # POSIX keeps a leading '//'; we do not
        norm = "/" + norm.lstrip("/")
    return norm


def prefixes(path: str) -> List[str]:
    """``/a/b`` -> ``['/', '/a', '/a/b']`` (``path`` absolute and normalised)."""
    out = ["/"]
    if path == "/":
        return out
    current = ""
    for component in path[1:].split("/"):
        current += "/" + component
        out.append(current)
    return out


def parse(data: bytes, origin: str = "tftpaccess.ctl") -> Rules:
    """Rules from the bytes of an access file.

    A rule is a line that starts (after blanks) with ``allow:`` or ``deny:``;
    the path after the colon, blanks around it removed, must be absolute.
    Every other line is ignored.  Bytes that are not UTF-8 are kept as
    surrogate escapes, exactly as request names are.
    """
    allow: Dict[str, Rule] = {}
    deny: Dict[str, Rule] = {}
    warnings: List[str] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        text = os.fsdecode(raw.rstrip(b"\r")).strip()
        head, colon, rest = text.partition(":")
        if not colon:
            continue
        if head not in (ALLOW, DENY):
            if head.strip().lower() in (ALLOW, DENY):
                warnings.append(f"{origin}: line {number}: '{_printable(head)}:' is not "
                                f"a rule (write '{head.strip().lower()}:'): ignored")
            continue
        rpath = rest.strip()
        norm = normalise(rpath)
        if norm is None:
            warnings.append(f"{origin}: line {number}: '{_printable(text)}': the path is "
                            f"not absolute: ignored")
            continue
        if "\0" in norm:
            warnings.append(f"{origin}: line {number}: the path contains a NUL byte: ignored")
            continue
        table = allow if head == ALLOW else deny
        table.setdefault(norm, Rule(head, norm, number, text))
    return Rules(allow, deny, tuple(warnings), origin=origin)


def defaults(directories: Iterable[str], origin: str = "built-in") -> Rules:
    """Rules that allow exactly the given directories (no access file)."""
    allow: Dict[str, Rule] = {}
    for d in directories:
        norm = normalise(d)
        if norm is not None:
            allow.setdefault(norm, Rule(ALLOW, norm, 0, f"allow:{d} (no access file)"))
    return Rules(allow, {}, origin=origin)


def refuse_all(reason: str, origin: str = "tftpaccess.ctl") -> Rules:
    return Rules(refused=reason, origin=origin)


def resolve(rules: Rules, realpath: Callable[[str], str] = os.path.realpath) -> Rules:
    """Add, for each rule whose path goes through a symlink, its real path.

    Requests are decided on real paths, so ``allow:/tftpboot`` where
    ``/tftpboot`` is a symlink to ``/srv/tftp`` must cover ``/srv/tftp``; a
    ``deny:`` is resolved the same way so that it keeps covering what it named.
    The written form stays too (it matters if the symlink is later replaced).
    """
    def extend(table: Dict[str, Rule]) -> Dict[str, Rule]:
        out = dict(table)
        for rule in table.values():
            try:
                real = normalise(realpath(rule.path))
            except (OSError, ValueError):
                continue
            if real is not None:
                out.setdefault(real, rule)
        return out
    if rules.refused is not None:
        return rules
    return Rules(extend(rules.allow), extend(rules.deny), rules.warnings,
                 origin=rules.origin)


def decide(rules: Rules, path: str) -> Decision:
    """Allowed or denied, and the rule that decided (the AIX algorithm)."""
    if rules.refused is not None:
        return Decision(False, None, rules.refused)
    norm = normalise(path)
    if norm is None:
        return Decision(False, None, "not an absolute path")
    chain = prefixes(norm)
    longest = -1
    for i, prefix in enumerate(chain):
        if prefix in rules.allow:
            longest = i
    if longest < 0:
        return Decision(False, None, "no allow: rule covers this path")
    for prefix in reversed(chain[longest:]):
        rule = rules.deny.get(prefix)
        if rule is not None:
            return Decision(False, rule, "a deny: rule covers this path")
    return Decision(True, rules.allow[chain[longest]], "allowed")


_UNSET: _Signature = ("unset",)


class AccessTable:
    """The server's access policy: the current rules of one access file.

    Each request costs one ``stat`` of the file; when its device, inode,
    size, modification or change time differ from the last load, the file is
    read again.  ``invalidate()`` (SIGHUP) forces a reload at the next request.
    Loads swap one immutable ``Rules`` object, so concurrent workers need no lock.
    ``allowed()`` remembers its answers for the rules of one load (a decision is
    a pure function of the rules and the path): a load starts afresh.
    """

    def __init__(self, path: str, directories: Sequence[str],
                 log: Optional[Logger] = None) -> None:
        self.path = path
        self.directories = [d for d in directories if d]
        self.log = log or getLogger("tftpd")
        self._state: _State = (_UNSET, refuse_all("not loaded yet"), {})
        self._loaded = False

    # -- the policy interface used by admission ---------------------------
    def allowed(self, path: str) -> bool:
        _, rules, memo = self._current()
        verdict = memo.get(path)
        if verdict is None:
            verdict = decide(rules, path).allowed
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            memo[path] = verdict
        return verdict

    def decide(self, path: str) -> Decision:
        return decide(self.rules(), path)

    # -- state -------------------------------------------------------------
    def rules(self) -> Rules:
        """The current rules, re-reading the file if it changed."""
        return self._current()[1]

    def _current(self) -> _State:
        signature = self._signature()
        state = self._state
        if signature != state[0]:
            state = self._load()
            self._state = state
        return state

    def invalidate(self) -> None:
        """Re-read the file at the next request even if it looks unchanged."""
        self._state = (_UNSET, self._state[1], {})

    def describe(self) -> str:
        """One line about what is being enforced (for the log and --check)."""
        return self._describe(self.rules())

    def _describe(self, rules: Rules) -> str:
        if rules.refused is not None:
            return f"refusing every request: {rules.refused}"
        if rules.origin == "built-in":
            return (f"no access file {self.path}: serving only "
                    + " and ".join(self.directories))
        allow, deny = rules.count()
        return f"access file {self.path}: {allow} allow and {deny} deny rule(s)"

    def _signature(self) -> _Signature:
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return ("missing",)
        except OSError as e:
            return ("error", e.errno)
        except ValueError:
            return ("error", errno.EINVAL)
        return _file_signature(st)

    def _load(self) -> _State:
        again = self._loaded
        self._loaded = True
        signature, rules = self._read()
        if rules.refused is not None:
            rules = refuse_all(f"access file {self.path}: {rules.refused}", rules.origin)
            self.log.error("%s", self._describe(rules))
            return signature, rules, {}
        for warning in rules.warnings:
            self.log.warning("%s", warning)
        self.log.info("%s%s", self._describe(rules), " (reloaded)" if again else "")
        return signature, resolve(rules), {}

    def _read(self) -> Tuple[_Signature, Rules]:
        origin = self.path
        flags = (os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        try:
            fd = os.open(self.path, flags)
        except (FileNotFoundError, NotADirectoryError):
            return ("missing",), defaults(self.directories)
        except OSError as e:
            return ("error", e.errno), refuse_all(f"cannot be read ({e.strerror})", origin)
        except ValueError:
            return ("error", errno.EINVAL), refuse_all("invalid file name", origin)
        try:
            st = os.fstat(fd)
            signature = _file_signature(st)
            if not stat.S_ISREG(st.st_mode):
                return signature, refuse_all("not a regular file", origin)
            if st.st_size > MAX_FILE_SIZE:
                return signature, refuse_all(f"larger than {MAX_FILE_SIZE} bytes", origin)
            chunks = []
            total = 0
            while total <= MAX_FILE_SIZE:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            if total > MAX_FILE_SIZE:
                return signature, refuse_all(f"larger than {MAX_FILE_SIZE} bytes", origin)
        except OSError as e:
            return ("error", e.errno), refuse_all(f"cannot be read ({e.strerror})", origin)
        finally:
            os.close(fd)
        rules = parse(b"".join(chunks), origin)
        if st.st_mode & stat.S_IWOTH:
            rules = Rules(rules.allow, rules.deny,
                          rules.warnings + (f"{origin}: writable by others: anyone can "
                                            f"change what is served",), origin=origin)
        return signature, rules


def _file_signature(st: os.stat_result) -> _Signature:
    return ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
