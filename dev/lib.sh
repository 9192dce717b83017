# shellcheck shell=bash disable=SC2034 # the variables below are used by the sourcing scripts
# Shared helpers for the dev stack scripts (dev/up, dev/down, dev/status, dev/*.sh).
# Sourced, never run. Every server these scripts start binds to 127.0.0.1 only.
#
# Layout:
#   CACHE  downloads and build products that take minutes to fetch (Kafka jars, libchdb.so,
#          the compiled ClickHouse launcher); kept across `dev/down`, git-ignored.
#   STATE  data directories, pid files and logs of the main dev stack; git-ignored.
# Both can be moved with METERLINE_CACHE / METERLINE_STATE (CI may point CACHE somewhere shared).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
CACHE=${METERLINE_CACHE:-$ROOT/.cache}
STATE=${METERLINE_STATE:-$ROOT/dev/.state}

# Ports of the main dev stack; tests start private instances on ports of their own.
KAFKA_PORT=${METERLINE_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${METERLINE_KAFKA_CONTROLLER_PORT:-19093}
CLICKHOUSE_HTTP_PORT=${METERLINE_CLICKHOUSE_HTTP_PORT:-18123}
CLICKHOUSE_TCP_PORT=${METERLINE_CLICKHOUSE_TCP_PORT:-19000}
STRIPE_PORT=${METERLINE_STRIPE_PORT:-12111}
# The 2x2 loopback ClickHouse cluster of `dev/up --clickhouse-cluster`: four nodes' ports.
CLICKHOUSE_CLUSTER_HTTP_PORTS=${METERLINE_CLICKHOUSE_CLUSTER_HTTP_PORTS:-18131,18132,18133,18134}
CLICKHOUSE_CLUSTER_TCP_PORTS=${METERLINE_CLICKHOUSE_CLUSTER_TCP_PORTS:-19131,19132,19133,19134}
CLICKHOUSE_CLUSTER_NAME=meterline

# Prefix for log lines; each script sets its own component name.
LOG_TAG=${LOG_TAG:-dev}

log() { printf '%s: %s\n' "$LOG_TAG" "$*" >&2; }
die() {
  log "$*"
  exit 1
}

# Usage line for a script's subcommands; exits 2 like most CLIs do on bad usage.
usage() {
  printf 'usage: %s\n' "$@" >&2
  exit 2
}

is_port() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }
require_port() { is_port "$1" || die "not a port number: $1"; }

# require_port_pair NAME PORT OTHER_NAME OTHER_PORT: the two ports a server script's start takes
# (NAME and OTHER_NAME as its usage line calls them) are port numbers, and not the same one.
require_port_pair() {
  require_port "$2"
  require_port "$4"
  [[ $2 != "$4" ]] || die "$1 and $3 must differ (both $2)"
}

# True when something accepts TCP connections on 127.0.0.1:PORT. Uses bash's /dev/tcp so
# no extra tool is needed; a closed loopback port refuses at once, `timeout` guards the rest.
# shellcheck disable=SC2016 # $1 is expanded by the inner bash, on purpose
port_open() { timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null; }

# Dies when something other than the server about to start already listens on 127.0.0.1:PORT.
require_free_port() { ! port_open "$1" || die "127.0.0.1:$1 is already in use by another process"; }

# Absolute, symlink-free path of DIR, existing or not, so pid-file checks that match the
# process command line work whatever directory the caller passed the path from.
abs_path() { realpath -m -- "$1"; }

# The same, creating DIR if missing.
abs_dir() {
  mkdir -p -- "$1"
  abs_path "$1"
}

# True when PID is a live process (not a zombie: a child that died while its parent, this
# script, has not reaped it yet still answers kill -0).
pid_alive() {
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ -n $stat && $stat != Z* ]]
}

# wait_gone PID TRIES INTERVAL_S: true as soon as PID has exited, polling up to TRIES times
# INTERVAL_S apart; false when it still runs after that.
wait_gone() {
  local pid=$1 tries=$2 interval=$3
  for _ in $(seq "$tries"); do
    pid_alive "$pid" || return 0
    sleep "$interval"
  done
  ! pid_alive "$pid"
}

# Prints the pid recorded in PIDFILE when that process is alive AND one of its command-line
# arguments is exactly MARK (a path inside the instance's directory). The second test keeps a
# stale pid file from matching an unrelated process that reused the pid after a reboot or a
# crash. Returns 1 otherwise.
running_pid() {
  local pidfile=$1 mark=$2 pid args
  [[ -f $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  pid_alive "$pid" || return 1
  args=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  grep -qxF -- "$mark" <<<"$args" || return 1
  printf '%s\n' "$pid"
}

# Prints the last 40 lines of each non-empty log file given, to stderr.
show_logs() {
  local f
  for f in "$@"; do
    [[ -s $f ]] || continue
    printf -- '--- last 40 lines of %s ---\n' "$f" >&2
    tail -n 40 "$f" >&2
  done
}

# wait_for WHAT TIMEOUT_S PID LOG... -- CHECK [ARGS...]
# Polls CHECK every 0.2 s until it succeeds. Fails (exit 1, with the logs' tails) when TIMEOUT_S
# passes, or at once when PID (if not empty) has died: a broker that crashed on a bad config
# should not make the caller wait the whole timeout.
wait_for() {
  local what=$1 timeout=$2 pid=$3
  shift 3
  local logs=()
  while [[ $# -gt 0 && $1 != -- ]]; do
    logs+=("$1")
    shift
  done
  [[ ${1:-} == -- ]] || die "wait_for: missing -- before the check"
  shift
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    if [[ -n $pid ]] && ! pid_alive "$pid"; then
      log "$what exited while starting"
      show_logs "${logs[@]}"
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      log "$what not ready after ${timeout}s"
      show_logs "${logs[@]}"
      exit 1
    fi
    sleep 0.2
  done
}

# without_inherited_fds CMD [ARGS...]
# Runs CMD with every inherited file descriptor above 2 closed. Servers we start must not keep a
# caller's pipe open: a caller that reads our output through a pipe (a Rust
# `Command::output()`, a `$(...)`) would wait until the server exits; nor our lock (fd 9).
# shellcheck disable=SC2016 # $f and $n belong to the inner bash, on purpose
CLOSE_FDS_SCRIPT='
for f in /proc/self/fd/*; do
  n=${f##*/}
  if ((n > 2)); then exec {n}>&-; fi
done
exec "$@"'
without_inherited_fds() { bash -c "$CLOSE_FDS_SCRIPT" _ "$@"; }

# start_detached PIDFILE OUTFILE CWD CMD [ARGS...]
# Runs CMD in the background in a session of its own (setsid): a Ctrl-C on `dev/up` or the end
# of a test harness's process group must not take the server down with it. stdin is /dev/null,
# stdout and stderr go to OUTFILE, other descriptors are closed (see without_inherited_fds).
# The pid written is the server's own: the inner shell writes its pid, then execs CMD.
start_detached() {
  local pidfile=$1 outfile=$2 cwd=$3
  shift 3
  (
    cd "$cwd" || exit 1
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner bash, on purpose
    exec setsid bash -c 'echo $$ >"$1"; shift; '"$CLOSE_FDS_SCRIPT" _ "$pidfile" "$@" \
      </dev/null >>"$outfile" 2>&1
  ) &
  # The pid file is written by the child; wait until it is there so callers can read it.
  for _ in $(seq 50); do
    [[ -s $pidfile ]] && return 0
    sleep 0.05
  done
  die "no pid file after starting $*"
}

# stop_pid WHAT PIDFILE MARK
# SIGTERM, up to 30 s for a clean exit (Kafka and ClickHouse flush and close their logs),
# then SIGKILL. Removes the pid file. Not running is not an error.
stop_pid() {
  local what=$1 pidfile=$2 mark=$3 pid
  if ! pid=$(running_pid "$pidfile" "$mark"); then
    rm -f "$pidfile"
    log "$what not running"
    return 0
  fi
  log "stopping $what (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" 150 0.2; then
    log "$what did not exit in 30s, killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 0.1 || true
  fi
  rm -f "$pidfile"
}

# status_line NAME ADDRESS PID STATE: the one-line format shared by every component.
status_line() { printf '%-10s  %-16s  pid %-7s  %s\n' "$1" "$2" "${3:--}" "$4"; }

# server_status NAME PORT PIDFILE MARK CHECK [ARGS...]: the status line of a server started by
# start_detached: stopped, healthy (CHECK succeeds) or unhealthy. Returns 1 unless healthy.
server_status() {
  local name=$1 port=$2 pidfile=$3 mark=$4 pid
  shift 4
  if ! pid=$(running_pid "$pidfile" "$mark"); then
    status_line "$name" "127.0.0.1:$port" "" stopped
    return 1
  fi
  if "$@"; then
    status_line "$name" "127.0.0.1:$port" "$pid" healthy
  else
    status_line "$name" "127.0.0.1:$port" "$pid" unhealthy
    return 1
  fi
}

# The stop and status subcommands of a server script whose instance lives in DIR: pid file
# DIR/NAME.pid (written by start_detached), DIR/MARK on its command line (see running_pid), and
# `CHECK PORT` true while it serves. PORT_NAME is how the usage line names the port.
# server_cmd_stop NAME MARK [ARGS...]
server_cmd_stop() {
  local name=$1 mark=$2
  shift 2
  [[ $# -eq 1 ]] || usage "$0 stop DIR"
  local dir
  dir=$(abs_path "$1")
  stop_pid "$name in $dir" "$dir/$name.pid" "$dir/$mark"
}

# server_cmd_status NAME MARK PORT_NAME CHECK [ARGS...]
server_cmd_status() {
  local name=$1 mark=$2 port_name=$3 check=$4
  shift 4
  [[ $# -eq 2 ]] || usage "$0 status DIR $port_name"
  local dir port=$2
  require_port "$port"
  dir=$(abs_path "$1")
  server_status "$name" "$port" "$dir/$name.pid" "$dir/$mark" "$check" "$port"
}

# server_main USAGE [ARGS...]: the command line of a server script (install, or start, stop
# and status with their arguments), dispatched to its cmd_* functions.
server_main() {
  local usage_text=$1
  shift
  case ${1:-} in
  install) cmd_install ;;
  start | stop | status)
    local cmd=$1
    shift
    "cmd_$cmd" "$@"
    ;;
  *) usage "$usage_text" ;;
  esac
}

# Takes an exclusive lock on FILE for the rest of the calling script, on fd 9. Used so two
# callers (dev/up and a test harness, or two tests) do not install or start the same thing at
# the same time.
lock() {
  mkdir -p "$(dirname "$1")"
  exec 9>"$1"
  flock 9
}
