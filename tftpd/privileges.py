"""Running as the configured user (SPEC 5, "Privileges").

Started as root, tftpd binds its socket first and then becomes ``--user``
(default ``nobody``): no supplementary groups, the user's primary group, the
user's uid (real, effective and saved), and then a check that root cannot be
regained.  If any step fails the server must not serve.  ``--user root`` keeps
root (not recommended).  Started as any other user, tftpd serves as that user.
"""

from __future__ import annotations

import os
import pwd

from .record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence

__all__ = ["PrivilegeError", "Identity", "lookup", "drop", "verify", "preload", "PRELOAD"]

# Modules that tftpd imports inside functions after the drop, and what needs
# them.  The interpreter's own files need not be readable by the server's user
# (a Python under /root, a 0700 virtual environment), so they are imported
# while still root; only those that will be needed, since each costs every
# inetd start its import time.  (A test checks that every import inside a
# function is listed here, made at some module's top level, or made before
# the drop.)
PRELOAD = {
    "ctypes": "processes",       # main._die_with: each further serving process (--processes)
    "tftpd.spread": "processes",  # main and Server: requests passed between the processes
    "mmap": "big blocks",        # files.MappedSource: a download at blksize >= 32768
}


class PrivilegeError(Exception):
    """The server cannot run as the configured user: it must not serve."""


class Identity(Frozen):
    __slots__ = ("name", "uid", "gid")
    name: str
    uid: int
    gid: int

    def __init__(self, name: str, uid: int, gid: int) -> None:
        self._init(name, uid, gid)


def lookup(name: str) -> Identity:
    """The user named by ``--user`` (a name, or a numeric uid)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        try:
            if not name.isdigit():
                raise KeyError(name)
            pw = pwd.getpwuid(int(name))
        except (KeyError, OverflowError):
            raise PrivilegeError(f"unknown user '{name}'") from None
    return Identity(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def drop(user: str, needs: Sequence[str] = ()) -> str:
    """Become ``user`` if running as root; return a line saying who we are.

    ``needs`` says what the server will do after the drop (the values of
    ``PRELOAD``): the modules that needs are imported first.  Raises
    ``PrivilegeError`` if the user is unknown or any step fails.
    """
    if os.geteuid() != 0:
        uid = os.geteuid()
        return f"running as {_name(uid)} (uid {uid}, not started as root)"
    who = lookup(user)
    if who.uid == 0:
        return "running as root (--user root): not recommended"
    preload(needs)
    try:
        os.setgroups([])
        os.setgid(who.gid)
        os.setuid(who.uid)
    except OSError as e:
        raise PrivilegeError(f"cannot become user '{who.name}': {e.strerror or e}")
    verify(who)
    return f"running as {who.name} (uid {who.uid}, gid {who.gid}, no supplementary groups)"


def preload(needs: Sequence[str]) -> None:
    """Import now, before the switch, the ``PRELOAD`` modules that ``needs`` need."""
    for name, need in PRELOAD.items():
        if need in needs:
            __import__(name)


def verify(who: Identity) -> None:
    """Check that the drop to ``who`` took and cannot be undone."""
    if os.getresuid() != (who.uid,) * 3:
        raise PrivilegeError(f"uid is {os.getresuid()} after switching to '{who.name}'")
    if os.getresgid() != (who.gid,) * 3:
        raise PrivilegeError(f"gid is {os.getresgid()} after switching to '{who.name}'")
    if os.getgroups() not in ([], [who.gid]):
        raise PrivilegeError(f"supplementary groups {os.getgroups()} remain")
    for regain in (os.setuid, os.seteuid):
        try:
            regain(0)
        except OSError:
            continue
        raise PrivilegeError("root privileges could be regained after the switch")
    if who.gid != 0:
        try:
            os.setgid(0)
        except OSError:
            pass
        else:
            raise PrivilegeError("group root could be regained after the switch")
