"""Server configuration: one frozen record built by the command line."""

from __future__ import annotations

from .options import MAX_BLKSIZE, Limits
from .record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, FrozenSet, Optional

__all__ = ["Config"]


class Config(Frozen):
    __slots__ = ("root", "write_dir", "allow_write", "port", "address", "max_threads",
                 "queue_limit", "refused", "timeout", "max_timeouts", "max_blksize",
                 "max_windowsize", "verbose", "log_address", "socket_debug", "user",
                 "idle_timeout", "access_file", "daemon", "pidfile", "log_file", "processes",
                 "reread")
    root: str                   # --root: read root for relative names
    write_dir: Optional[str]    # -d: WRQ destination for relative names
    allow_write: bool           # -n
    port: Optional[int]         # -p: standalone mode
    address: Optional[str]      # --address
    max_threads: int            # -c
    queue_limit: int            # --queue
    refused: FrozenSet[str]     # -r OPTION ...
    timeout: float              # -t: initial retransmission timeout
    max_timeouts: int           # -x
    max_blksize: int            # -z
    max_windowsize: int         # --max-windowsize
    verbose: bool               # -v
    log_address: bool           # -i
    socket_debug: bool          # -s
    user: str                   # --user
    idle_timeout: float         # --idle-timeout (inetd mode)
    access_file: str
    daemon: bool
    pidfile: str
    log_file: Optional[str]     # --log-file (reopened on SIGHUP)
    processes: int              # --processes (standalone); 0: four per CPU, at most 16
    reread: bool                # --reread: keep no small file's contents in memory

    def __init__(self, root: str = "/tftpboot", write_dir: Optional[str] = None,
                 allow_write: bool = False, port: Optional[int] = None,
                 address: Optional[str] = None, max_threads: int = 256,
                 queue_limit: int = 1024, refused: FrozenSet[str] = frozenset(),
                 timeout: float = 1.0, max_timeouts: int = 6, max_blksize: int = MAX_BLKSIZE,
                 max_windowsize: int = 64, verbose: bool = False, log_address: bool = False,
                 socket_debug: bool = False, user: str = "nobody", idle_timeout: float = 60.0,
                 access_file: str = "/etc/tftpaccess.ctl", daemon: bool = False,
                 pidfile: str = "/run/tftpd.pid", log_file: Optional[str] = None,
                 processes: int = 0, reread: bool = False) -> None:
        self._init(root, write_dir, allow_write, port, address, max_threads, queue_limit,
                   refused, timeout, max_timeouts, max_blksize, max_windowsize, verbose,
                   log_address, socket_debug, user, idle_timeout, access_file, daemon,
                   pidfile, log_file, processes, reread)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return Config(**{**self._asdict(), **changes})

    @property
    def limits(self) -> Limits:
        return Limits(max_blksize=self.max_blksize,
                      max_windowsize=self.max_windowsize,
                      refused=self.refused)

    @property
    def write_root(self) -> str:
        return self.write_dir or self.root
