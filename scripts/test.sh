#!/usr/bin/env bash
# The single command that sets everything up and runs the whole suite:
#
#   bash scripts/test.sh [pytest arguments...]
#
# On a fresh Debian 12 machine (as root, or with sudo) it installs what is missing (MariaDB
# server and client development files, the tools to build the database drivers), creates the
# virtual environments (${LOCKSAFE_VENV:-.venv}; .venv-compat with Python 3.10 and
# SQLAlchemy 2.0; .venv-py313) and installs the project with its test extras into them, then
# runs ruff and mypy, then the four legs of the test suite at once (main, compat, floor, py313: see
# "the tests" below), stopping at the first failure. The tests start their own throw-away
# PostgreSQL and MariaDB servers (tests/harness/servers.py); nothing needs to be running.
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
    if declare -F stop_legs >/dev/null; then
        stop_legs
    fi
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
trap 'exit 130' INT # so that the EXIT trap runs (and stops the test legs) on Ctrl-C
trap 'exit 143' TERM

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
pip_quietly() {
    if ! "$PY" -m pip "$@" >"$PIP_LOG" 2>&1; then
        echo "scripts/test.sh: pip $* failed; last lines of its output:" >&2
        grep -v -E '^(WARNING: )?Location .* is ignored' "$PIP_LOG" | tail -n 60 >&2 || true
        rm -f "$PIP_LOG"
        return 1
    fi
}
# install_into PACKAGES...: into $PY's environment. LOCKSAFE_INSTALL=0 uses the environments as
# they are (a developer's, already set up); under CI=true everything is always installed.
install_into() {
    if [[ ${LOCKSAFE_INSTALL:-1} == 0 && ${CI:-} != true ]]; then
        return 0
    fi
    PIP_LOG=$(mktemp "${TMPDIR:-/tmp}/locksafe-pip.XXXXXX")
    pip_quietly install --quiet --upgrade pip
    pip_quietly install --quiet "$@"
    rm -f "$PIP_LOG"
}
install_into -e '.[test]'
MAIN_PY=$PY

# find_python MAJOR MINOR: the first Python MAJOR.MINOR that really runs (a pyenv shim may exist
# and refuse to); nothing if there is none.
find_python() {
    local candidate
    for candidate in "python$1.$2" /root/.pyenv/versions/"$1.$2".*/bin/python "/usr/bin/python$1.$2"; do
        if "$candidate" -c "import sys, venv, sqlite3; sys.exit(sys.version_info[:2] != ($1, $2))" \
            >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 0
}

# make_venv DIR PYTHON: DIR's python, the virtual environment created with PYTHON if missing.
make_venv() {
    if [[ ! -x $1/bin/python ]]; then
        "$2" -m venv "$1" >&2
    fi
    echo "$1/bin/python"
}

# --- the oldest supported stack: Python 3.10 with SQLAlchemy 2.0 -------------------------------
# Its own environment (${LOCKSAFE_COMPAT_VENV:-.venv-compat}). Set LOCKSAFE_COMPAT=0 to leave it
# out; under CI=true a missing Python 3.10 is a failure.
COMPAT_PY=""
if [[ ${LOCKSAFE_COMPAT:-1} != 0 ]]; then
    PY310=$(find_python 3 10)
    if [[ -z $PY310 ]]; then
        if [[ ${CI:-} == true ]]; then
            echo "scripts/test.sh: CI=true and no Python 3.10 for the compatibility run" >&2
            exit 1
        fi
        echo "    no Python 3.10 here: compatibility run (Python 3.10, SQLAlchemy 2.0) not done"
    else
        PY=$(make_venv "${LOCKSAFE_COMPAT_VENV:-.venv-compat}" "$PY310")
        install_into -e '.[test]' 'SQLAlchemy>=2.0.50,<2.1'
        "$PY" -c 'import sqlalchemy, sys; print("    compat: Python", sys.version.split()[0], "SQLAlchemy", sqlalchemy.__version__)'
        COMPAT_PY=$PY
    fi
fi

# --- the SQLAlchemy floor: the oldest SQLAlchemy pyproject.toml allows --------------------------
# compat gets the newest 2.0.x the registry has and main the newest 2.1.x; this environment
# (${LOCKSAFE_FLOOR_VENV:-.venv-floor}, Python 3.10) pins the floor of the `SQLAlchemy>=`
# requirement exactly, for the tests of locksafe's SQLAlchemy-facing code: every private
# access (tests/test_sa_private.py), the import layers, and the SQLite tests (no server starts).
# Set LOCKSAFE_FLOOR=0 to leave it out. Needs the compat leg's Python 3.10.
FLOOR_PY=""
if [[ ${LOCKSAFE_FLOOR:-1} != 0 && -n $COMPAT_PY ]]; then
    SA_FLOOR=$("$MAIN_PY" -c 'import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(m.group(1) for d in deps if (m := re.fullmatch(r"SQLAlchemy>=([0-9.]+)", d))))')
    PY=$(make_venv "${LOCKSAFE_FLOOR_VENV:-.venv-floor}" "$PY310")
    install_into -e '.[test]' "SQLAlchemy==$SA_FLOOR"
    "$PY" -c 'import sqlalchemy, sys; print("    floor: Python", sys.version.split()[0], "SQLAlchemy", sqlalchemy.__version__)'
    FLOOR_PY=$PY
fi

# --- Python 3.13: sqlite3's autocommit (Python >= 3.12) ----------------------------------------
# Python 3.12 changed sqlite3's transaction control (the autocommit attribute); the SQLite-only
# tests (no server, no server driver) run again on Python 3.13 in their own environment
# (${LOCKSAFE_PY313_VENV:-.venv-py313}). Set LOCKSAFE_PY313=0 to leave it out; under CI=true a
# missing Python 3.13 is a failure.
PY313_PY=""
if [[ ${LOCKSAFE_PY313:-1} != 0 ]]; then
    PY313=$(find_python 3 13)
    if [[ -z $PY313 ]]; then
        if [[ ${CI:-} == true ]]; then
            echo "scripts/test.sh: CI=true and no Python 3.13 for the SQLite run" >&2
            exit 1
        fi
        echo "    no Python 3.13 here: SQLite run on Python 3.13 not done"
    else
        PY=$(make_venv "${LOCKSAFE_PY313_VENV:-.venv-py313}" "$PY313")
        # PyMySQL and aiomysql (pure Python) for the tests whose SQLite cells also build a
        # MySQL engine that never connects (a Session's other bind).
        install_into -e '.[aiosqlite]' 'pytest>=8' 'pytest-timeout>=2.3' 'pymysql>=1.1' \
            'aiomysql>=0.2'
        "$PY" -c 'import sqlalchemy, sqlite3, sys; print("    py313: Python", sys.version.split()[0], "SQLAlchemy", sqlalchemy.__version__, "SQLite", sqlite3.sqlite_version)'
        PY313_PY=$PY
    fi
fi
PY=$MAIN_PY

# --- checks ------------------------------------------------------------------------------------
begin_phase lint
"$PY" -m ruff check .

begin_phase typecheck
"$PY" -m mypy # files and options come from pyproject.toml (src/locksafe, strict)

# --- the tests: four legs ----------------------------------------------------------------------
# main    Python of .venv, SQLAlchemy 2.1: the whole suite (pytest arguments given to this
#         script go here and to compat).
# compat  Python 3.10 + SQLAlchemy 2.0: the whole suite except the tests marked `slow`
#         (pyproject.toml). The leg is there for what differs between SQLAlchemy 2.0 and 2.1 and
#         between Python 3.10 and 3.11+, i.e. locksafe's own SQLAlchemy-facing code. A `slow`
#         test spends its time waiting (a lock wait run out on the server, a timer, worker
#         threads or processes taking turns) for what the server or the OS decides, and the
#         locksafe code it runs is run in this leg by faster tests; each marked test names those
#         tests in a comment above its marker. Left out here, they still run on main.
#         Deselected here (158 tests; 157 of the main leg's 514 s of test time, measured):
#           test_lock_timeout.py: test_a_wait_ends_near_the_requested_time,
#             test_transactional_timeout_is_a_deadline_for_a_blocked_lock_wait (lock waits run
#             out on the server);
#           test_named_locks.py: test_threads_exclude_each_other (+ its control
#             test_without_the_lock_updates_are_lost), test_processes_exclude_each_other,
#             test_timeouts (workers taking turns; waits run out);
#           test_classify_real.py: test_lock_wait_that_times_out_is_lock_timeout,
#             test_lock_timeout_on_an_update (the server's lock-wait timeout);
#           test_rowlocks_concurrency.py: test_no_lost_update_with_row_locks (server cells; the
#             SQLite race stays), and the controls test_updates_are_lost_without_row_locks,
#             test_claims_collide_without_row_locks (no locksafe code);
#           test_backfill_scenario.py: test_backfill_creation_is_atomic_and_never_500,
#             test_backfill_overload_answers_503_never_500, and the control
#             test_naive_backfill_creation_breaks_an_invariant (HTTP clients against a live app).
#         `pytest --co -q -m slow` lists them.
# py313   Python 3.13 (sqlite3's autocommit, Python >= 3.12): the SQLite-only tests (no server,
#         no server driver): tests/test_sqlite_*.py and the SQLite cells of the row-lock and
#         transaction tests.
# The legs run at the same time, each with its own throw-away servers, output kept in a log and
# shown when the last leg has ended: a leg spends most of its time waiting (on servers, lock
# waits, timers, other threads), not computing. Measured (issue 10, 2-core machine): main used
# 238 s of CPU (its servers included) in 672 s, compat 213 s in 533 s, py313 26 s in 133 s,
# i.e. 0.2-0.4 of a core each, so two cores run the three side by side.
# floor   Python 3.10 + the oldest SQLAlchemy allowed (the `SQLAlchemy>=` floor, pinned
#         exactly): the private-access tests, the layer rule and the SQLite tests (no server).
# LOCKSAFE_PARALLEL=0 runs them one after another, output streamed.
LEG_NAMES=()
LEG_PIDS=()
LEG_STARTED=()
LEG_DIR=""

# leg NAME PYTHON PYTEST_ARGS...: start one leg in the background, its output in a log
# (LOCKSAFE_PARALLEL=0: run it now, output streamed, as its own phase).
leg() {
    local name=$1 py=$2
    shift 2
    if [[ ${LOCKSAFE_PARALLEL:-1} == 0 ]]; then
        begin_phase "$name"
        local status=0
        "$py" -m pytest "$@" || status=$?
        no_tests_is_a_failure "$status"
        return "$status"
    fi
    if [[ -z $LEG_DIR ]]; then
        LEG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/locksafe-legs.XXXXXX")
    fi
    LEG_STARTED+=("$(now)")
    "$py" -m pytest "$@" >"$LEG_DIR/$name.log" 2>&1 &
    LEG_PIDS+=("$!")
    LEG_NAMES+=("$name")
}

no_tests_is_a_failure() {
    if (($1 == 5)); then
        echo "scripts/test.sh: pytest collected no tests: that is a failure" >&2
    fi
}

# Wait for the legs started in the background (noting when each ends), then show each leg's
# output and time; fail if one failed.
finish_legs() {
    local i pid status failed=()
    local -a ended=() statuses=() running=("${LEG_PIDS[@]}")
    echo "    running: ${LEG_NAMES[*]}"
    while ((${#running[@]})); do
        pid=""
        status=0
        wait -n -p pid "${running[@]}" || status=$?
        running=()
        for i in "${!LEG_PIDS[@]}"; do
            if [[ ${LEG_PIDS[$i]} == "$pid" ]]; then
                ended[i]=$(now)
                statuses[i]=$status
            elif [[ -z ${statuses[$i]:-} ]]; then
                running+=("${LEG_PIDS[$i]}")
            fi
        done
    done
    end_phase # the tests phase: until the last leg ended; each leg's own time below it
    for i in "${!LEG_NAMES[@]}"; do
        echo "==> tests: ${LEG_NAMES[$i]}"
        cat "$LEG_DIR/${LEG_NAMES[$i]}.log"
        no_tests_is_a_failure "${statuses[$i]}"
        PHASES+=("$(printf '  %-8s %7.1f s' "${LEG_NAMES[$i]}" \
            "$(echo "${LEG_STARTED[$i]} ${ended[$i]}" | awk '{print $2 - $1}')")")
        if ((statuses[i] != 0)); then
            PHASES[-1]+="  (failed, exit ${statuses[$i]})"
            failed+=("${LEG_NAMES[$i]}")
        fi
    done
    LEG_PIDS=()
    rm -rf "$LEG_DIR"
    if ((${#failed[@]})); then
        echo "scripts/test.sh: failed test legs: ${failed[*]}" >&2
        return 1
    fi
}

# On an interruption or a failure of this script, the legs still running are stopped by pid
# (background jobs ignore the terminal's Ctrl-C); the test harness stops its servers on SIGTERM.
stop_legs() {
    local pid
    for pid in "${LEG_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${LEG_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $LEG_DIR ]]; then
        rm -rf "$LEG_DIR"
    fi
}

if [[ ${LOCKSAFE_PARALLEL:-1} != 0 ]]; then
    begin_phase tests
    echo "    the legs run at once; the output of each follows when the last has ended"
fi
leg main "$MAIN_PY" "$@"
if [[ -n $COMPAT_PY ]]; then
    leg compat "$COMPAT_PY" -p no:cacheprovider -m "not slow" "$@"
fi
if [[ -n $PY313_PY ]]; then
    # Only SQLite cells and cell-less SQLite tests: no PostgreSQL or MariaDB server starts.
    leg py313 "$PY313_PY" -p no:cacheprovider \
        tests/test_sqlite_configure.py tests/test_sqlite_locking.py \
        tests/test_sqlite_app_shapes.py \
        tests/test_rowlocks_real.py tests/test_rowlocks_concurrency.py \
        tests/test_rowlocks_nested.py tests/test_transactions.py \
        -k 'sqlite+pysqlite or sqlite+aiosqlite or test_sqlite_configure or test_sqlite_locking or test_sqlite_app_shapes or test_sqlite_busy_is_recognised'
fi
if [[ -n $FLOOR_PY ]]; then
    leg floor "$FLOOR_PY" -p no:cacheprovider \
        tests/test_sa_private.py tests/test_layers.py tests/test_cache.py \
        tests/test_commit_outcome.py tests/test_classify_unit.py tests/test_classify_direct.py \
        tests/test_steps.py \
        tests/test_sqlite_configure.py tests/test_sqlite_locking.py \
        tests/test_sqlite_app_shapes.py \
        tests/test_rowlocks_real.py tests/test_rowlocks_concurrency.py \
        tests/test_rowlocks_nested.py tests/test_transactions.py \
        -k 'not postgresql and not mysql and not mariadb'
fi
if [[ ${LOCKSAFE_PARALLEL:-1} != 0 ]]; then
    finish_legs
fi
end_phase
echo "==> all checks passed ($ROOT)"
