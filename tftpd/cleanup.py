"""Start-up removal of the temporaries that interrupted uploads left behind.

An upload is written to ``.tftpd-<name>.XXXXXXXX.part`` beside its target
(files.AtomicFile) and renamed over the target only when complete.  A server
that is killed in the middle (kill -9, a crash, a power cut) cannot remove that
file; the next start does.  An entry of the read root or the ``-d`` directory
(not of their subdirectories) is removed only if all of these hold:

* its name has exactly the shape AtomicFile gives (prefix, a dot and eight
  random characters, suffix);
* it is a regular file -- ``lstat``, so a symbolic link is never followed nor
  removed -- owned by the user the server runs as;
* it was not written to for ``MIN_AGE`` seconds (its mtime), so that an
  upload still running in another instance on the same directory is left
  alone.  (A running upload reaches its file in buffered writes: one in
  another instance that stalls for longer than that loses its temporary and
  fails with an ERROR at the end; the old file is never touched.)

Every call works on a descriptor of the directory (``scandir``, ``stat`` and
``unlink`` relative to it), so nothing is reached through a path that could
change under it.
"""

from __future__ import annotations

import os
import stat
import time

from .files import TEMP_LETTERS, TEMP_PREFIX, TEMP_SUFFIX

TYPE_CHECKING = False
if TYPE_CHECKING:                   # typing stays off the start-up path
    from typing import Iterable, List, Optional, Set, Tuple

__all__ = ["MIN_AGE", "is_temporary", "sweep"]

MIN_AGE = 10.0          # seconds since the last write
_RANDOM = frozenset(TEMP_LETTERS)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def is_temporary(name: str) -> bool:
    """``.tftpd-<name>.<8 random characters>.part``, as AtomicFile names it."""
    if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
        return False
    stem = name[:-len(TEMP_SUFFIX)]
    return (len(stem) >= len(TEMP_PREFIX) + 10 and stem[-9] == "."
            and all(c in _RANDOM for c in stem[-8:]))


def sweep(directories: Iterable[str], min_age: float = MIN_AGE,
          now: Optional[float] = None) -> Tuple[List[str], List[str]]:
    """Remove the leftovers; returns (what was removed, what went wrong), as
    log lines."""
    uid = os.geteuid()
    now = time.time() if now is None else now
    removed: List[str] = []
    problems: List[str] = []
    seen: Set[Tuple[int, int]] = set()
    for directory in directories:
        try:
            fd = os.open(directory, _DIR_FLAGS)
        except OSError as e:
            problems.append(f"cannot look for leftover upload files in {directory}: "
                            f"{e.strerror or e}")
            continue
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                continue                  # -d is the read root, or a link to it
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(fd) as entries:
                names = [e.name for e in entries if is_temporary(e.name)]
            for name in names:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue              # gone meanwhile
                age = now - st.st_mtime
                if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or age < min_age:
                    continue
                shown = os.path.join(directory, name)
                try:
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    problems.append(f"cannot remove leftover upload file {shown}: "
                                    f"{e.strerror or e}")
                    continue
                removed.append(f"removed {shown}, left by an interrupted upload "
                               f"({st.st_size} bytes, last written {age:.0f} s ago)")
        except OSError as e:
            problems.append(f"cannot look for leftover upload files in {directory}: "
                            f"{e.strerror or e}")
        finally:
            os.close(fd)
    return removed, problems
