#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: Debian's postgresql binaries, a data dir
# under ops/.run/pg, listening on 127.0.0.1 only, trust auth, database `bandit_test`.
#
#   bash ops/postgres.sh start|stop|status|url
#
# Environment:
#   BANDIT_PG_PORT      TCP port (default 55432; a non-default port so it never collides
#                       with a system cluster on 5432)
#   BANDIT_PG_DATA      data directory (default ops/.run/pg)
#   BANDIT_PG_DATABASE  database created at start (default bandit_test)
#   BANDIT_PG_TIMEOUT   seconds to wait for readiness (default 60)
#
# Durability is switched off (fsync, synchronous_commit, full_page_writes): this server
# holds test data only, and the tests check transactional *visibility*, not crash safety.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/ops/.run"
PORT="${BANDIT_PG_PORT:-55432}"
PGDATA="${BANDIT_PG_DATA:-$RUN_DIR/pg}"
DB="${BANDIT_PG_DATABASE:-bandit_test}"
TIMEOUT="${BANDIT_PG_TIMEOUT:-60}"
LOG="$RUN_DIR/postgres.log"
HOST=127.0.0.1
PG_SUPERUSER=postgres

say() { echo "[ops/postgres] $*"; }
die() { echo "[ops/postgres] ERROR: $*" >&2; exit 1; }

find_bindir() {
    # The newest installed major version wins (Debian may keep several side by side).
    local dir
    dir="$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    [[ -x "$dir/pg_ctl" ]] && echo "$dir"
}

install_postgres() {
    [[ "$(id -u)" == 0 ]] || die "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin;
    install them as root: apt-get install -y postgresql"
    say "PostgreSQL server not found: installing Debian's postgresql package (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Install postgresql-common first and tell it not to create (and start) the default
    # cluster on port 5432: we only want the binaries, our server lives in ops/.run.
    apt-get install -y -qq postgresql-common >/dev/null
    if [[ -f /etc/postgresql-common/createcluster.conf ]]; then
        sed -i 's/^#\?\s*create_main_cluster.*/create_main_cluster = false/' \
            /etc/postgresql-common/createcluster.conf
    fi
    apt-get install -y -qq postgresql >/dev/null
}

BINDIR="$(find_bindir || true)"
need_bindir() {
    if [[ -z "$BINDIR" ]]; then
        install_postgres
        BINDIR="$(find_bindir || true)"
        [[ -n "$BINDIR" ]] || die "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/pg_ctl"
    fi
}

# The server refuses to run as root: as root we run it as the `postgres` system user
# (created by Debian's package); as anyone else we run it as ourselves.
as_pg() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

psql_cmd() {
    as_pg "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PORT" -U "$PG_SUPERUSER" "$@"
}

is_running() {
    [[ -f "$PGDATA/PG_VERSION" ]] || return 1
    as_pg "$BINDIR/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

port_in_use() {
    # bash's /dev/tcp: a successful connect means something already listens there.
    (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

prepare_dirs() {
    mkdir -p "$RUN_DIR" "$PGDATA"
    touch "$LOG"
    if [[ "$(id -u)" == 0 ]]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' system user (is Debian's postgresql package installed?)"
        chown postgres:postgres "$PGDATA" "$LOG"
        # Every directory above the data dir must be traversable by postgres.
        runuser -u postgres -- test -w "$PGDATA" ||
            die "user 'postgres' cannot write $PGDATA (a parent directory is not traversable?);
    set BANDIT_PG_DATA to a directory under /tmp"
    fi
    chmod 700 "$PGDATA"
}

init_cluster() {
    [[ -f "$PGDATA/PG_VERSION" ]] && return 0
    say "initdb $PGDATA"
    as_pg "$BINDIR/initdb" -D "$PGDATA" -U "$PG_SUPERUSER" --auth=trust \
        --encoding=UTF8 --locale=C.UTF-8 >>"$LOG" 2>&1 ||
        die "initdb failed; see $LOG"
    cat >>"$PGDATA/postgresql.conf" <<EOF

# --- ops/postgres.sh: test server settings ---
listen_addresses = '$HOST'
# (the port is given on the command line at each start, so BANDIT_PG_PORT can change)
# TCP only: no socket directory that may be missing or unwritable (/var/run/postgresql).
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
}

wait_ready() {
    local deadline=$((SECONDS + TIMEOUT))
    until as_pg "$BINDIR/pg_isready" -q -h "$HOST" -p "$PORT" -U "$PG_SUPERUSER" -d postgres; do
        if ! is_running; then
            tail -n 20 "$LOG" >&2 || true
            die "the PostgreSQL server is not running any more (crashed at start?); see $LOG"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 20 "$LOG" >&2 || true
            die "PostgreSQL did not accept connections on $HOST:$PORT within ${TIMEOUT}s; see $LOG"
        fi
        sleep 0.5
    done
}

ensure_database() {
    local exists
    exists="$(psql_cmd -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")"
    if [[ "$exists" != 1 ]]; then
        psql_cmd -d postgres -c "CREATE DATABASE \"$DB\"" || die "could not create database $DB"
        say "created database $DB"
    fi
}

# A running server keeps the port it was started with: report that one, whatever
# BANDIT_PG_PORT says now (postmaster.pid's 4th line is the port).
adopt_running_port() {
    local running
    [[ -n "$BINDIR" ]] && is_running || return 0
    running="$(sed -n 4p "$PGDATA/postmaster.pid" 2>/dev/null || true)"
    if [[ "$running" =~ ^[0-9]+$ && "$running" != "$PORT" ]]; then
        [[ -z "${BANDIT_PG_PORT:-}" ]] ||
            say "note: the server in $PGDATA already runs on port $running, not $PORT" >&2
        PORT="$running"
    fi
}

cmd_start() {
    need_bindir
    if is_running; then
        say "already running on $HOST:$PORT (data $PGDATA)"
    else
        if port_in_use; then
            die "port $PORT on $HOST is already in use by another process (another checkout's server?);
    stop it, or choose another port with BANDIT_PG_PORT=..."
        fi
        prepare_dirs
        init_cluster
        say "starting PostgreSQL $(basename "$(dirname "$BINDIR")") on $HOST:$PORT (data $PGDATA, log $LOG)"
        # -w waits for the postmaster to report ready; pg_isready below double-checks TCP.
        as_pg "$BINDIR/pg_ctl" -D "$PGDATA" -l "$LOG" -o "-p $PORT" -w -t "$TIMEOUT" start \
            >/dev/null ||
            { tail -n 20 "$LOG" >&2 || true; die "pg_ctl start failed; see $LOG"; }
    fi
    wait_ready
    ensure_database
    say "ready: $(cmd_url)"
}

cmd_stop() {
    if [[ -z "$BINDIR" ]] || ! is_running; then
        say "not running"
        return 0
    fi
    say "stopping PostgreSQL on $HOST:$PORT"
    as_pg "$BINDIR/pg_ctl" -D "$PGDATA" -m fast -w -t "$TIMEOUT" stop >/dev/null ||
        die "pg_ctl stop failed; see $LOG"
}

cmd_status() {
    if [[ -n "$BINDIR" ]] && is_running; then
        say "running on $HOST:$PORT (data $PGDATA)"
    else
        say "not running"
        return 3
    fi
}

cmd_url() {
    echo "postgresql+psycopg://$PG_SUPERUSER@$HOST:$PORT/$DB"
}

adopt_running_port

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) cmd_url ;;
    *)
        echo "usage: $0 start|stop|status|url" >&2
        exit 2
        ;;
esac
