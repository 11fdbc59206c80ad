"""Server configuration: one frozen record built by the command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional

from .options import Limits, MAX_BLKSIZE

__all__ = ["Config"]


@dataclass(frozen=True)
class Config:
    root: str = "/tftpboot"                 # --root: read root for relative names
    write_dir: Optional[str] = None         # -d: WRQ destination for relative names
    allow_write: bool = False               # -n
    port: Optional[int] = None              # -p: standalone mode
    address: Optional[str] = None           # --address
    max_threads: int = 256                  # -c
    queue_limit: int = 1024                 # --queue
    refused: FrozenSet[str] = frozenset()   # -r OPTION ...
    timeout: float = 1.0                    # -t: initial retransmission timeout
    max_timeouts: int = 6                   # -x
    max_blksize: int = MAX_BLKSIZE          # -z
    max_windowsize: int = 64                # --max-windowsize
    verbose: bool = False                   # -v
    log_address: bool = False               # -i
    socket_debug: bool = False              # -s
    user: str = "nobody"                    # --user
    idle_timeout: float = 60.0              # --idle-timeout (inetd mode)
    access_file: str = "/etc/tftpaccess.ctl"
    daemon: bool = False
    pidfile: str = "/run/tftpd.pid"
    log_file: Optional[str] = None         # --log-file (reopened on SIGHUP)

    @property
    def limits(self) -> Limits:
        return Limits(max_blksize=self.max_blksize,
                      max_windowsize=self.max_windowsize,
                      refused=self.refused)

    @property
    def write_root(self) -> str:
        return self.write_dir or self.root
