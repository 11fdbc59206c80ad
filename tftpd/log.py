"""Logging: syslog (facility daemon) where /dev/log exists, stderr in the foreground."""

from __future__ import annotations

import logging
import logging.handlers
import os

__all__ = ["setup"]

SYSLOG_SOCKET = "/dev/log"


def setup(stderr: bool, debug: bool = False) -> logging.Logger:
    log = logging.getLogger("tftpd")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    if stderr:
        h: logging.Handler = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s tftpd[%(process)d]: %(message)s",
                                         "%Y-%m-%d %H:%M:%S"))
        log.addHandler(h)
    if os.path.exists(SYSLOG_SOCKET):
        try:
            sh = logging.handlers.SysLogHandler(
                SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            pass
        else:
            sh.setFormatter(logging.Formatter("tftpd[%(process)d]: %(message)s"))
            log.addHandler(sh)
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log
