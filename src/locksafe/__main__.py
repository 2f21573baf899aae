"""``python -m locksafe doctor [URL]``: the ``locksafe`` command (see :mod:`locksafe.doctor`)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    try:
        from locksafe.doctor import main
    except KeyboardInterrupt:  # Ctrl-C while starting: nothing was done yet
        sys.exit(130)
    sys.exit(main())
