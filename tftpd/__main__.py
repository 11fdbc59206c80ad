"""``python3 -m tftpd``, or the fast inetd start ``python3 -I -S /path/to/tftpd``.

Run as a directory (no ``site``: ~15 ms less per inetd start), the package
directory itself is ``sys.path[0]``; its parent must be there instead.
"""
import sys

if __package__:
    from .main import main
else:
    sys.path[0] = sys.path[0].rstrip("/").rpartition("/")[0] or "/"
    from tftpd.main import main

sys.exit(main())
