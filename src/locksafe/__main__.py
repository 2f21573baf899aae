"""``python -m locksafe doctor [URL]``: the ``locksafe`` command (see :mod:`locksafe.doctor`)."""

from __future__ import annotations

import sys

from locksafe.doctor import main

if __name__ == "__main__":
    sys.exit(main())
