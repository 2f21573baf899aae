"""Every accessor of ``locksafe/_sa.py`` against the installed SQLAlchemy (and aiosqlite).

Most accessors read a private name with a default (``getattr(x, "_name", None)``), so a release
that renamed it would not raise: locksafe would quietly see "no lock", "no binds", "not
autocommit". These tests assert the *values*, so such a release fails here, loudly. The suite
runs them on the newest SQLAlchemy 2.1 (main leg) and 2.0 (compat leg) the registry has, and
on the floor ``pyproject.toml`` allows, pinned exactly (floor leg).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, event, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.orm.session import SessionTransactionState

from locksafe import _sa


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20), unique=True)


metadata = MetaData()
plain = Table("plain", metadata, Column("a", Integer), Column("b", Integer))


def test_for_update_arg_reads_and_replaces_the_lock_of_a_select() -> None:
    assert _sa.for_update_arg(select(plain)) is None
    locked = select(plain).with_for_update(nowait=True)
    arg = _sa.for_update_arg(locked)
    assert arg is not None
    assert arg.nowait is True
    replacement = _sa.ForUpdateArgWithToken.__new__(_sa.ForUpdateArgWithToken)
    replacement.__dict__.update(arg.__dict__)
    replacement.locksafe_token = ("mine",)
    _sa.set_for_update_arg(locked, replacement)
    assert _sa.for_update_arg(locked) is replacement
    assert "FOR UPDATE NOWAIT" in str(
        locked.compile(dialect=create_engine("postgresql://").dialect)
    )


def test_the_token_is_part_of_the_cache_key() -> None:
    def with_token(token: tuple[str, ...]) -> object:
        locked = select(plain).with_for_update()
        arg = _sa.ForUpdateArgWithToken.__new__(_sa.ForUpdateArgWithToken)
        arg.__dict__.update(_sa.for_update_arg(locked).__dict__)  # type: ignore[union-attr]
        arg.locksafe_token = token
        _sa.set_for_update_arg(locked, arg)
        return locked._generate_cache_key()

    assert with_token(("a",)) == with_token(("a",))
    assert with_token(("a",)) != with_token(("b",))


def test_explicit_froms_and_deannotate() -> None:
    statement = select(plain.c.a).select_from(plain)
    assert _sa.explicit_froms(statement) == (plain,)
    assert _sa.explicit_froms(select(plain.c.a)) == ()
    annotated = select(Item).get_final_froms()[0]
    assert _sa.deannotate(annotated) is Item.__table__


def test_orm_entity_mapper() -> None:
    assert _sa.orm_entity_mapper(select(Item)).class_ is Item
    assert _sa.orm_entity_mapper(select(plain)) is None


def test_table_prefixes_and_result_column_names() -> None:
    temporary = Table("t", MetaData(), Column("x", Integer), prefixes=["TEMPORARY"])
    assert _sa.table_prefixes(temporary) == ("TEMPORARY",)
    assert _sa.table_prefixes(plain) == ()
    compiled = select(plain.c.b, plain.c.a).compile()
    assert _sa.result_column_names(compiled) == ["b", "a"]


def test_is_autocommit_isolation_sees_the_engine_and_the_connection() -> None:
    assert callable(getattr(Connection, "_is_autocommit_isolation", None))
    with create_engine("sqlite://").connect() as conn:
        assert _sa.is_autocommit_isolation(conn) is False
        conn.execution_options(isolation_level="AUTOCOMMIT")
        assert _sa.is_autocommit_isolation(conn) is True
    engine = create_engine("sqlite://", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        assert conn.get_execution_options().get("isolation_level") is None  # why it is needed
        assert _sa.is_autocommit_isolation(conn) is True


def test_is_server_side_reads_the_context() -> None:
    engine = create_engine("sqlite://")
    seen: list[bool] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        assert hasattr(context, "_is_server_side")
        seen.append(_sa.is_server_side(context))

    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert seen == [False]


def test_session_binds() -> None:
    one, two = create_engine("sqlite://"), create_engine("sqlite://")
    session = Session(binds={Item: one, plain: two, Base: one})
    assert {id(bind) for bind in _sa.session_binds(session)} == {id(one), id(two)}
    assert len(_sa.session_binds(session)) == 2
    assert _sa.session_binds(Session()) == []


def test_transaction_state_connections_and_rollback_exception(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Item(id=1, name="x"))
        session.commit()
        transaction = session.begin()
        assert _sa.session_transaction_state(transaction) is SessionTransactionState.ACTIVE
        assert _sa.transaction_connections(transaction) == []
        conn = session.connection()
        assert _sa.transaction_connections(transaction) == [conn]
        session.add(Item(id=2, name="x"))  # the unique name: the flush fails
        with pytest.raises(IntegrityError):
            session.flush()
        assert isinstance(_sa.rollback_exception(transaction), IntegrityError)
        session.rollback()
        assert _sa.session_transaction_state(transaction) is SessionTransactionState.CLOSED


def test_aiosqlite_driver_connection_and_worker_thread() -> None:
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> tuple[object, object]:
        engine = create_async_engine("sqlite+aiosqlite://")
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver = _sa.adapted_driver_connection(raw.dbapi_connection)
                awaitable = _sa.run_in_aiosqlite_thread(driver, lambda c: type(c))
                assert awaitable is not None
                return driver, await awaitable
        finally:
            await engine.dispose()

    driver, kind = asyncio.run(main())
    assert type(driver).__module__.startswith("aiosqlite")
    assert kind is sqlite3.Connection
    assert _sa.adapted_driver_connection(sqlite3.connect(":memory:")) is None
    assert _sa.run_in_aiosqlite_thread(sqlite3.connect(":memory:"), print) is None


@pytest.mark.parametrize(
    ("name", "version", "mariadb", "skip_locked"),
    [("mariadb", (10, 5, 0), True, False), ("mariadb", (10, 6, 0), True, True),
     ("mysql", (8, 0, 1), False, True), ("mysql", (5, 7, 0), False, False)],
)
def test_prime_mysql_dialect(
    name: str, version: tuple[int, ...], mariadb: bool, skip_locked: bool
) -> None:
    from sqlalchemy.engine import make_url

    from locksafe import lock_capabilities

    dialect = make_url(f"{name}://").get_dialect()()
    suffix = "-MariaDB-log" if mariadb else "-log"
    _sa.prime_mysql_dialect(dialect, ".".join(map(str, version)) + suffix)
    assert dialect.server_version_info == version
    assert dialect.is_mariadb is mariadb
    assert dialect.supports_for_update_of is (not mariadb and version >= (8,))
    assert lock_capabilities(dialect).skip_locked is skip_locked
