#!/usr/bin/env bash
# THE test command: `bash ops/test.sh [pytest args]` (default: the whole suite).
#
# From a fresh clone on a Debian machine with Python 3.11 it
#   1. creates .venv if missing and installs the project with its [dev] extra,
#   2. starts the real PostgreSQL (ops/postgres.sh) and Kafka-protocol broker
#      (ops/kafka.sh) on loopback and exports BANDIT_TEST_DATABASE_URL and
#      BANDIT_TEST_KAFKA_BOOTSTRAP for tests/integration,
#   3. runs `python -m pytest "$@"` and exits with pytest's code ("no tests collected",
#      pytest's 5, counts as a failure),
#   4. stops the servers it started on any exit (success, failure, Ctrl-C), unless
#      another ops/test.sh run in this checkout still uses them (the last one out stops
#      them). Servers that were already running before, started by hand, are left alone.
#
# Environment: PYTHON (interpreter for a new .venv, default python3.11),
# BANDIT_TEST_LITELLM=0 (do not install the [litellm] extra; its tests skip), and the
# BANDIT_PG_* / BANDIT_KAFKA_* variables documented in ops/postgres.sh and ops/kafka.sh.
# shellcheck disable=SC2317  # the functions below run through with_lock and the traps
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUN_DIR="$ROOT/ops/.run"
SESSIONS="$RUN_DIR/test-sessions"
START_TIME=$SECONDS

log() { echo "[ops/test] $*"; }

# ---------------------------------------------------------------- 1. the virtualenv
pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        echo python3.11
    else
        echo python3
    fi
}

if [[ ! -x .venv/bin/python ]]; then
    py="$(pick_python)"
    log "creating .venv with $py ($("$py" --version 2>&1))"
    "$py" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install by this script: a
# no-op `pip install -e` still costs seconds on every run.
stamp_file=.venv/.ops-test-installed
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp_file" || "$(cat "$stamp_file")" != "$stamp" ]] ||
    ! .venv/bin/python -c 'import bandit, pytest' >/dev/null 2>&1; then
    log "installing the project into .venv: pip install -e \".[dev]\""
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
    echo "$stamp" >"$stamp_file"
else
    log ".venv is up to date with pyproject.toml"
fi

# The LiteLLM plug-in's tests (tests/bandit_router_litellm) need the [litellm] extra
# (litellm[proxy]: ~90 s to install on this 2-core machine, once per .venv). It is a
# separate step so that a registry hiccup never fails the run: without it those tests
# skip and say why. BANDIT_TEST_LITELLM=0 skips the install.
if [[ "${BANDIT_TEST_LITELLM:-1}" != 0 ]] &&
    ! .venv/bin/python -c 'import litellm' >/dev/null 2>&1; then
    log "installing the [litellm] extra for the LiteLLM plug-in's tests"
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[litellm]"; then
        log "WARNING: could not install the [litellm] extra; tests/bandit_router_litellm will skip"
    fi
fi

# The status-page test (tests/service/test_status_page.py, marker `browser`) drives
# Debian's chromium. Installing it from the Debian mirror takes ~40 s, once; without root
# or apt-get the test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 &&
    [[ "$(id -u)" == 0 ]]; then
    log "installing Debian's chromium for the browser test (apt-get install chromium)"
    if ! { apt-get install -y -q chromium >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -q chromium >/dev/null 2>&1; }; }; then
        log "WARNING: could not install chromium; the browser test will skip"
    fi
fi

# ---------------------------------------------------------------- 2. the servers
mkdir -p "$SESSIONS"
exec 9>"$RUN_DIR/test.lock"
with_lock() { flock 9; "$@"; local rc=$?; flock -u 9; return $rc; }

live_sessions() {
    local f pid
    for f in "$SESSIONS"/*; do
        [[ -e "$f" ]] || continue
        pid="$(basename "$f")"
        if [[ "$pid" != "$$" ]] && kill -0 "$pid" 2>/dev/null; then
            echo "$pid"
        else
            [[ "$pid" == "$$" ]] || rm -f "$f"
        fi
    done
}

# $1 = service name (postgres|kafka): start it, remembering whether we did.
start_service() {
    local name=$1
    if bash "ops/$name.sh" status >/dev/null 2>&1; then
        if [[ -f "$RUN_DIR/$name.by-test" ]]; then
            log "$name: already started by another ops/test.sh run, sharing it"
        else
            log "$name: already running (started by hand), using it and leaving it running"
        fi
        bash "ops/$name.sh" start # checks readiness, creates the database if needed
    else
        touch "$RUN_DIR/$name.by-test"
        bash "ops/$name.sh" start
    fi
}

start_services() {
    touch "$SESSIONS/$$"
    start_service postgres
    start_service kafka
}

stop_services() {
    rm -f "$SESSIONS/$$"
    local others
    others="$(live_sessions | tr '\n' ' ')"
    if [[ -n "${others// /}" ]]; then
        log "other ops/test.sh runs (pids $others) still use the servers: leaving them running"
        return 0
    fi
    local name
    for name in kafka postgres; do
        if [[ -f "$RUN_DIR/$name.by-test" ]]; then
            bash "ops/$name.sh" stop || log "WARNING: could not stop $name"
            rm -f "$RUN_DIR/$name.by-test"
        fi
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    log "cleaning up"
    with_lock stop_services || true
    log "finished in $((SECONDS - START_TIME))s with exit code $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

log "starting PostgreSQL (ops/postgres.sh) and the Tansu Kafka-protocol broker (ops/kafka.sh)"
with_lock start_services

BANDIT_TEST_DATABASE_URL="$(bash ops/postgres.sh url)"
BANDIT_TEST_KAFKA_BOOTSTRAP="$(bash ops/kafka.sh bootstrap)"
export BANDIT_TEST_DATABASE_URL BANDIT_TEST_KAFKA_BOOTSTRAP
log "BANDIT_TEST_DATABASE_URL=$BANDIT_TEST_DATABASE_URL"
log "BANDIT_TEST_KAFKA_BOOTSTRAP=$BANDIT_TEST_KAFKA_BOOTSTRAP"

# ---------------------------------------------------------------- 3. the tests
log "running: python -m pytest $*"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then
    log "ERROR: pytest collected no tests (exit 5): that is a failure here"
    rc=1
fi
exit "$rc"
