#!/usr/bin/env bash
# A modern ClickHouse (26.x) served over its real HTTP and native protocols, from chdb's
# libchdb.so (npm package @chdb/lib-linux-x64-gnu) and our launcher dev/clickhouse/launcher.c.
# Debian's clickhouse-server is from 2018 and too old (see shared/infrastructure.md).
#   dev/clickhouse.sh install                          fetch libchdb.so, build the launcher (once)
#   dev/clickhouse.sh start DIR HTTP_PORT TCP_PORT [--restart-on-crash]
#                                                      serve data in DIR/data, log in DIR; with
#                                                      --restart-on-crash, a server that dies of
#                                                      a signal is started again
#                                                      (dev/clickhouse/restart-on-crash says why)
#   dev/clickhouse.sh stop DIR
#   dev/clickhouse.sh status DIR HTTP_PORT             one line; exit 0 only when healthy
#   dev/clickhouse.sh cluster-start DIR NAME HTTP_PORTS TCP_PORTS [--restart-on-crash]
#       a cluster NAME of 2 shards x 2 replicas: four servers in DIR/node1..node4 on the
#       comma-separated ports (4 each); node1 and node2 hold shard 1, node3 and node4 shard 2
#   dev/clickhouse.sh cluster-stop DIR
#   dev/clickhouse.sh cluster-status DIR HTTP_PORTS
# Development and tests only: the loopback server's default user has no password and can read
# any file through file().
set -euo pipefail
LOG_TAG=clickhouse
# shellcheck source=dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CHDB_PACKAGE=@chdb/lib-linux-x64-gnu
CHDB_VERSION=26.7.3-stable.1
DEST=$CACHE/chdb
LIB=$DEST/libchdb.so
MARKER=$DEST/.installed
SRC=$ROOT/dev/clickhouse/launcher.c
BIN=$DEST/meterline-clickhouse

library_installed() { [[ -f $LIB && -f $MARKER && $(<"$MARKER") == "$CHDB_VERSION" ]]; }
# The launcher is rebuilt when launcher.c changed since the last build (or the library did:
# a new libchdb.so deletes the binary).
launcher_built() { [[ -x $BIN && ! $SRC -nt $BIN ]]; }

cmd_install() {
  library_installed && launcher_built && return 0
  # A lock so dev/up and a test harness starting at once do not both download 178 MB into the
  # same folder. In a subshell so the lock is released when the install is done.
  (
    lock "$CACHE/chdb.lock"
    if ! library_installed; then
      log "fetching $CHDB_PACKAGE@$CHDB_VERSION from npm (178 MB, first run only)"
      local tmp=$DEST/download
      rm -rf "$tmp" "$BIN" "$MARKER"
      mkdir -p "$tmp"
      # npm pack fetches the package tarball through npm's own cache and registry settings
      # without installing anything (no node_modules, no package.json needed).
      (cd "$tmp" && npm pack --silent "$CHDB_PACKAGE@$CHDB_VERSION" >/dev/null)
      # Only the library is kept (566 MB unpacked); the tarball is dropped to save space.
      tar -xzf "$tmp"/*.tgz -C "$tmp" package/libchdb.so
      mv "$tmp/package/libchdb.so" "$LIB"
      rm -rf "$tmp"
      printf '%s\n' "$CHDB_VERSION" >"$MARKER"
    fi
    if ! launcher_built; then
      log "building $BIN"
      # -rpath '$ORIGIN': the binary finds libchdb.so next to itself wherever CACHE is.
      # shellcheck disable=SC2016 # $ORIGIN is for the dynamic linker, not the shell
      gcc -O2 -Wall -Wextra -Werror -o "$BIN.tmp" "$SRC" -L"$DEST" -lchdb -Wl,-rpath,'$ORIGIN'
      mv "$BIN.tmp" "$BIN"
    fi
  )
}

ping_ok() { [[ $(curl -sS --max-time 2 "http://127.0.0.1:$1/ping" 2>/dev/null) == "Ok." ]]; }

cmd_start() {
  [[ $# -eq 3 || ($# -eq 4 && $4 == --restart-on-crash) ]] ||
    usage "$0 start DIR HTTP_PORT TCP_PORT [--restart-on-crash]"
  local dir http=$2 tcp=$3 pid
  local -a supervisor=()
  [[ $# -eq 3 ]] || supervisor=("$ROOT/dev/clickhouse/restart-on-crash")
  require_port_pair HTTP_PORT "$http" TCP_PORT "$tcp"
  dir=$(abs_dir "$1")
  cmd_install
  lock "$dir/.lock"

  if pid=$(running_pid "$dir/clickhouse.pid" "$dir/data"); then
    # The launcher's arguments are DATA_DIR HTTP_PORT TCP_PORT.
    [[ $(tr '\0' ' ' <"/proc/$pid/cmdline") == *" $dir/data $http $tcp " ]] ||
      die "a server from $dir already runs (pid $pid) with other ports; stop it first"
    wait_for "clickhouse (pid $pid)" 60 "$pid" "$dir/clickhouse.log" -- ping_ok "$http"
    log "already running on 127.0.0.1:$http (pid $pid)"
    return 0
  fi
  rm -f "$dir/clickhouse.pid"
  require_free_port "$http"
  require_free_port "$tcp"
  mkdir -p "$dir/data"

  log "starting on http 127.0.0.1:$http, tcp 127.0.0.1:$tcp, dir $dir"
  # Working directory DIR: in this build an unknown table name in `default` can resolve to a
  # file in the working directory, so keep that a directory of our own.
  start_detached "$dir/clickhouse.pid" "$dir/clickhouse.log" "$dir" \
    "${supervisor[@]}" "$BIN" "$dir/data" "$http" "$tcp"
  pid=$(<"$dir/clickhouse.pid")
  wait_for "clickhouse (pid $pid)" 60 "$pid" "$dir/clickhouse.log" -- ping_ok "$http"
  log "ready on 127.0.0.1:$http (pid $pid) after ${SECONDS}s"
}

cmd_stop() { server_cmd_stop clickhouse data "$@"; }
cmd_status() { server_cmd_status clickhouse data HTTP_PORT ping_ok "$@"; }

# The cluster's nodes: a server each, told of the cluster by a config.xml in its working
# directory (the launcher's `clickhouse local` entry point reads ./config.xml). Plain engines:
# this build cannot run Replicated*MergeTree or ON CLUSTER (no Keeper, no interserver
# endpoint; shared/infrastructure.md), so internal_replication is false and the Distributed
# table writes every replica itself. The background distributed pool is 0 in this build's
# defaults, which would leave background inserts queued forever; meterline inserts in the
# foreground, and 4 threads keep anything else moving.
CLUSTER_NODES=4

# cluster_config NAME NODE TCP_PORTS...: node NODE's config.xml.
cluster_config() {
  local name=$1 node=$2
  shift 2
  printf '<clickhouse>\n  <remote_servers>\n    <%s>\n' "$name"
  local shard replica
  for shard in 1 2; do
    printf '      <shard>\n        <internal_replication>false</internal_replication>\n'
    for replica in 1 2; do
      printf '        <replica><host>127.0.0.1</host><port>%s</port></replica>\n' \
        "${@:$(((shard - 1) * 2 + replica)):1}"
    done
    printf '      </shard>\n'
  done
  printf '    </%s>\n  </remote_servers>\n' "$name"
  printf '  <macros><shard>%s</shard><replica>node%s</replica></macros>\n' \
    "$(((node + 1) / 2))" "$node"
  printf '  <background_distributed_schedule_pool_size>4</background_distributed_schedule_pool_size>\n'
  printf '</clickhouse>\n'
}

# ports_list NAME LIST: the CLUSTER_NODES ports of a comma-separated LIST, one per line.
ports_list() {
  local -a ports
  IFS=, read -r -a ports <<<"$2"
  ((${#ports[@]} == CLUSTER_NODES)) || die "$1 must list $CLUSTER_NODES ports, got: $2"
  local port
  for port in "${ports[@]}"; do
    require_port "$port"
    printf '%s\n' "$port"
  done
}

cmd_cluster_start() {
  [[ $# -eq 4 || ($# -eq 5 && $5 == --restart-on-crash) ]] ||
    usage "$0 cluster-start DIR NAME HTTP_PORTS TCP_PORTS [--restart-on-crash]"
  local -a restart=("${@:5}")
  local dir name=$2 node
  [[ $name =~ ^[A-Za-z][A-Za-z0-9_]*$ ]] || die "not a cluster name: $name"
  local -a http tcp
  mapfile -t http < <(ports_list HTTP_PORTS "$3")
  mapfile -t tcp < <(ports_list TCP_PORTS "$4")
  ((${#http[@]} == CLUSTER_NODES && ${#tcp[@]} == CLUSTER_NODES)) || exit 1
  dir=$(abs_dir "$1")
  cmd_install
  local -a jobs=()
  for node in $(seq 1 "$CLUSTER_NODES"); do
    mkdir -p "$dir/node$node"
    cluster_config "$name" "$node" "${tcp[@]}" >"$dir/node$node/config.xml"
    cmd_start "$dir/node$node" "${http[node - 1]}" "${tcp[node - 1]}" "${restart[@]}" &
    jobs+=($!)
  done
  local job failed=0
  for job in "${jobs[@]}"; do wait "$job" || failed=1; done
  ((failed == 0)) || die "a node of cluster $name did not start (logs in $dir/node*/clickhouse.log)"
  log "cluster $name ready: http ports ${http[*]}"
}

cmd_cluster_stop() {
  [[ $# -eq 1 ]] || usage "$0 cluster-stop DIR"
  local dir=$1 node
  for node in $(seq 1 "$CLUSTER_NODES"); do
    [[ ! -d $dir/node$node ]] || cmd_stop "$dir/node$node"
  done
}

cmd_cluster_status() {
  [[ $# -eq 2 ]] || usage "$0 cluster-status DIR HTTP_PORTS"
  local dir=$1 node rc=0
  local -a http
  mapfile -t http < <(ports_list HTTP_PORTS "$2")
  ((${#http[@]} == CLUSTER_NODES)) || exit 1
  for node in $(seq 1 "$CLUSTER_NODES"); do
    cmd_status "$dir/node$node" "${http[node - 1]}" || rc=1
  done
  return "$rc"
}

case ${1:-} in
cluster-start | cluster-stop | cluster-status)
  command=${1//-/_}
  shift
  "cmd_$command" "$@"
  ;;
*) server_main "$0 install|start DIR HTTP_PORT TCP_PORT [--restart-on-crash]|stop DIR|status DIR HTTP_PORT|cluster-start DIR NAME HTTP_PORTS TCP_PORTS [--restart-on-crash]|cluster-stop DIR|cluster-status DIR HTTP_PORTS" "$@" ;;
esac
