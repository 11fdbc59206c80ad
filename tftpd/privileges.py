"""Running as the configured user (SPEC 5, "Privileges").

Started as root, tftpd binds its socket first and then becomes ``--user``
(default ``nobody``): no supplementary groups, the user's primary group, the
user's uid (real, effective and saved), and then a check that root cannot be
regained.  If any step fails the server must not serve.  ``--user root`` keeps
root (not recommended).  Started as any other user, tftpd serves as that user.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import pwd
from dataclasses import dataclass

__all__ = ["PrivilegeError", "Identity", "lookup", "drop", "verify", "preload", "PRELOAD"]

# Modules imported lazily (inside functions) after the drop.  The interpreter's
# own files need not be readable by the server's user (a Python under /root, a
# 0700 virtual environment), so everything is imported while still root.
PRELOAD = ("tempfile", "encodings.idna")


class PrivilegeError(Exception):
    """The server cannot run as the configured user: it must not serve."""


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int


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


def drop(user: str) -> str:
    """Become ``user`` if running as root; return a line saying who we are.

    Raises ``PrivilegeError`` if the user is unknown or any step fails.
    """
    if os.geteuid() != 0:
        uid = os.geteuid()
        return f"running as {_name(uid)} (uid {uid}, not started as root)"
    who = lookup(user)
    if who.uid == 0:
        return "running as root (--user root): not recommended"
    preload()
    try:
        os.setgroups([])
        os.setgid(who.gid)
        os.setuid(who.uid)
    except OSError as e:
        raise PrivilegeError(f"cannot become user '{who.name}': {e.strerror or e}")
    verify(who)
    return f"running as {who.name} (uid {who.uid}, gid {who.gid}, no supplementary groups)"


def preload() -> None:
    """Import every tftpd module and ``PRELOAD`` now, before the switch."""
    package = __name__.rpartition(".")[0]
    here = os.path.dirname(os.path.abspath(__file__))
    names = [f"{package}.{m.name}" for m in pkgutil.iter_modules([here])
             if m.name != "__main__"]
    for name in list(PRELOAD) + names:
        importlib.import_module(name)


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
