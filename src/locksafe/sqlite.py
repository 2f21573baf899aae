"""SQLite set-up for several writers: :func:`configure` and :func:`immediate`.

The public home of the two; everything about SQLite lives in ``locksafe.dialects.sqlite``
(this module only re-exports).

>>> import locksafe.sqlite
>>> callable(locksafe.sqlite.configure)
True

:func:`configure`'s choices, as types (``Literal``):

>>> import typing
>>> typing.get_args(locksafe.sqlite.Begin)
('first_write', 'deferred', 'immediate', 'exclusive')
>>> typing.get_args(locksafe.sqlite.JournalMode)
('wal', 'delete', 'truncate', 'persist', 'memory', 'off')
"""

from locksafe.dialects.sqlite.configure import Begin, JournalMode, configure, immediate

__all__ = ["Begin", "JournalMode", "configure", "immediate"]
