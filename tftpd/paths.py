"""From a requested file name to the real path that every decision is made on.

SPEC section 3: a name starting with ``/`` is absolute; any other name is taken
under a base directory (the read root for RRQ, the ``-d`` directory for WRQ).
The path is normalised lexically (``//``, ``.``, ``..``) and then its symlinks
are resolved; access is decided on that real path, and the file opened is
checked to be that path.
"""

from __future__ import annotations

import os
import posixpath
import sys

__all__ = ["lexical", "real", "within", "display"]

# os.fsdecode() without its Python-level look-ups on every request
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
_normpath = posixpath.normpath


def lexical(name: bytes, base: str) -> str:
    """The absolute, normalised path a name stands for (no file system access).

    Bytes that are not UTF-8 survive as surrogate escapes, so the path names
    exactly the file the client asked for.
    """
    text = name.decode(_FS_ENCODING, _FS_ERRORS)
    if not text.startswith("/"):
        text = base.rstrip("/") + "/" + text
    path = _normpath(text)
    if path.startswith("//"):          # POSIX keeps a leading '//'; we do not
        path = "/" + path.lstrip("/")
    return path


def real(path: str) -> str:
    """Resolve every symlink of an absolute normalised path.

    A missing final component (a WRQ target not created yet) stays as the real
    directory plus the name; a dangling symlink resolves to where it points.
    """
    return os.path.realpath(path)


def within(path: str, root: str) -> bool:
    """Whole-component containment: /tftp does not contain /tftpboot."""
    if root == "/":
        return path.startswith("/")
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def display(name: bytes, limit: int = 200) -> str:
    """A file name safe to put in a log line."""
    text = name[:limit].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(name) > limit else "")
