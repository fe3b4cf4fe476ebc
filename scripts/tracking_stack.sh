#!/usr/bin/env bash
# A shared tracking stack on one machine: PostgreSQL (the MLflow backend store, MLflow's user
# store and the Optuna database) and an `mlflow server` with MLflow's basic-auth app on it that
# proxies artifact storage, so clients need only MLFLOW_TRACKING_URI=http://HOST:PORT and their
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. The commands are those a team would run on
# a real host.
#
#   scripts/tracking_stack.sh start    # initialise (first time) and start both
#   scripts/tracking_stack.sh status
#   scripts/tracking_stack.sh stop     # stop both; the data stays in STACK_DIR
#
# Settings (environment variables, defaults in brackets):
#   STACK_DIR       [outputs/stack]  PostgreSQL data (pgdata/), artifacts (artifacts/), secrets/,
#                                    logs, pid
#   PG_PORT         [5433]           PostgreSQL port
#   PG_LISTEN       [127.0.0.1]      PostgreSQL's listen_addresses (127.0.0.1 is always one)
#   PG_CLIENTS      []               a CIDR (e.g. 10.0.0.0/24) whose tune workers may reach the
#                                    optuna database (password required); none when empty
#   MLFLOW_HOST     [127.0.0.1]      address of the MLflow server (0.0.0.0 for other machines,
#                                    then also set MLFLOW_SERVER_ARGS="--allowed-hosts host:port")
#   MLFLOW_PORT     [5003]           its port (5001: `mlflow ui`, 5002: `mlflow models serve`)
#   MLFLOW_WORKERS  [2]              its worker processes
#   MLFLOW_DEFAULT_PERMISSION [NO_PERMISSIONS]  what an account may do where it holds no grant
#                                    (NO_PERMISSIONS or READ; anonymous requests always get 401)
#   MLFLOW_AUTH_CACHE_SECONDS [60]   how long a worker trusts a checked password (0: hash every
#                                    request; a deleted account works this long on other workers)
#   MLFLOW_SERVER_ARGS []            more `mlflow server` options
#   PG_BIN          [pg_config --bindir, else the newest /usr/lib/postgresql/*/bin]
#
# Secrets, generated on the first start (or read, if an operator put them there first), each a
# file of mode 0600 in STACK_DIR/secrets (0700) and never printed: `postgres` (the superuser,
# used only by this script), `mlflow-db` (the PostgreSQL role `mlflow`, owner of the databases
# mlflow and mlflow_auth), `optuna` (the role `optuna`, owner of the database optuna),
# `mlflow-admin` (the MLflow user `admin`), `flask-secret-key` (MLFLOW_FLASK_SERVER_SECRET_KEY).
# Passwords reach PostgreSQL through stdin and a libpq password file, never a command line.
#
# PostgreSQL refuses to run as root: run as root, the script runs initdb and pg_ctl as the
# `postgres` user (STACK_DIR and its parents must be readable by it); otherwise as the current
# user. Needs `pip install -e ".[postgres]"` (the driver and Flask-WTF, which basic-auth needs).
set -euo pipefail

STACK_DIR=$(realpath -m "${STACK_DIR:-outputs/stack}")
PG_PORT=${PG_PORT:-5433}
PG_LISTEN=${PG_LISTEN:-127.0.0.1}
PG_CLIENTS=${PG_CLIENTS:-}
MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
MLFLOW_PORT=${MLFLOW_PORT:-5003}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
MLFLOW_DEFAULT_PERMISSION=${MLFLOW_DEFAULT_PERMISSION:-NO_PERMISSIONS}
MLFLOW_AUTH_CACHE_SECONDS=${MLFLOW_AUTH_CACHE_SECONDS:-60}
PG_BIN=${PG_BIN:-$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
PGDATA_DIR=$STACK_DIR/pgdata
SECRETS=$STACK_DIR/secrets
PID_FILE=$STACK_DIR/mlflow.pid
AUTH_CONFIG=$STACK_DIR/basic_auth.ini
# The script and the MLflow server reach PostgreSQL on its machine, whatever else it listens on.
PG_HOST=127.0.0.1
case "$PG_LISTEN" in
'*' | 0.0.0.0 | 127.0.0.1 | 127.0.0.1,*) ;;
*) PG_LISTEN=$PG_HOST,$PG_LISTEN ;;
esac
TRACKING_URI=http://$MLFLOW_HOST:$MLFLOW_PORT
[ "$MLFLOW_HOST" = 0.0.0.0 ] && TRACKING_URI=http://$(hostname):$MLFLOW_PORT

if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/pg_ctl" ]; then
    echo "PostgreSQL binaries not found (set PG_BIN to the folder holding initdb and pg_ctl)" >&2
    exit 1
fi
case "$MLFLOW_DEFAULT_PERMISSION" in
NO_PERMISSIONS | READ) ;;
*)
    echo "MLFLOW_DEFAULT_PERMISSION must be NO_PERMISSIONS or READ: a default that writes lets every account change every run" >&2
    exit 2
    ;;
esac
case "$MLFLOW_AUTH_CACHE_SECONDS" in
'' | *[!0-9]*)
    echo "MLFLOW_AUTH_CACHE_SECONDS must be a whole number of seconds (0 turns the cache off)" >&2
    exit 2
    ;;
esac

is_root() { [ "$(id -u)" = 0 ]; }

as_postgres() {  # PostgreSQL's server programs refuse root
    if is_root; then
        # Debian keeps runuser in /usr/sbin, which a minimal PATH (cron, CI) leaves out.
        local runuser
        runuser=$(command -v runuser || echo /usr/sbin/runuser)
        if [ ! -x "$runuser" ]; then
            echo "running as root needs runuser (util-linux) to start PostgreSQL as 'postgres'" >&2
            exit 1
        fi
        "$runuser" -u postgres -- "$@"
    else
        "$@"
    fi
}

secret() {  # the secret in SECRETS/$1, generated (48 hex digits, mode 0600) when missing
    local file=$SECRETS/$1 value
    if [ ! -s "$file" ]; then
        (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$file")
    fi
    chmod 600 "$file"
    value=$(<"$file")
    # Secrets go into SQL, a libpq password file and URLs unquoted: only characters safe in all three.
    case "$value" in
    *[!A-Za-z0-9._~-]*)
        echo "$file may hold only letters, digits and . _ ~ - (its value is not shown)" >&2
        exit 1
        ;;
    esac
    printf '%s' "$value"
}

psql_admin() {  # the superuser, with its password in the environment of psql alone
    PGPASSWORD=$(secret postgres) "$PG_BIN/psql" -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 -qtA "$@"
}

init_cluster() {
    mkdir -p "$PGDATA_DIR"
    chmod 700 "$PGDATA_DIR"
    is_root && chown postgres: "$PGDATA_DIR"
    # initdb reads the superuser's password from a file its own user can read; gone right after.
    local pwfile=$STACK_DIR/.initdb-pwfile
    (umask 077 && secret postgres >"$pwfile")
    is_root && chown postgres: "$pwfile"
    if ! as_postgres "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=scram-sha-256 --pwfile="$pwfile" \
        -E UTF8 >"$STACK_DIR/initdb.log" 2>&1; then
        rm -f "$pwfile"
        echo "initdb failed; its log ($STACK_DIR/initdb.log) ends with:" >&2
        tail -n 20 "$STACK_DIR/initdb.log" >&2
        exit 1
    fi
    rm -f "$pwfile"
}

write_hba() {  # written on every start, so a changed PG_CLIENTS applies on restart
    local hba=$PGDATA_DIR/pg_hba.conf
    {
        echo "# Written by scripts/tracking_stack.sh on every start; edits here are lost."
        echo "# TYPE DATABASE           USER      ADDRESS        METHOD"
        echo "host   all                postgres  $PG_HOST/32   scram-sha-256"
        echo "host   mlflow,mlflow_auth mlflow    $PG_HOST/32   scram-sha-256"
        echo "host   optuna             optuna    $PG_HOST/32   scram-sha-256"
        if [ -n "$PG_CLIENTS" ]; then
            echo "host   optuna             optuna    $PG_CLIENTS   scram-sha-256"
        fi
    } >"$hba.new"
    is_root && chown postgres: "$hba.new"
    chmod 600 "$hba.new"
    mv "$hba.new" "$hba"
}

ensure_roles_and_databases() {
    # Roles get the passwords of their files on every start (so rotating a file and restarting
    # rotates the password). The SQL goes through stdin, and PostgreSQL is told not to log it
    # even when it fails, so no password lands on a command line or in postgres.log.
    {
        echo "SET log_statement = 'none'; SET log_min_error_statement = 'panic';"
        for role in mlflow optuna; do
            local file=optuna
            [ "$role" = mlflow ] && file=mlflow-db
            echo "SELECT format('CREATE ROLE %I', '$role') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$role') \\gexec"
            echo "ALTER ROLE $role LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '$(secret "$file")';"
        done
    } | psql_admin -f -
    for pair in mlflow:mlflow mlflow_auth:mlflow optuna:optuna; do
        local database=${pair%%:*} owner=${pair##*:}
        if [ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
            psql_admin -c "CREATE DATABASE $database OWNER $owner"
        fi
    done
}

start() {
    mkdir -p "$STACK_DIR/artifacts" "$SECRETS"
    chmod 755 "$STACK_DIR"
    chmod 700 "$SECRETS"
    for name in postgres mlflow-db optuna mlflow-admin flask-secret-key; do
        secret "$name" >/dev/null # made now, or refused now (in $(...) below a refusal would not stop the script)
    done
    if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
        init_cluster
    elif [ ! -s "$SECRETS/postgres" ]; then
        echo "$PGDATA_DIR was initialised without a superuser password (an older version of this" \
            "script, trust authentication): remove STACK_DIR or choose another one" >&2
        exit 1
    fi
    write_hba
    is_root && touch "$STACK_DIR/postgres.log" && chown postgres: "$STACK_DIR/postgres.log"
    # TCP only, no Unix socket (its folder would need to be the postgres user's).
    as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$STACK_DIR/postgres.log" -w -t 60 \
        -o "-p $PG_PORT -c listen_addresses='$PG_LISTEN' -c unix_socket_directories='' -c password_encryption=scram-sha-256" \
        start >/dev/null
    ensure_roles_and_databases

    # The server connects as `mlflow` with the password from a libpq password file, so the
    # URLs below (on its command line, in `ps`) carry none.
    (umask 077 && echo "$PG_HOST:$PG_PORT:*:mlflow:$(secret mlflow-db)" >"$SECRETS/mlflow.pgpass")
    local database_url=postgresql://mlflow@$PG_HOST:$PG_PORT
    (umask 077 && cat >"$AUTH_CONFIG" <<EOF
[mlflow]
default_permission = $MLFLOW_DEFAULT_PERMISSION
database_uri = $database_url/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = $MLFLOW_AUTH_CACHE_SECONDS
EOF
    )
    # setsid: its own process group, so `stop` ends the server and its workers together.
    # The admin password is read only when the user store is empty (the first start).
    # shellcheck disable=SC2086
    PGPASSFILE=$SECRETS/mlflow.pgpass MLFLOW_AUTH_CONFIG_PATH=$AUTH_CONFIG \
        MLFLOW_AUTH_ADMIN_PASSWORD=$(secret mlflow-admin) \
        MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret flask-secret-key) \
        setsid mlflow server --app-name basic-auth \
        --backend-store-uri "$database_url/mlflow" \
        --artifacts-destination "$STACK_DIR/artifacts" \
        --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
        ${MLFLOW_SERVER_ARGS:-} >"$STACK_DIR/mlflow.log" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    for _ in $(seq 240); do
        if curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1; then
            cat <<EOF
Tracking stack running (data in $STACK_DIR). On every client, with the account an admin made:
  export MLFLOW_TRACKING_URI=$TRACKING_URI
  export MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password>
The MLflow admin is 'admin', its password in $SECRETS/mlflow-admin.
Optuna storage for tune workers (the shell reads the password):
  -P storage="postgresql://optuna:\$(cat $SECRETS/optuna)@$PG_HOST:$PG_PORT/optuna"
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
