"""``tftpd --check PATH...``: review a tftpaccess.ctl before deploying it.

Each PATH is taken as a client would send it in a read request (absolute, or
relative to ``--root``), normalised and resolved to its real path, and decided
by the access file named by ``--access-file``.  One line per path on standard
output: ``allowed`` or ``denied``, the path (and its real path if different),
and the rule line that decided.  The access file's own warnings and what it
enforces go to standard error.  Exit status 0 if every path is allowed, 1
otherwise.
"""

from __future__ import annotations

import os
import stat
import sys

from . import paths
from .access import AccessTable, Decision
from .log import INFO, Formatter, StreamHandler, getLogger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Sequence, TextIO, Tuple

    from .config import Config

__all__ = ["check", "explain"]


def _show(path: str) -> str:
    return paths.display(os.fsencode(path), limit=4096)


def explain(table: AccessTable, name: str, root: str) -> Tuple[Decision, str]:
    """The decision for one name and the line that reports it."""
    lexical = paths.lexical(os.fsencode(name), root)
    try:
        real = paths.real(lexical)
    except ValueError:
        real = lexical
    decision = table.decide(real)
    shown = _show(lexical) + (f" -> {_show(real)}" if real != lexical else "")
    detail = decision.rule.show() if decision.rule else decision.reason
    line = f"{'allowed' if decision.allowed else 'denied'} {shown} ({detail})"
    note = _file_note(real) if decision.allowed else None
    if note:
        line += f"\n  note: {note}"
    return decision, line


def _file_note(path: str) -> Optional[str]:
    """Why a read request would still be refused by the file rules (SPEC 3.5)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "no such file (a read request gets 'File not found')"
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "a directory: covers the files below it, but is not served itself"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file: read requests are refused"
    if not st.st_mode & stat.S_IROTH:
        return "not readable by others (o+r): read requests are refused"
    return None


def check(config: Config, names: Sequence[str], out: TextIO = sys.stdout,
          err: TextIO = sys.stderr) -> int:
    log = getLogger("tftpd.check")
    log.setLevel(INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = StreamHandler(err)
    handler.setFormatter(Formatter("tftpd: %(message)s"))
    log.addHandler(handler)
    try:
        roots = [config.root] + ([config.write_dir] if config.write_dir else [])
        table = AccessTable(config.access_file, roots, log=log)
        table.rules()
        ok = True
        for name in names:
            decision, line = explain(table, name, config.root)
            out.write(line + "\n")
            ok = ok and decision.allowed
        out.flush()
        return 0 if ok else 1
    finally:
        log.removeHandler(handler)
