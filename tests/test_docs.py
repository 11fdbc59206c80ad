"""The documentation keeps up with the code: every flag the parser knows is in
the man page and the README, and the man page renders without warnings."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import ROOT, need
from tftpd.cli import FLAGS

MAN = (ROOT / "man" / "tftpd.8").read_text()
README = (ROOT / "README.md").read_text()


def _man_text() -> str:
    """The man page source with roff escapes for '-' undone."""
    return MAN.replace("\\-", "-")


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f.name)
def test_every_flag_is_in_the_man_page(flag) -> None:
    text = _man_text()
    assert re.search(rf"(^|[\s\[(]){re.escape(flag.name)}\b", text, re.M), \
        f"{flag.name} is not documented in man/tftpd.8"


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.dest not in ("help", "version")],
                         ids=lambda f: f.name)
def test_every_flag_is_in_the_readme(flag) -> None:
    assert f"`{flag.name}" in README, f"{flag.name} is not in README.md's flag table"


def test_man_page_renders_without_warnings() -> None:
    man = need("man")
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MANROFFSEQ="")
    proc = subprocess.run([man, "--warnings", "-l", str(ROOT / "man" / "tftpd.8")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    out = proc.stdout
    for section in ("SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXAMPLES", "COMPATIBILITY"):
        assert section in out


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tools/run-tests" in ci
    assert "tools/run-tests" in README
