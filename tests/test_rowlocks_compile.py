"""with_row_locks / plan_row_locks / lock_capabilities without a server: what is rendered for
every server version locksafe distinguishes, and what is refused.

Servers that the test run does not start (MySQL 5.7 / 8.0, MariaDB 10.2 / 10.3 / 10.6, Oracle,
SQL Server) are checked here at compile level, with a dialect object set up as SQLAlchemy sets
it up on its first connection (:func:`offline_dialect`). PostgreSQL 15 and MariaDB 10.11 are
checked here too, and their clauses are executed for real in ``test_rowlocks_real.py``.

The expected clauses and the capability table are written out independently of the library
(from the issue's capability table and the servers' manuals), not computed by it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    column,
    delete,
    insert,
    select,
    table,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Query, mapped_column
from sqlalchemy.sql.selectable import Select

import locksafe
from harness.options import option_combinations
from locksafe import (
    LockDegradedWarning,
    UnsupportedLockOption,
    binds,
    lock_capabilities,
    plan_row_locks,
    with_row_locks,
)

# -- an "offline" dialect: initialised as on first connect, without a server ------------------


def offline_dialect(flavour: str, version: tuple[int, ...] | None = None) -> Dialect:
    """The library's offline dialect, checked: MySQL / MariaDB really are the flavour asked."""
    dialect = binds.offline_dialect(flavour, version)
    if flavour in ("mysql", "mariadb") and version is not None:
        assert getattr(dialect, "is_mariadb", False) is (flavour == "mariadb")
        assert dialect.server_version_info == version
    return dialect


# -- the servers, and what the issue says each one can do ------------------------------------


@dataclass(frozen=True)
class Server:
    label: str
    flavour: str
    version: tuple[int, ...] | None
    #: Options the server supports (the issue's capability table).
    supported: frozenset[str]
    #: How a shared lock is spelled there ("" = none).
    share: str

    def dialect(self) -> Dialect:
        return offline_dialect(self.flavour, self.version)


ALL = frozenset({"read", "key_share", "nowait", "skip_locked", "of"})
SERVERS = (
    Server("PostgreSQL 15", "postgresql", (15, 4), ALL, "FOR SHARE"),
    Server("MySQL 5.7", "mysql", (5, 7, 44), frozenset({"read"}), "LOCK IN SHARE MODE"),
    Server("MySQL 8.0.0", "mysql", (8, 0, 0), frozenset({"read"}), "LOCK IN SHARE MODE"),
    Server(
        "MySQL 8.0.1",
        "mysql",
        (8, 0, 1),
        frozenset({"read", "nowait", "skip_locked", "of"}),
        "FOR SHARE",
    ),
    Server(
        "MySQL 8.0",
        "mysql",
        (8, 0, 36),
        frozenset({"read", "nowait", "skip_locked", "of"}),
        "FOR SHARE",
    ),
    Server("MariaDB 10.2", "mariadb", (10, 2, 44), frozenset({"read"}), "LOCK IN SHARE MODE"),
    Server(
        "MariaDB 10.3",
        "mariadb",
        (10, 3, 39),
        frozenset({"read", "nowait"}),
        "LOCK IN SHARE MODE",
    ),
    Server(
        "MariaDB 10.5",
        "mariadb",
        (10, 5, 27),
        frozenset({"read", "nowait"}),
        "LOCK IN SHARE MODE",
    ),
    Server(
        "MariaDB 10.6",
        "mariadb",
        (10, 6, 0),
        frozenset({"read", "nowait", "skip_locked"}),
        "LOCK IN SHARE MODE",
    ),
    Server(
        "MariaDB 10.11",
        "mariadb",
        (10, 11, 8),
        frozenset({"read", "nowait", "skip_locked"}),
        "LOCK IN SHARE MODE",
    ),
    Server("Oracle 19", "oracle", (19, 0), frozenset({"nowait", "skip_locked", "of"}), ""),
)
BY_LABEL = {server.label: server for server in SERVERS}

metadata = MetaData()
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner_id", Integer, ForeignKey("owners.id")),
    Column("state", String(20)),
)
owners = Table(
    "owners", metadata, Column("id", Integer, primary_key=True), Column("name", String(20))
)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "orm_jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(20))


def joined() -> Select[Any]:
    return select(jobs.c.id, owners.c.name).join_from(jobs, owners).where(jobs.c.id == 1)


def combinations() -> Iterator[dict[str, Any]]:
    """Every combination of options with_row_locks accepts (24)."""
    return option_combinations(jobs)


def expected_clause(server: Server, options: dict[str, Any]) -> str:
    """The clause the server's manual spells for ``options`` (all of them supported there)."""
    read, key_share = options.get("read", False), options.get("key_share", False)
    if server.flavour == "postgresql":
        clause = {
            (False, False): "FOR UPDATE",
            (True, False): "FOR SHARE",
            (False, True): "FOR NO KEY UPDATE",
            (True, True): "FOR KEY SHARE",
        }[read, key_share]
    else:
        assert not key_share
        clause = server.share if read else "FOR UPDATE"
    if options.get("of") is not None:
        # Oracle names the columns of the tables to lock; the others name the tables.
        clause += " OF jobs.id" if server.flavour == "oracle" else " OF jobs"
    if options.get("nowait"):
        clause += " NOWAIT"
    if options.get("skip_locked"):
        clause += " SKIP LOCKED"
    return clause


def degraded(server: Server, options: dict[str, Any]) -> dict[str, Any]:
    """What the issue says an unsupported request becomes: a lock at least as strong."""
    result = {name: value for name, value in options.items() if name in server.supported}
    return result


def rendered_clause(stmt: Any, dialect: Dialect) -> str:
    """The locking clause at the end of ``stmt`` compiled for ``dialect``."""
    sql = " ".join(str(stmt.compile(dialect=dialect)).split())
    base = " ".join(str(joined().compile(dialect=dialect)).split())
    assert sql.startswith(base), (sql, base)
    return sql[len(base) :].strip()


def unsupported_names(server: Server, options: dict[str, Any]) -> set[str]:
    return {name for name in options if name not in server.supported}


# -- lock_capabilities ------------------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS, ids=[s.label for s in SERVERS])
def test_capabilities_follow_the_issue_table(server: Server) -> None:
    caps = lock_capabilities(server.dialect())
    assert caps.mechanism == "row"
    assert caps.flavour == server.flavour
    assert caps.server_version == server.version
    assert caps.version_string == ".".join(map(str, server.version or ()))
    assert caps.for_update is True
    assert caps.for_share is ("read" in server.supported)
    assert caps.key_share is ("key_share" in server.supported)
    assert caps.nowait is ("nowait" in server.supported)
    assert caps.skip_locked is ("skip_locked" in server.supported)
    assert caps.of is ("of" in server.supported)
    for name in ALL:
        assert caps.supports(name) is (name in server.supported)
    assert caps.supports("no_such_option") is False
    assert caps.summary


def test_capabilities_of_sqlite_and_sql_server() -> None:
    caps = lock_capabilities(offline_dialect("sqlite"))
    assert caps.mechanism == "database"
    assert caps.flavour == "sqlite"
    assert caps.server_version is not None
    assert caps.server_version[0] == 3
    # Every request is honoured, by the (stronger) database write lock.
    assert all(caps.supports(name) for name in ALL)

    caps = lock_capabilities(offline_dialect("mssql", (16, 0)))
    assert caps.mechanism == "none"
    assert caps.flavour == "mssql"
    assert not any(caps.supports(name) for name in ALL | {"for_update"})


def test_capabilities_before_the_first_connection() -> None:
    """A MySQL dialect that has not connected does not know the server: locksafe assumes the
    oldest supported server of the family (the dialect's default flavour is MySQL)."""
    caps = lock_capabilities(offline_dialect("mysql"))
    assert caps.server_version is None
    assert caps.version_string == "unknown"
    assert (caps.flavour, caps.nowait, caps.skip_locked, caps.of) == ("mysql", False, False, False)
    # PostgreSQL's capabilities do not depend on the version.
    caps = lock_capabilities(offline_dialect("postgresql"))
    assert caps.server_version is None
    assert caps.skip_locked
    assert caps.key_share


def test_capabilities_of_an_unknown_dialect_lock_nothing() -> None:
    from sqlalchemy.engine.default import DefaultDialect

    class Exotic(DefaultDialect):
        name = "exotic"

    caps = lock_capabilities(Exotic())
    assert caps.mechanism == "none"
    with pytest.raises(UnsupportedLockOption) as info:
        plan_row_locks(Exotic(), on_unsupported="degrade")
    assert info.value.dialect == "exotic"
    with pytest.raises(UnsupportedLockOption):
        with_row_locks(select(jobs), Exotic(), on_unsupported="degrade")


def test_lock_capabilities_rejects_a_non_bind() -> None:
    with pytest.raises(TypeError, match="dialect"):
        lock_capabilities(object())


# -- rendering: every combination on every server ---------------------------------------------


@pytest.mark.parametrize("server", SERVERS, ids=[s.label for s in SERVERS])
def test_supported_combinations_render_the_documented_clause(server: Server) -> None:
    dialect = server.dialect()
    checked = 0
    for options in combinations():
        if unsupported_names(server, options):
            continue
        want = expected_clause(server, options)
        stmt = with_row_locks(joined(), dialect, **options)
        assert rendered_clause(stmt, dialect) == want, options
        plan = plan_row_locks(dialect, **options)
        assert plan.degradations == ()
        assert plan.clause == want, options
        assert want in plan.describe()
        # Planned without a bind, the statement carries the requested options unchanged
        # (Oracle's OF columns are chosen by the connection that executes it).
        if not (server.flavour == "oracle" and "of" in options):
            assert rendered_clause(with_row_locks(joined(), **options), dialect) == want
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("server", SERVERS, ids=[s.label for s in SERVERS])
def test_unsupported_options_raise_by_default(server: Server) -> None:
    dialect = server.dialect()
    raised = 0
    for options in combinations():
        missing = unsupported_names(server, options)
        if not missing:
            continue
        for call, kwargs in (
            (lambda **kw: with_row_locks(joined(), dialect, **kw), options),
            (lambda **kw: plan_row_locks(dialect, **kw), options),
            (
                lambda **kw: with_row_locks(joined(), dialect, **kw),
                {**options, "on_unsupported": "raise"},
            ),
        ):
            with pytest.raises(UnsupportedLockOption) as info:
                call(**kwargs)
            error = info.value
            assert set(error.options) == missing, options
            assert error.option in missing
            assert error.dialect == server.flavour
            assert error.server_version == server.version
            message = str(error)
            for name in missing:
                assert name in message
            assert server.flavour in message
            assert ".".join(map(str, server.version or ())) in message
        raised += 1
    if server.supported != ALL:
        assert raised > 0


@pytest.mark.parametrize("mode", ["warn", "degrade"])
@pytest.mark.parametrize("server", SERVERS, ids=[s.label for s in SERVERS])
def test_degrading_never_locks_less(server: Server, mode: str) -> None:
    """warn / degrade: an unsupported option becomes a lock at least as strong, never none:
    OF is dropped (every table in FROM is locked), key_share becomes FOR UPDATE (or the shared
    lock with read), a shared lock becomes FOR UPDATE where none exists, and SKIP LOCKED /
    NOWAIT become a plain waiting lock."""
    dialect = server.dialect()
    for options in combinations():
        missing = unsupported_names(server, options)
        want = expected_clause(server, degraded(server, options))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stmt = with_row_locks(joined(), dialect, on_unsupported=mode, **options)  # type: ignore[arg-type]
            plan = plan_row_locks(dialect, on_unsupported=mode, **options)  # type: ignore[arg-type]
        got = rendered_clause(stmt, dialect)
        assert got == want, (options, got)
        assert got.startswith("FOR ") or got.startswith("LOCK IN SHARE MODE")
        assert plan.clause == want
        assert {d.split(":")[0] for d in plan.degradations} == missing
        degradation_warnings = [w for w in caught if issubclass(w.category, LockDegradedWarning)]
        if mode == "warn" and missing:
            assert len(degradation_warnings) == 2  # one per call
            message = str(degradation_warnings[0].message)
            assert all(name in message for name in missing)
            assert ".".join(map(str, server.version or ())) in message
        else:
            assert degradation_warnings == []


def test_degradations_of_the_issue() -> None:
    """The three examples the issue spells out."""
    mariadb = BY_LABEL["MariaDB 10.11"].dialect()
    stmt = with_row_locks(joined(), mariadb, of=jobs, on_unsupported="degrade")
    assert rendered_clause(stmt, mariadb) == "FOR UPDATE"  # every table in FROM is locked

    mysql8 = BY_LABEL["MySQL 8.0"].dialect()
    stmt = with_row_locks(joined(), mysql8, key_share=True, on_unsupported="degrade")
    assert rendered_clause(stmt, mysql8) == "FOR UPDATE"
    stmt = with_row_locks(joined(), mysql8, key_share=True, read=True, on_unsupported="degrade")
    assert rendered_clause(stmt, mysql8) == "FOR SHARE"

    mysql57 = BY_LABEL["MySQL 5.7"].dialect()
    plan = plan_row_locks(mysql57, skip_locked=True, on_unsupported="degrade")
    assert plan.clause == "FOR UPDATE"
    assert plan.effective.skip_locked is False
    assert plan.requested.skip_locked is True
    assert "waited for" in plan.describe()


def test_degradation_warnings_point_at_the_caller() -> None:
    mariadb = BY_LABEL["MariaDB 10.11"].dialect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_row_locks(joined(), mariadb, of=jobs, on_unsupported="warn")
        plan_row_locks(mariadb, key_share=True, on_unsupported="warn")
    assert [w.category for w in caught] == [LockDegradedWarning, LockDegradedWarning]
    assert [w.filename for w in caught] == [__file__, __file__]


def test_oracle_has_no_shared_lock() -> None:
    dialect = BY_LABEL["Oracle 19"].dialect()
    with pytest.raises(UnsupportedLockOption) as info:
        with_row_locks(joined(), dialect, read=True)
    assert info.value.options == ("read",)
    assert info.value.dialect == "oracle"
    with pytest.warns(LockDegradedWarning, match="read"):
        stmt = with_row_locks(joined(), dialect, read=True, nowait=True, on_unsupported="warn")
    assert rendered_clause(stmt, dialect) == "FOR UPDATE NOWAIT"


def test_oracle_of_names_columns() -> None:
    """Oracle's FOR UPDATE OF takes columns; a table, an ORM entity or a column of the table
    to lock all become a column of it (SQLAlchemy would render an empty ``OF`` for a table)."""
    dialect = BY_LABEL["Oracle 19"].dialect()
    for of in (jobs, [jobs], jobs.c.id):
        stmt = with_row_locks(joined(), dialect, of=of)
        assert rendered_clause(stmt, dialect) == "FOR UPDATE OF jobs.id"
    stmt = with_row_locks(select(Job).where(Job.id == 1), dialect, of=Job, skip_locked=True)
    assert str(stmt.compile(dialect=dialect)).endswith("FOR UPDATE OF orm_jobs.id SKIP LOCKED")
    assert plan_row_locks(dialect, of=jobs).clause == "FOR UPDATE OF jobs.id"
    # Without a bind, the Oracle form is chosen when the statement is executed (see the
    # real tests); compiled directly, SQLAlchemy's own rendering is used.


@pytest.mark.parametrize("mode", ["raise", "warn", "degrade"])
def test_sql_server_always_raises(mode: str) -> None:
    """SQLAlchemy renders no FOR UPDATE on SQL Server: a locking query would run unlocked."""
    dialect = offline_dialect("mssql", (16, 0, 4095))
    plain = select(jobs).where(jobs.c.id == 1)
    assert str(plain.with_for_update().compile(dialect=dialect)) == str(
        plain.compile(dialect=dialect)
    )
    for options in combinations():
        with pytest.raises(UnsupportedLockOption) as info:
            with_row_locks(joined(), dialect, on_unsupported=mode, **options)  # type: ignore[arg-type]
        assert info.value.dialect == "mssql"
        assert info.value.server_version == (16, 0, 4095)
        assert "16.0.4095" in str(info.value)
        with pytest.raises(UnsupportedLockOption):
            plan_row_locks(dialect, on_unsupported=mode, **options)  # type: ignore[arg-type]


def test_sqlite_renders_no_clause_and_plans_the_write_lock() -> None:
    dialect = offline_dialect("sqlite")
    for options in combinations():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is degraded on SQLite
            stmt = with_row_locks(joined(), dialect, **options)
            plan = plan_row_locks(dialect, **options)
        assert rendered_clause(stmt, dialect) == ""
        assert plan.mechanism == "database"
        assert plan.clause == ""
        assert plan.degradations == ()
        description = plan.describe()
        assert "write lock" in description
        if options.get("nowait"):
            assert "failing at once" in description
        elif options.get("skip_locked"):
            assert "no rows" in description
        else:
            assert "busy timeout" in description


def test_plan_describes_postgresql_clauses() -> None:
    pg = BY_LABEL["PostgreSQL 15"].dialect()
    assert plan_row_locks(pg, key_share=True, nowait=True).clause == "FOR NO KEY UPDATE NOWAIT"
    assert plan_row_locks(pg, key_share=True, read=True).clause == "FOR KEY SHARE"
    assert (
        plan_row_locks(pg, of=Job, skip_locked=True).clause == "FOR UPDATE OF orm_jobs SKIP LOCKED"
    )
    assert plan_row_locks(pg, of=[jobs, owners]).clause == "FOR UPDATE OF jobs, owners"
    plan = plan_row_locks(pg, read=True, skip_locked=True)
    assert plan.describe() == "PostgreSQL 15.4: FOR SHARE SKIP LOCKED"
    assert plan.requested == plan.effective
    assert plan.requested.names == ("read", "skip_locked")


# -- calls with a bind whose server version is not known yet ----------------------------------


def test_version_dependent_dialect_without_version_is_planned_at_execution() -> None:
    """Before its first connection a MySQL dialect does not know whether it talks to MariaDB
    10.11 or MySQL 5.7: the request is kept and planned by the executing connection."""
    fresh = offline_dialect("mysql")
    stmt = with_row_locks(joined(), fresh, skip_locked=True)  # no error yet
    assert stmt._execution_options["locksafe_row_locks"] is not None
    # The requested options stay on the statement; a connected MySQL 8 renders them.
    mysql8 = BY_LABEL["MySQL 8.0"].dialect()
    assert rendered_clause(stmt, mysql8) == "FOR UPDATE SKIP LOCKED"
    # plan_row_locks answers for the oldest server of the family.
    with pytest.raises(UnsupportedLockOption) as info:
        plan_row_locks(fresh, skip_locked=True)
    assert info.value.server_version is None
    assert "unknown version" in str(info.value)


def test_version_independent_dialects_are_planned_at_call_time() -> None:
    with pytest.raises(UnsupportedLockOption):
        with_row_locks(joined(), offline_dialect("oracle"), key_share=True)
    with pytest.raises(UnsupportedLockOption):
        with_row_locks(joined(), offline_dialect("mssql"))
    stmt = with_row_locks(joined(), offline_dialect("postgresql"), key_share=True)
    assert rendered_clause(stmt, offline_dialect("postgresql")) == "FOR NO KEY UPDATE"


# -- argument checking ------------------------------------------------------------------------


@pytest.mark.parametrize("bind", [None, "postgresql", "sqlite", "mssql"])
def test_nowait_with_skip_locked_is_a_value_error(bind: str | None) -> None:
    dialect = offline_dialect(bind) if bind else None
    with pytest.raises(ValueError, match="nowait") as info:
        with_row_locks(select(jobs), dialect, nowait=True, skip_locked=True)
    assert "skip_locked" in str(info.value)
    with pytest.raises(ValueError, match="skip_locked") as info:
        plan_row_locks(dialect or offline_dialect("postgresql"), nowait=True, skip_locked=True)
    assert "nowait" in str(info.value)


@pytest.mark.parametrize("value", ["ignore", "RAISE", "", None, True])
def test_bad_on_unsupported_is_a_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="on_unsupported") as info:
        with_row_locks(select(jobs), on_unsupported=value)
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match="on_unsupported"):
        plan_row_locks(offline_dialect("postgresql"), on_unsupported=value)


def test_empty_of_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="of="):
        with_row_locks(select(jobs), of=[])


@pytest.mark.parametrize(
    "query",
    [
        text("SELECT * FROM jobs"),
        insert(jobs),
        update(jobs).values(state="x"),
        delete(jobs),
        jobs,
        "SELECT * FROM jobs",
        None,
        42,
    ],
    ids=["text", "insert", "update", "delete", "Table", "str", "None", "int"],
)
def test_non_select_is_a_type_error(query: Any) -> None:
    with pytest.raises(TypeError, match="with_row_locks"):
        with_row_locks(query)
    with pytest.raises(TypeError):
        with_row_locks(query, offline_dialect("postgresql"), nowait=True)


# -- what comes back ----------------------------------------------------------------------------


def test_returns_the_same_kind_of_object() -> None:
    pg = offline_dialect("postgresql")

    core = select(jobs).where(jobs.c.id == bindparam("id"))
    locked_core = with_row_locks(core, nowait=True)
    assert type(locked_core) is Select
    assert locked_core is not core
    assert core._for_update_arg is None  # the input is not changed
    assert str(locked_core.compile(dialect=pg)).endswith("FOR UPDATE NOWAIT")

    orm = select(Job).where(Job.id == 1)
    locked_orm = with_row_locks(orm, pg, skip_locked=True)
    assert type(locked_orm) is Select
    assert locked_orm.column_descriptions[0]["entity"] is Job
    assert str(locked_orm.compile(dialect=pg)).endswith("FOR UPDATE SKIP LOCKED")

    query: Query[Job] = Query(Job).filter(Job.id == 1)
    locked_query = with_row_locks(query, read=True)
    assert type(locked_query) is Query
    assert locked_query is not query
    sql = str(locked_query.statement.compile(dialect=pg))
    assert sql.endswith("FOR SHARE")
    assert locked_query._execution_options["locksafe_row_locks"] is not None

    compound = union_all(select(jobs.c.id), select(owners.c.id))
    assert type(with_row_locks(compound)) is type(compound)


def test_options_and_names() -> None:
    plan = plan_row_locks(offline_dialect("postgresql"), of=jobs, nowait=True, read=True)
    assert plan.requested.names == ("read", "nowait", "of")
    assert plan.requested.of == (jobs,)
    assert plan.requested.for_update_kwargs()["of"] == [jobs]


def test_public_names() -> None:
    for name in (
        "with_row_locks",
        "plan_row_locks",
        "lock_capabilities",
        "UnsupportedLockOption",
        "LockDegradedWarning",
        "RowLockPlan",
        "LockOptions",
        "LockCapabilities",
    ):
        assert name in locksafe.__all__
        assert getattr(locksafe, name) is not None


def test_unsupported_lock_option_error_text() -> None:
    error = UnsupportedLockOption(
        ["skip_locked"], dialect="mysql", server_version=(5, 7, 44), reason="because"
    )
    assert str(error) == "skip_locked not supported by mysql 5.7.44: because"
    assert error.option == "skip_locked"
    assert isinstance(error, locksafe.LocksafeError)
    error = UnsupportedLockOption(["of", "nowait"], dialect="mariadb", server_version=None)
    assert str(error) == "of, nowait not supported by mariadb unknown version"


def test_of_accepts_a_column_of_a_lightweight_table() -> None:
    t = table("t", column("id"))
    pg = offline_dialect("postgresql")
    stmt = with_row_locks(select(t).where(t.c.id == 1), pg, of=t.c.id)
    assert str(stmt.compile(dialect=pg)).endswith("FOR UPDATE OF t")
    assert plan_row_locks(pg, of=t).clause == "FOR UPDATE OF t"


# -- of= must name what the statement selects FROM ----------------------------------------------


@pytest.mark.parametrize("bind", [None, "postgresql", "mariadb", "sqlite"])
def test_of_naming_a_table_outside_the_from_is_a_value_error(bind: str | None) -> None:
    """PostgreSQL would refuse ``FOR UPDATE OF other``; MariaDB (degrading OF away) and SQLite
    (no OF) would accept it without a word and lock something else than asked. Refused at
    the call, whatever the bind, naming the option and the FROM."""
    dialect = offline_dialect(bind, (10, 11, 0) if bind == "mariadb" else None) if bind else None
    other = table("other", column("id"))
    alias = jobs.alias("j2")
    cases: list[tuple[Any, Any]] = [
        (select(jobs), other),
        (select(jobs), owners),
        (select(jobs), [jobs, owners]),
        (select(jobs), owners.c.name),
        (select(jobs), alias),  # an alias is another FROM item than its table
        (select(alias), jobs),
        (select(Job), jobs),
        (select(jobs), Job),
        (Query(Job), owners),
        (union_all(select(jobs.c.id), select(owners.c.id)), other),
    ]
    for statement, of in cases:
        with pytest.raises(ValueError, match=r"of= names '\w+', which is not in the") as info:
            with_row_locks(statement, dialect, of=of, on_unsupported="degrade")
        assert "FROM (" in str(info.value)


def test_of_naming_tables_of_the_from_is_accepted() -> None:
    pg = offline_dialect("postgresql")
    alias = jobs.alias("j2")
    cases: list[tuple[Any, Any, str]] = [
        (joined(), jobs, "FOR UPDATE OF jobs"),
        (joined(), [jobs, owners], "FOR UPDATE OF jobs, owners"),
        (joined(), owners.c.name, "FOR UPDATE OF owners"),
        (select(alias).where(alias.c.id == 1), alias, "FOR UPDATE OF j2"),
        (select(Job).where(Job.id == 1), Job, "FOR UPDATE OF orm_jobs"),
        (select(Job.id).where(Job.state == "q"), Job.__table__, "FOR UPDATE OF orm_jobs"),
        (Query(Job).filter(Job.id == 1), Job, "FOR UPDATE OF orm_jobs"),
        (select(jobs.c.id).where(jobs.c.owner_id == owners.c.id), owners, "FOR UPDATE OF owners"),
    ]
    for statement, of, clause in cases:
        locked = with_row_locks(statement, pg, of=of)
        compiled = locked.statement if isinstance(locked, Query) else locked
        assert " ".join(str(compiled.compile(dialect=pg)).split()).endswith(clause), clause
    # A textual FROM cannot be checked: what the server accepts decides.
    textual = select(column("id")).select_from(text("jobs"))
    assert str(with_row_locks(textual, pg, of=jobs).compile(dialect=pg)).endswith(
        "FOR UPDATE OF jobs"
    )


# -- statements in which SQLAlchemy renders no lock ----------------------------------------------


def test_a_union_is_refused_where_no_lock_would_be_rendered() -> None:
    """SQLAlchemy renders no FOR UPDATE for a UNION on any dialect: with a bind whose lock is
    a clause, refused at the call (SQLite's write lock needs no clause)."""
    compound = union_all(select(jobs.c.id), select(owners.c.id))
    for flavour, version in (("postgresql", None), ("mariadb", (10, 11, 0)), ("oracle", None)):
        dialect = offline_dialect(flavour, version)
        assert "FOR UPDATE" not in str(compound.with_for_update().compile(dialect=dialect))
        for mode in ("raise", "degrade"):
            with pytest.raises(UnsupportedLockOption, match="no lock for a UNION"):
                with_row_locks(compound, dialect, on_unsupported=mode)  # type: ignore[arg-type]
    assert type(with_row_locks(compound, offline_dialect("sqlite"))) is type(compound)


# -- Sessions bound per mapper or per table --------------------------------------------------


def test_session_bound_per_mapper_resolves_the_statements_bind() -> None:
    """``Session(binds={...})`` has no default bind: the statement's mapper or tables find
    it (planned at call time), lock_capabilities answers from the binds when they agree, and
    a statement with no bind in the Session is planned when it is executed."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import UnboundExecutionError
    from sqlalchemy.orm import Session

    pg = create_engine("postgresql+psycopg2://")
    lite = create_engine("sqlite://")
    session = Session(binds={Job: pg, jobs: pg})
    locked = with_row_locks(select(Job).where(Job.id == 1), session, key_share=True)
    assert str(locked.compile(dialect=pg.dialect)).endswith("FOR NO KEY UPDATE")
    assert locked._execution_options["locksafe_row_locks"].capabilities.flavour == "postgresql"
    query = with_row_locks(Query(Job), session, nowait=True)
    assert str(query.statement.compile(dialect=pg.dialect)).endswith("FOR UPDATE NOWAIT")
    core = with_row_locks(select(jobs.c.id), session, skip_locked=True)
    assert core._execution_options["locksafe_row_locks"].capabilities.flavour == "postgresql"
    assert lock_capabilities(session).flavour == "postgresql"
    assert plan_row_locks(session, key_share=True).clause == "FOR NO KEY UPDATE"
    # owners has no bind in this Session: planned by the connection that executes it.
    unbound = with_row_locks(select(owners), session, nowait=True)
    assert type(unbound._execution_options["locksafe_row_locks"]).__name__ == "_Request"
    # Binds to two kinds of server: which one is meant cannot be told without a statement.
    mixed = Session(binds={Job: pg, owners: lite})
    assert lock_capabilities(Session(binds={Job: pg, owners: pg})).flavour == "postgresql"
    with pytest.raises(UnboundExecutionError, match="several kinds of server") as info:
        lock_capabilities(mixed)
    assert "postgresql" in str(info.value)
    assert "sqlite" in str(info.value)


def offline_engine(url: str, flavour: str, version: tuple[int, ...]) -> Any:
    """An Engine (what a Session binds to) whose dialect is set up as for ``version``; it never
    connects."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    engine.dialect = offline_dialect(flavour, version)
    return engine


def test_session_per_entity_binds_win_over_the_default_bind() -> None:
    """``Session(bind=A, binds={Job: B})`` runs a statement on Job (or its table) on B, as
    Session.execute() resolves it: with_row_locks plans it for B, not for the default bind.
    MySQL 5.7 has no SKIP LOCKED, PostgreSQL 15 does: which bind was chosen shows."""
    from sqlalchemy.orm import Session

    pg = offline_engine("postgresql+psycopg2://", "postgresql", (15, 0))
    mysql57 = offline_engine("mysql+pymysql://", "mysql", (5, 7, 40))
    for session, stmt in (
        (Session(bind=mysql57, binds={Job: pg}), select(Job).where(Job.id == 1)),
        (Session(bind=mysql57, binds={Job: pg}), Query(Job)),
        (Session(bind=mysql57, binds={jobs: pg}), select(jobs.c.id)),
    ):
        assert session.get_bind(clause=stmt if isinstance(stmt, Select) else stmt.statement) is pg
        locked = with_row_locks(stmt, session, skip_locked=True)  # type: ignore[type-var]
        statement = locked.statement if isinstance(locked, Query) else locked
        plan = statement._execution_options["locksafe_row_locks"]
        assert plan.capabilities.flavour == "postgresql"
        assert str(statement.compile(dialect=pg.dialect)).endswith("FOR UPDATE SKIP LOCKED")
    # The other way round: planned for MySQL 5.7, refused at the call.
    for stmt in (select(Job), Query(Job), select(jobs.c.id)):
        session = Session(bind=pg, binds={Job: mysql57, jobs: mysql57})
        with pytest.raises(UnsupportedLockOption) as info:
            with_row_locks(stmt, session, skip_locked=True)  # type: ignore[type-var]
        assert (info.value.dialect, info.value.options) == ("mysql", ("skip_locked",))
    # A statement the binds do not cover goes to the default bind.
    session = Session(bind=pg, binds={Job: mysql57})
    with_row_locks(select(owners), session, skip_locked=True)


# -- pickling -------------------------------------------------------------------------------------


def test_locked_statements_pickle_without_their_plans() -> None:
    """A locked statement pickles like SQLAlchemy's own: before and after any statement with
    the same options was planned against a bind (its shared request then holds plans, which
    hold a Dialect and the driver module), and when it was planned at call time (it carries
    its plan). Unpickled, it carries the request again (planned by the connection that runs
    it), renders the same clause, and adds the same token to its cache key."""
    import pickle

    pg = offline_dialect("postgresql", (15, 0))
    stmt = with_row_locks(select(jobs).where(jobs.c.id == 1), skip_locked=True)
    unrelated = with_row_locks(select(owners), pg, skip_locked=True)  # plans the same options
    request = stmt._execution_options["locksafe_row_locks"]
    assert request.plans, "the shared request holds the plan made for the unrelated call"
    bound = with_row_locks(select(jobs).where(jobs.c.id == 1), pg, skip_locked=True)
    for original in (stmt, unrelated, bound):
        back = pickle.loads(pickle.dumps(original))
        value = back._execution_options["locksafe_row_locks"]
        assert type(value).__name__ == "_Request"
        assert not value.plans or value is request  # the shared request of this process
        assert back._for_update_arg.locksafe_value is value
        assert str(back.compile(dialect=pg)) == str(original.compile(dialect=pg))
        assert back._for_update_arg.locksafe_token == original._for_update_arg.locksafe_token
    with pytest.raises(TypeError, match="holds its SQLAlchemy Dialect"):
        pickle.dumps(plan_row_locks(pg, nowait=True))
