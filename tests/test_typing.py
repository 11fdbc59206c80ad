"""The package passes ``mypy --strict`` (STYLE.md: type hints everywhere).

mypy is a test dependency (setup.py's "test" extra, installed by
tools/setup-tests); a missing mypy skips this only outside CI.  Ignores in the
package are for python-daemon and lockfile, which ship no types.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import IN_CI, ROOT


def test_mypy_strict() -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("mypy is not installed (tools/setup-tests installs it)")
        pytest.skip("mypy is not installed (tools/setup-tests installs it)")
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "tftpd"], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

