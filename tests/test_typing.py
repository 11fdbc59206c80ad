"""The package passes ``mypy --strict`` (STYLE.md: type hints everywhere).

mypy is not a dependency of tftpd or of its tests: where it is not installed
this is skipped.  Ignores in the package are for python-daemon and lockfile,
which ship no types.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


def test_mypy_strict() -> None:
    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "tftpd"], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

