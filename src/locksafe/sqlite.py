"""SQLite set-up for several writers: :func:`configure` and :func:`immediate`.

The public home of the two; everything about SQLite lives in :mod:`locksafe.dialects.sqlite`
(this module only re-exports).

>>> import locksafe.sqlite
>>> callable(locksafe.sqlite.configure)
True
"""

from locksafe.dialects.sqlite.configure import Begin, JournalMode, configure, immediate

__all__ = ["Begin", "JournalMode", "configure", "immediate"]
