"""``python3 -m tftpd``, or a fast inetd start without ``site`` and ``runpy``:
``python3 -I -S /path/to/tftpd`` (the package directory) or
``python3 -I -S /path/to/tftpd/__main__.py`` (this file, the fastest).

Run as a directory or a file, this module is no part of a package: the
directory that holds the package goes first on ``sys.path`` instead of the
package directory itself (whose module names must not shadow the library's).
"""
import sys

if __package__:
    from .main import main
else:
    import os.path
    _pkg = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _pkg:
        del sys.path[0]
    sys.path.insert(0, os.path.dirname(_pkg))
    from tftpd.main import main

sys.exit(main())
