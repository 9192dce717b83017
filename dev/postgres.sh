#!/usr/bin/env bash
# PostgreSQL 15 (Debian's packages) for the dev stack and for tests.
#   dev/postgres.sh start | stop | status | port   the machine's cluster 15/main (dev stack)
#   dev/postgres.sh start-private DIR PORT          a throwaway instance in DIR, for tests that
#   dev/postgres.sh stop-private DIR                must stop or kill a database
#   dev/postgres.sh start-private DIR PORT --tls CERT KEY
#                                                   the same serving TLS only: ssl = on with the
#                                                   PEM certificate and key, and TCP logins from
#                                                   hostssl lines only (a plaintext client is
#                                                   refused), password (SCRAM) authentication
#   dev/postgres.sh status-private DIR PORT
# Both have the login role meterline/meterline (CREATEDB: the test harness makes one database
# per test) and a database meterline owned by it. Both listen on 127.0.0.1 only.
set -euo pipefail
LOG_TAG=postgres
# shellcheck source=dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_VERSION=15
PG_CLUSTER=main
PG_BIN=/usr/lib/postgresql/$PG_VERSION/bin

# The server runs as the postgres user. From / so that tools do not complain that they cannot
# read the caller's working directory (often /root); without our other descriptors so that a
# postmaster started through here does not keep a caller's pipe open (see lib.sh).
as_postgres() { (cd / && without_inherited_fds runuser -u postgres -- "$@"); }

# Creates the role and the database if missing; PSQL_ARGS say how to reach the server as a
# superuser. Re-running only re-asserts the role's attributes and password.
ensure_role_and_db() {
  as_postgres psql -X -q -v ON_ERROR_STOP=1 "$@" -d postgres >/dev/null <<'SQL'
SELECT 'CREATE ROLE meterline' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'meterline')
\gexec
ALTER ROLE meterline WITH LOGIN CREATEDB PASSWORD 'meterline';
SELECT 'CREATE DATABASE meterline OWNER meterline'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'meterline')
\gexec
SQL
}

# --- the machine's cluster 15/main -------------------------------------------------------------

# Columns of `pg_lsclusters -h`: version, cluster, port, status, owner, data directory, log file.
cluster_field() {
  pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" -v f="$1" '$1 == v && $2 == c { print $f }'
}

cmd_port() { cluster_field 3; }

cluster_running() { pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" status >/dev/null 2>&1; }

cmd_start() {
  if [[ -z $(cluster_field 3) ]]; then
    log "creating cluster $PG_VERSION/$PG_CLUSTER"
    pg_createcluster "$PG_VERSION" "$PG_CLUSTER" >&2
  fi
  # Debian's default is listen_addresses = 'localhost' (127.0.0.1 and ::1): loopback only, as
  # every dev server here. Keep it that way if someone changed it.
  local listen
  listen=$(pg_conftool -s "$PG_VERSION" "$PG_CLUSTER" show listen_addresses 2>/dev/null || echo localhost)
  if [[ $listen != localhost && $listen != 127.0.0.1 ]]; then
    log "listen_addresses was '$listen', setting it back to localhost"
    pg_conftool "$PG_VERSION" "$PG_CLUSTER" set listen_addresses localhost
    if cluster_running; then
      without_inherited_fds pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" restart
    fi
  fi
  local port
  port=$(cmd_port)
  if cluster_running; then
    log "cluster $PG_VERSION/$PG_CLUSTER already running on port $port"
  else
    log "starting cluster $PG_VERSION/$PG_CLUSTER on 127.0.0.1:$port"
    # No systemd on these machines: without this flag pg_ctlcluster, run as root, may try to
    # hand the start to systemctl.
    # A concurrent dev/up may have started it between the check and here: that is fine.
    without_inherited_fds pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" start ||
      cluster_running ||
      die "pg_ctlcluster could not start $PG_VERSION/$PG_CLUSTER"
  fi
  wait_for "postgres" 30 "" "$(cluster_field 7)" -- pg_isready -q -h 127.0.0.1 -p "$port"
  ensure_role_and_db -p "$port"
}

cmd_stop() {
  if [[ -z $(cluster_field 3) ]] || ! cluster_running; then
    log "cluster $PG_VERSION/$PG_CLUSTER not running"
    return 0
  fi
  log "stopping cluster $PG_VERSION/$PG_CLUSTER"
  pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" stop
}

# pid of the postmaster: the first line of postmaster.pid in the data directory.
postmaster_pid() { head -n 1 "$1/postmaster.pid" 2>/dev/null || true; }

cmd_status() {
  local port
  port=$(cmd_port)
  if [[ -z $port ]] || ! cluster_running; then
    status_line postgres "127.0.0.1:${port:-5432}" "" stopped
    return 1
  fi
  local pid
  pid=$(postmaster_pid "$(cluster_field 6)")
  if pg_isready -q -h 127.0.0.1 -p "$port"; then
    status_line postgres "127.0.0.1:$port" "$pid" healthy
  else
    status_line postgres "127.0.0.1:$port" "$pid" unhealthy
    return 1
  fi
}

# --- private throwaway instances -----------------------------------------------------------------

private_running() { as_postgres "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

cmd_start_private() {
  [[ $# -eq 2 || ($# -eq 5 && $3 == --tls) ]] || usage "$0 start-private DIR PORT [--tls CERT KEY]"
  local dir port=$2 tls_options=""
  require_port "$port"
  dir=$(abs_path "$1")
  # The path goes into pg_ctl's -o string, which a shell splits.
  [[ $dir =~ ^[A-Za-z0-9_./-]+$ ]] || die "DIR must be a plain path (letters, digits, _ . / -): $dir"
  # The server runs as postgres: it must reach DIR. tempfile-style 0700 directories owned by root
  # cannot be crossed; pass such a directory itself as DIR (it is chowned below) instead.
  as_postgres test -x "$(dirname "$dir")" ||
    die "the postgres user cannot reach $(dirname "$dir"); pass a DIR whose parents it can enter"
  mkdir -p "$dir"

  if [[ ! -f $dir/PG_VERSION ]]; then
    [[ -z $(ls -A "$dir") ]] || die "$dir is not empty and holds no PostgreSQL data directory"
    chown postgres:postgres "$dir"
    chmod 0700 "$dir"
    log "initdb in $dir"
    # Throwaway instance: trust authentication on the local socket and 127.0.0.1, and no fsync
    # of the new files (-N).
    # Its output is kept in memory: initdb wants DIR empty, so no log file can go there first.
    local out
    out=$(as_postgres "$PG_BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 -N 2>&1) || {
      printf '%s\n' "$out" | tail -n 40 >&2
      die "initdb failed"
    }
  fi

  if [[ $# -eq 5 ]]; then
    # The server reads its key only if the postgres user owns it and no one else may read it.
    install -o postgres -g postgres -m 0644 "$4" "$dir/server.crt"
    install -o postgres -g postgres -m 0600 "$5" "$dir/server.key"
    # The local socket stays trusted (the role and database are made through it); TCP only
    # over TLS, with the password.
    printf '%s\n' 'local all all trust' 'hostssl all all 127.0.0.1/32 scram-sha-256' |
      as_postgres tee "$dir/pg_hba.conf" >/dev/null
    tls_options=" -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key"
  fi

  if private_running "$dir"; then
    log "private instance in $dir already running"
  else
    require_free_port "$port"
    log "starting private instance on 127.0.0.1:$port, dir $dir"
    # fsync=off: a test that kills this server still finds every committed row (the OS keeps the
    # written pages); only an OS crash could lose data, and this data is thrown away anyway.
    as_postgres "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/pg.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off$tls_options" start >/dev/null || {
      show_logs "$dir/pg.log"
      die "private instance did not start"
    }
  fi
  wait_for "private postgres" 30 "" "$dir/pg.log" -- pg_isready -q -h 127.0.0.1 -p "$port"
  ensure_role_and_db -h "$dir" -p "$port" -U postgres
}

cmd_stop_private() {
  [[ $# -eq 1 ]] || usage "$0 stop-private DIR"
  local dir
  dir=$(abs_path "$1")
  if [[ ! -f $dir/PG_VERSION ]] || ! private_running "$dir"; then
    log "private instance in $dir not running"
    return 0
  fi
  log "stopping private instance in $dir"
  as_postgres "$PG_BIN/pg_ctl" -D "$dir" -m fast -w -t 30 stop >/dev/null
}

cmd_status_private() {
  [[ $# -eq 2 ]] || usage "$0 status-private DIR PORT"
  local dir port=$2
  require_port "$port"
  dir=$(abs_path "$1")
  if [[ ! -f $dir/PG_VERSION ]] || ! private_running "$dir"; then
    status_line postgres "127.0.0.1:$port" "" stopped
    return 1
  fi
  if pg_isready -q -h 127.0.0.1 -p "$port"; then
    status_line postgres "127.0.0.1:$port" "$(postmaster_pid "$dir")" healthy
  else
    status_line postgres "127.0.0.1:$port" "$(postmaster_pid "$dir")" unhealthy
    return 1
  fi
}

case ${1:-} in
start | stop | status | port) "cmd_$1" ;;
start-private | stop-private | status-private)
  cmd=${1//-/_}
  shift
  "cmd_$cmd" "$@"
  ;;
*) usage "$0 start|stop|status|port|start-private DIR PORT [--tls CERT KEY]|stop-private DIR|status-private DIR PORT" ;;
esac
