#!/usr/bin/env bash
# A shared tracking stack on one machine: PostgreSQL (the MLflow backend store and the Optuna
# database) and an `mlflow server` on it that proxies artifact storage, so clients need only
# MLFLOW_TRACKING_URI=http://HOST:PORT. The commands are those a team would run on a real host.
#
#   scripts/tracking_stack.sh start    # initialise (first time) and start both
#   scripts/tracking_stack.sh status
#   scripts/tracking_stack.sh stop     # stop both; the data stays in STACK_DIR
#
# Settings (environment variables, defaults in brackets):
#   STACK_DIR       [outputs/stack]  PostgreSQL data (pgdata/), artifacts (artifacts/), logs, pid
#   PG_PORT         [5433]           PostgreSQL port (listens on 127.0.0.1 only)
#   MLFLOW_HOST     [127.0.0.1]      address of the MLflow server (0.0.0.0 for other machines,
#                                    then also set MLFLOW_SERVER_ARGS="--allowed-hosts host:port")
#   MLFLOW_PORT     [5001]           its port (5000 is taken by AirPlay on macOS)
#   MLFLOW_WORKERS  [2]              its worker processes
#   MLFLOW_SERVER_ARGS []            more `mlflow server` options
#   PG_BIN          [pg_config --bindir, else the newest /usr/lib/postgresql/*/bin]
#
# PostgreSQL refuses to run as root: run as root, the script runs initdb and pg_ctl as the
# `postgres` user (STACK_DIR and its parents must be readable by it). Authentication is `trust`
# on 127.0.0.1, enough for one machine; on a shared host create a role with a password, use
# scram-sha-256 in pg_hba.conf, and put the password in the URLs below.
# Needs the PostgreSQL driver: pip install -e ".[postgres]".
set -euo pipefail

STACK_DIR=$(realpath -m "${STACK_DIR:-outputs/stack}")
PG_PORT=${PG_PORT:-5433}
MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
MLFLOW_PORT=${MLFLOW_PORT:-5001}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
PG_BIN=${PG_BIN:-$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
PGDATA_DIR=$STACK_DIR/pgdata
PID_FILE=$STACK_DIR/mlflow.pid
DATABASE_URL=postgresql://postgres@127.0.0.1:$PG_PORT
TRACKING_URI=http://$MLFLOW_HOST:$MLFLOW_PORT
[ "$MLFLOW_HOST" = 0.0.0.0 ] && TRACKING_URI=http://$(hostname):$MLFLOW_PORT

if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/pg_ctl" ]; then
    echo "PostgreSQL binaries not found (set PG_BIN to the folder holding initdb and pg_ctl)" >&2
    exit 1
fi

as_postgres() {  # PostgreSQL's server programs refuse root
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

psql_admin() {
    "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"
}

start() {
    mkdir -p "$STACK_DIR/artifacts"
    chmod 755 "$STACK_DIR"
    if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
        mkdir -p "$PGDATA_DIR"
        chmod 700 "$PGDATA_DIR"
        [ "$(id -u)" = 0 ] && chown postgres: "$PGDATA_DIR"
        as_postgres "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 >"$STACK_DIR/initdb.log"
    fi
    [ "$(id -u)" = 0 ] && touch "$STACK_DIR/postgres.log" && chown postgres: "$STACK_DIR/postgres.log"
    # TCP on 127.0.0.1 only, no Unix socket (its folder would need to be the postgres user's).
    as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$STACK_DIR/postgres.log" -w -t 60 \
        -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" start >/dev/null
    for database in mlflow optuna; do
        if [ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
            psql_admin -c "CREATE DATABASE $database"
        fi
    done
    # setsid: its own process group, so `stop` ends the server and its workers together.
    # shellcheck disable=SC2086
    setsid mlflow server \
        --backend-store-uri "$DATABASE_URL/mlflow" \
        --artifacts-destination "$STACK_DIR/artifacts" \
        --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
        ${MLFLOW_SERVER_ARGS:-} >"$STACK_DIR/mlflow.log" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    for _ in $(seq 240); do
        if curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1; then
            cat <<EOF
Tracking stack running (data in $STACK_DIR). On every client:
  export MLFLOW_TRACKING_URI=$TRACKING_URI
Optuna storage for tune workers:  -P storage=$DATABASE_URL/optuna
Stop it with: STACK_DIR=$STACK_DIR PG_PORT=$PG_PORT scripts/tracking_stack.sh stop
EOF
            return 0
        fi
        if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then break; fi
        sleep 0.5
    done
    echo "mlflow server did not come up; its log ($STACK_DIR/mlflow.log) ends with:" >&2
    tail -n 20 "$STACK_DIR/mlflow.log" >&2
    stop
    exit 1
}

stop() {
    if [ -f "$PID_FILE" ]; then
        pid=$(cat "$PID_FILE")
        kill -- "-$pid" 2>/dev/null || true
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 -- "-$pid" 2>/dev/null || true
        rm -f "$PID_FILE"
    fi
    if [ -f "$PGDATA_DIR/postmaster.pid" ]; then
        as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w stop >/dev/null
    fi
}

status() {
    as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status || true
    if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        echo "mlflow server: running (pid $(cat "$PID_FILE")) at $TRACKING_URI"
    else
        echo "mlflow server: not running"
    fi
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
