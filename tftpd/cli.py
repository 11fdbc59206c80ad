"""Command line: one flag table feeds the parser, the config and ``--help``.

AIX flags keep their getopt form (``-c 10``, ``-c10``, ``-nv``); long options
extend them.  Every bad value gets one line naming the flag and the value, the
usage, and exit status 2.
"""

from __future__ import annotations

import os
import sys

from . import __version__
from .config import Config
from .options import KNOWN_OPTIONS, MAX_BLKSIZE, MIN_BLKSIZE
from .record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

__all__ = ["FLAGS", "Flag", "UsageError", "getopt", "parse_args", "usage", "help_text"]


class UsageError(Exception):
    """A bad command line; the message names the flag and the value."""


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value, 10)
        except ValueError:
            raise UsageError(f"invalid value '{value}' (expected an integer from {lo} to {hi})")
        if not lo <= n <= hi:
            raise UsageError(f"value '{value}' out of range (expected {lo} to {hi})")
        return n
    return parse


def _seconds(lo: float, hi: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise UsageError(f"invalid value '{value}' (expected seconds from {lo:g} to {hi:g})")
        if not lo <= x <= hi:      # also refuses nan
            raise UsageError(f"value '{value}' out of range (expected {lo:g} to {hi:g} seconds)")
        return x
    return parse


def _directory(value: str) -> str:
    if not value:
        raise UsageError("empty directory name")
    if not os.path.isdir(value):
        raise UsageError(f"directory '{value}' does not exist")
    return os.path.abspath(value)


def _option(value: str) -> str:
    name = value.lower()
    if name not in KNOWN_OPTIONS:
        raise UsageError(f"unknown TFTP option '{value}' (known: {', '.join(KNOWN_OPTIONS)})")
    return name


def _address(value: str) -> str:
    try:
        import ipaddress        # only with --address: inetd starts skip it
        ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        raise UsageError(f"invalid address '{value}' (expected an IPv4 or IPv6 address)")
    return value


def _text(value: str) -> str:
    if not value:
        raise UsageError("empty value")
    return value


class Flag(Frozen):
    __slots__ = ("short", "long", "metavar", "dest", "help", "parse", "repeat")
    short: Optional[str]
    long: Optional[str]
    metavar: Optional[str]          # None: a switch without a value
    dest: str
    help: str
    parse: Optional[Callable[[str], Any]]
    repeat: bool                    # values collect into a frozenset

    def __init__(self, short: Optional[str], long: Optional[str], metavar: Optional[str],
                 dest: str, help: str, parse: Optional[Callable[[str], Any]] = None,
                 repeat: bool = False) -> None:
        self._init(short, long, metavar, dest, help, parse, repeat)

    @property
    def name(self) -> str:
        return f"-{self.short}" if self.short else f"--{self.long}"


FLAGS: Sequence[Flag] = (
    Flag("c", None, "N", "max_threads",
         "maximum concurrent transfer threads (default 256)", _int(1, 10000)),
    Flag("n", None, None, "allow_write", "allow write requests (WRQ): clients may create files"),
    Flag("p", None, "PORT", "port", "standalone mode on PORT (0: any free port)", _int(0, 65535)),
    Flag("r", None, "OPTION", "refused",
         "do not negotiate OPTION (blksize, tsize, timeout, windowsize, rollover); repeatable",
         _option, repeat=True),
    Flag("t", None, "SECONDS", "timeout",
         "initial retransmission timeout (default 1; fractions allowed)", _seconds(0.01, 255)),
    Flag("x", None, "N", "max_timeouts",
         "timeouts waiting for one datagram before a transfer is abandoned (default 6)",
         _int(1, 100)),
    Flag("z", None, "SIZE", "max_blksize",
         f"largest blksize accepted (default {MAX_BLKSIZE})", _int(MIN_BLKSIZE, MAX_BLKSIZE)),
    Flag("v", None, None, "verbose", "log every successful transfer"),
    Flag("i", None, None, "log_address", "put the client's address into error log lines"),
    Flag("s", None, None, "socket_debug", "socket-level debugging (SO_DEBUG, packet trace)"),
    Flag("d", None, "DIR", "write_dir",
         "directory for write requests with a relative file name", _directory),
    Flag(None, "root", "DIR", "root", "read root for relative file names (default /tftpboot)",
         _directory),
    Flag(None, "access-file", "FILE", "access_file",
         "access control file (default /etc/tftpaccess.ctl)", _text),
    Flag(None, "user", "NAME", "user",
         "user to run as when started as root (default nobody; root: stay root, not recommended)",
         _text),
    Flag(None, "address", "ADDR", "address", "bind address in standalone mode (default: all)",
         _address),
    Flag(None, "idle-timeout", "SECONDS", "idle_timeout",
         "inetd mode: exit after this long with nothing to do (default 60)",
         _seconds(0, 86400)),
    Flag(None, "max-windowsize", "N", "max_windowsize",
         "largest RFC 7440 windowsize granted (default 64)", _int(1, 32768)),
    Flag(None, "queue", "N", "queue_limit",
         "requests that may wait for a free worker (default 1024)", _int(1, 100000)),
    Flag(None, "processes", "N", "processes",
         "with -p: serving processes, each with up to -c transfers; the main one reads "
         "the port and passes requests to the least busy (default: four per CPU, at most 16)",
         _int(1, 64)),
    Flag(None, "reread", None, "reread",
         "read every file at every request: keep no small file's contents in memory (for a "
         "file system whose time stamps do not change when a file does)"),
    Flag(None, "daemon", None, "daemon", "with -p: detach and run in the background"),
    Flag(None, "pidfile", "FILE", "pidfile", "PID lock file for --daemon (default /run/tftpd.pid)",
         _text),
    Flag(None, "log-file", "FILE", "log_file",
         "also log to FILE (appended; reopened on SIGHUP)", _text),
    Flag(None, "check", None, "check",
         "check PATH... (after the options) against the access file: print allowed or "
         "denied and the deciding rule; exit 0 if all are allowed, 1 otherwise"),
    Flag(None, "help", None, "help", "show this help and exit"),
    Flag(None, "version", None, "version", "show the version and exit"),
)

_BY_NAME: Dict[str, Flag] = {f.name: f for f in FLAGS}
_SHORT: Dict[str, Flag] = {f.short: f for f in FLAGS if f.short}
_LONG: Dict[str, Flag] = {f.long: f for f in FLAGS if f.long}


def _long(name: str) -> Flag:
    """The long option a name stands for: itself, or the one it is a prefix of."""
    flag = _LONG.get(name)
    if flag is not None:
        return flag
    matches = [f for long, f in _LONG.items() if long.startswith(name)]
    if not matches:
        raise UsageError(f"--{name}: unknown option")
    if len(matches) > 1:
        raise UsageError(f"--{name}: ambiguous option")
    return matches[0]


def getopt(argv: Sequence[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """``getopt.getopt`` over the flag table, without the getopt module (it
    imports gettext and re: 2 ms of every inetd start); a test holds the two
    to the same results.

    Short flags cluster (``-nv``) and take a value attached (``-c10``) or as
    the next argument; long options take ``--name=value`` or ``--name value``
    and may be shortened to a unique prefix.  ``--`` ends the options, and so
    does the first argument that is not one (``-`` included).  Returns the
    (``-x`` or ``--name``, value) pairs and the remaining arguments.
    """
    opts: List[Tuple[str, str]] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            flag = _long(name)
            if flag.metavar is None and eq:
                raise UsageError(f"--{flag.long}: takes no value")
            if flag.metavar is not None and not eq:
                if i == len(argv):
                    raise UsageError(f"--{flag.long}: missing value")
                value = argv[i]
                i += 1
            opts.append((f"--{flag.long}", value))
            continue
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            short = _SHORT.get(letter)
            if short is None:
                raise UsageError(f"-{letter}: unknown option")
            if short.metavar is None:
                opts.append((f"-{letter}", ""))
                continue
            if not letters:
                if i == len(argv):
                    raise UsageError(f"-{letter}: missing value")
                letters = argv[i]
                i += 1
            opts.append((f"-{letter}", letters))
            letters = ""
    return opts, list(argv[i:])


def usage() -> str:
    parts = []
    for f in FLAGS:
        if f.dest in ("help", "version"):
            continue
        parts.append(f"[{f.name}{' ' + f.metavar if f.metavar else ''}]")
    return "usage: tftpd " + " ".join(parts)


def help_text() -> str:
    lines = [usage(), "", "TFTP server (AIX tftpd compatible).", ""]
    for f in FLAGS:
        spec = f.name + (f" {f.metavar}" if f.metavar else "")
        lines.append(f"  {spec:<24} {f.help}")
    return "\n".join(lines) + "\n"


class Parsed:
    """The command line: a configuration, or a request for help, version or --check."""

    __slots__ = ("config", "help", "version", "check", "paths")

    def __init__(self, config: Config, help: bool = False, version: bool = False,
                 check: bool = False, paths: Sequence[str] = ()) -> None:
        self.config = config
        self.help = help
        self.version = version
        self.check = check              # --check PATH...
        self.paths = paths


def parse_args(argv: List[str]) -> Parsed:
    opts, rest = getopt(argv)
    check = any(opt == "--check" for opt, _ in opts)
    if rest and not check:
        raise UsageError(f"unexpected argument '{rest[0]}' (use --root DIR for the read root)")
    values: Dict[str, Any] = {}
    refused: Set[str] = set()
    flags = set()
    for opt, value in opts:
        flag = _BY_NAME[opt]
        if flag.metavar is None:
            flags.add(flag.dest)
            continue
        assert flag.parse is not None
        try:
            parsed = flag.parse(value)
        except UsageError as e:
            raise UsageError(f"{opt}: {e}")
        if flag.repeat:
            refused.add(parsed)
        else:
            values[flag.dest] = parsed
    if "help" in flags or "version" in flags:
        return Parsed(Config(), help="help" in flags, version="version" in flags)
    for dest in ("allow_write", "verbose", "log_address", "socket_debug", "daemon", "reread"):
        if dest in flags:
            values[dest] = True
    if refused:
        values["refused"] = frozenset(refused)
    config = Config().replace(**values)
    if check:
        if not rest:
            raise UsageError("--check: needs at least one PATH to check")
        return Parsed(config, check=True, paths=list(rest))
    # (inetd mode checks it after its socket: a tftpd typed at a terminal
    # without -p hears first that it needs -p)
    if config.port is not None and "root" not in values:
        check_default_root(config)
    if config.daemon and config.port is None:
        raise UsageError("--daemon: needs -p PORT")
    return Parsed(config)


def check_default_root(config: Config) -> None:
    if not os.path.isdir(config.root):
        raise UsageError(f"--root: directory '{config.root}' (the default) does not exist")


def version_text() -> str:
    return f"tftpd {__version__}\n"


def printable(text: str) -> str:
    """A value as it can appear in one line: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: str) -> int:
    sys.stderr.write(f"tftpd: {printable(message)}\n{usage()}\n")
    return 2
