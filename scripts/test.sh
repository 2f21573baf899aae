#!/usr/bin/env bash
# The single command that sets everything up and runs the whole suite:
#
#   bash scripts/test.sh [pytest arguments...]
#
# On a fresh Debian 12 machine (as root, or with sudo) it installs what is missing (MariaDB
# server and client development files, the tools to build the database drivers), creates a
# virtual environment (${LOCKSAFE_VENV:-.venv}), installs the project with its test extras, then
# runs ruff, mypy and pytest, stopping at the first failure. The tests start their own
# throw-away PostgreSQL and MariaDB servers (tests/servers.py); nothing needs to be running.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${LOCKSAFE_VENV:-.venv}
PG_BIN=${LOCKSAFE_PG_BIN:-/usr/lib/postgresql/15/bin}

# --- phase timing ------------------------------------------------------------------------------
PHASES=()
phase_started=""
phase_name=""

now() { date +%s.%N; }

begin_phase() {
    end_phase
    phase_name=$1
    phase_started=$(now)
    echo "==> $phase_name"
}

end_phase() {
    if [[ -n $phase_name ]]; then
        PHASES+=("$(printf '%-10s %7.1f s' "$phase_name" "$(echo "$phase_started $(now)" | awk '{print $2 - $1}')")")
        phase_name=""
    fi
}

summary() {
    local status=$?
    rm -f "${PIP_LOG:-}"
    # A phase still open here is the one that failed (or was interrupted).
    if [[ -n $phase_name ]]; then
        local failed=$phase_name
        end_phase
        PHASES[-1]="${PHASES[-1]}  (failed)"
        echo "scripts/test.sh: phase '$failed' failed (exit $status)" >&2
    fi
    if ((${#PHASES[@]})); then
        echo "==> wall time per phase"
        printf '    %s\n' "${PHASES[@]}"
    fi
    exit "$status"
}
trap summary EXIT

# --- system packages ---------------------------------------------------------------------------
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "scripts/test.sh: system packages are missing (${MISSING[*]}) and installing them" \
            "needs root: run this script as root, or install sudo" >&2
        exit 1
    fi
}

have() { command -v "$1" >/dev/null 2>&1; }
# mariadbd lives in /usr/sbin, which a non-root PATH may lack.
have_sbin() { have "$1" || [[ -x /usr/sbin/$1 ]]; }

begin_phase install

MISSING=()
if ! have_sbin mariadbd || ! have mariadb-install-db || ! have mariadb-admin || ! have mariadb; then
    MISSING+=(mariadb-server)
fi
# Client development files: mysqlclient needs mysql_config or pkg-config, mariadb needs
# mariadb_config.
if ! have mariadb_config || ! have mysql_config || ! have pkg-config; then
    MISSING+=(default-libmysqlclient-dev libmariadb-dev pkg-config)
fi
if [[ ! -x $PG_BIN/initdb || ! -x $PG_BIN/pg_ctl ]]; then
    MISSING+=(postgresql-15)
fi
if ! have python3; then
    MISSING+=(python3 python3-venv python3-dev)
elif [[ ! -x $VENV/bin/python ]] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    MISSING+=(python3-venv)
fi
# mysqlclient and mariadb ship no Linux wheels: they are built with a C compiler and Python.h.
if ! have gcc; then
    MISSING+=(gcc libc6-dev)
fi
if have python3 && ! python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    >/dev/null 2>&1; then
    MISSING+=(python3-dev)
fi

if ((${#MISSING[@]})); then
    echo "    installing system packages: ${MISSING[*]}"
    as_root apt-get -o Acquire::Retries=3 update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${MISSING[@]}"
fi

PY=$VENV/bin/python
if [[ ! -x $PY ]]; then
    echo "    creating the virtual environment $VENV"
    python3 -m venv "$VENV"
fi

# pip prints many harmless "Location ... is ignored" warnings on these machines: keep its
# output in a log and show it (without them) only when pip fails.
PIP_LOG=$(mktemp "${TMPDIR:-/tmp}/locksafe-pip.XXXXXX")
pip_quietly() {
    if ! "$PY" -m pip "$@" >"$PIP_LOG" 2>&1; then
        echo "scripts/test.sh: pip $* failed; last lines of its output:" >&2
        grep -v -E '^(WARNING: )?Location .* is ignored' "$PIP_LOG" | tail -n 60 >&2 || true
        rm -f "$PIP_LOG"
        return 1
    fi
}
pip_quietly install --quiet --upgrade pip
pip_quietly install --quiet -e '.[test]'
rm -f "$PIP_LOG"

# --- checks ------------------------------------------------------------------------------------
begin_phase lint
"$PY" -m ruff check .

begin_phase typecheck
"$PY" -m mypy # files and options come from pyproject.toml (src/locksafe, strict)

run_pytest() {
    local status=0
    "$1" -m pytest "${@:2}" || status=$?
    if ((status == 5)); then
        echo "scripts/test.sh: pytest collected no tests: that is a failure" >&2
    fi
    return "$status"
}

begin_phase tests
run_pytest "$PY" "$@"

# --- the oldest supported stack: Python 3.10 with SQLAlchemy 2.0 -------------------------------
# Same suite, second environment (${LOCKSAFE_COMPAT_VENV:-.venv-compat}). Set
# LOCKSAFE_COMPAT=0 to leave it out; under CI=true a missing Python 3.10 is a failure.
if [[ ${LOCKSAFE_COMPAT:-1} != 0 ]]; then
    begin_phase compat
    # The first Python 3.10 that really runs (a pyenv shim may exist and refuse to).
    PY310=""
    for candidate in python3.10 /root/.pyenv/versions/3.10*/bin/python /usr/bin/python3.10; do
        if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 10))' \
            >/dev/null 2>&1; then
            PY310=$candidate
            break
        fi
    done
    if [[ -z $PY310 ]]; then
        if [[ ${CI:-} == true ]]; then
            echo "scripts/test.sh: CI=true and no Python 3.10 for the compatibility run" >&2
            exit 1
        fi
        echo "    no Python 3.10 here: compatibility run (Python 3.10, SQLAlchemy 2.0) not done"
    else
        COMPAT_VENV=${LOCKSAFE_COMPAT_VENV:-.venv-compat}
        if [[ ! -x $COMPAT_VENV/bin/python ]]; then
            "$PY310" -m venv "$COMPAT_VENV"
        fi
        PY=$COMPAT_VENV/bin/python
        PIP_LOG=$(mktemp "${TMPDIR:-/tmp}/locksafe-pip.XXXXXX")
        pip_quietly install --quiet --upgrade pip
        pip_quietly install --quiet -e '.[test]' 'SQLAlchemy>=2.0.50,<2.1'
        rm -f "$PIP_LOG"
        "$PY" -c 'import sqlalchemy, sys; print("    Python", sys.version.split()[0], "SQLAlchemy", sqlalchemy.__version__)'
        run_pytest "$PY" "$@"
    fi
fi

# --- Python 3.13: sqlite3's autocommit (Python >= 3.12) ----------------------------------------
# Python 3.12 changed sqlite3's transaction control (the autocommit attribute); the SQLite-only
# tests (no server, no server driver) run again on Python 3.13 in their own environment
# (${LOCKSAFE_PY313_VENV:-.venv-py313}): tests/test_sqlite_*.py and the SQLite cells of the
# row-lock and transaction tests. Set LOCKSAFE_PY313=0 to leave it out; under CI=true a missing Python 3.13 is
# a failure.
if [[ ${LOCKSAFE_PY313:-1} != 0 ]]; then
    begin_phase py313
    # The first Python 3.13 that really runs (a pyenv shim may exist and refuse to).
    PY313=""
    for candidate in python3.13 /root/.pyenv/versions/3.13*/bin/python /usr/bin/python3.13; do
        if "$candidate" -c 'import sys, venv, sqlite3; sys.exit(sys.version_info[:2] != (3, 13))' \
            >/dev/null 2>&1; then
            PY313=$candidate
            break
        fi
    done
    if [[ -z $PY313 ]]; then
        if [[ ${CI:-} == true ]]; then
            echo "scripts/test.sh: CI=true and no Python 3.13 for the SQLite run" >&2
            exit 1
        fi
        echo "    no Python 3.13 here: SQLite run on Python 3.13 not done"
    else
        PY313_VENV=${LOCKSAFE_PY313_VENV:-.venv-py313}
        if [[ ! -x $PY313_VENV/bin/python ]]; then
            "$PY313" -m venv "$PY313_VENV"
        fi
        PY=$PY313_VENV/bin/python
        PIP_LOG=$(mktemp "${TMPDIR:-/tmp}/locksafe-pip.XXXXXX")
        pip_quietly install --quiet --upgrade pip
        # PyMySQL and aiomysql (pure Python) for the tests whose SQLite cells also build a
        # MySQL engine that never connects (a Session's other bind).
        pip_quietly install --quiet -e '.[aiosqlite]' 'pytest>=8' 'pytest-timeout>=2.3' \
            'pymysql>=1.1' 'aiomysql>=0.2'
        rm -f "$PIP_LOG"
        "$PY" -c 'import sqlalchemy, sqlite3, sys; print("    Python", sys.version.split()[0], "SQLAlchemy", sqlalchemy.__version__, "SQLite", sqlite3.sqlite_version)'
        # Only SQLite cells and cell-less SQLite tests: no PostgreSQL or MariaDB server starts.
        run_pytest "$PY" tests/test_sqlite_configure.py tests/test_sqlite_locking.py \
            tests/test_sqlite_app_shapes.py \
            tests/test_rowlocks_real.py tests/test_rowlocks_concurrency.py \
            tests/test_rowlocks_nested.py tests/test_transactions.py \
            -k 'sqlite+pysqlite or sqlite+aiosqlite or test_sqlite_configure or test_sqlite_locking or test_sqlite_app_shapes or test_sqlite_busy_is_recognised'
    fi
fi
end_phase
echo "==> all checks passed ($ROOT)"
