#!/usr/bin/env bash
# A real Apache Kafka 4.x broker (single node, KRaft: broker and controller in one JVM) run from
# the jars on Maven Central. Used by dev/up for the dev stack (STATE/kafka) and by the Rust test
# harness for private brokers that a test can stop and restart:
#   dev/kafka.sh install                          fetch the jars into CACHE/kafka/libs (once)
#   dev/kafka.sh start DIR PORT CONTROLLER_PORT   run a broker whose config, data and logs live in DIR
#   dev/kafka.sh start DIR PORT CONTROLLER_PORT --sasl-ssl SECURE_PORT CERT KEY USER PASSWORD [CLIENT_CA]
#                                                 the same plus a SASL_SSL listener on SECURE_PORT:
#                                                 TLS with the PEM certificate and (PKCS#8) key,
#                                                 then SCRAM-SHA-256 or SCRAM-SHA-512 (USER created
#                                                 at format time; PLAIN is refused, so a client
#                                                 set to it meets "unsupported mechanism"); with
#                                                 CLIENT_CA, only clients presenting a
#                                                 certificate it signed (mutual TLS); PORT stays
#                                                 plaintext for the broker's own traffic and
#                                                 tests' admin
#   dev/kafka.sh scram PORT USER PASSWORD         sets USER's SCRAM-SHA-256 and -512 password on
#                                                 the broker at PORT (plaintext), with Kafka's own
#                                                 ConfigCommand, as an operator rotating it would
#   dev/kafka.sh stop DIR
#   dev/kafka.sh status DIR PORT                  one line; exit 0 only when healthy
# Several instances run side by side as long as each has its own DIR and ports.
set -euo pipefail
LOG_TAG=kafka
# shellcheck source=dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

POM=$ROOT/dev/kafka/pom.xml
LIBS=$CACHE/kafka/libs
MARKER=$LIBS/.installed

# What the marker must say for the jars to count as installed: the Kafka version plus a hash of
# the pom, so any change to the pom (a log4j bump, a new tool) refetches.
wanted_marker() {
  local version
  version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")
  printf 'kafka %s pom %s\n' "$version" "$(sha256sum "$POM" | cut -c1-16)"
}

installed() { [[ -f $MARKER && $(<"$MARKER") == "$(wanted_marker)" ]]; }

cmd_install() {
  installed && return 0
  # A lock so dev/up and a test harness (or two tests) starting at once do not both run maven
  # into the same folder. In a subshell so the lock is released when the install is done.
  (
    lock "$CACHE/kafka.lock"
    installed && exit 0
    log "fetching $(wanted_marker | cut -d' ' -f1-2) jars from maven central (first run only)"
    rm -rf "$LIBS"
    mkdir -p "$LIBS"
    # Resolves into maven's own ~/.m2 cache as usual, then copies the runtime jars into one
    # flat folder for `java -cp 'LIBS/*'`. Maven's output goes to a log shown only on failure.
    mvn -q -B -f "$POM" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$LIBS" >"$CACHE/kafka/mvn.log" 2>&1 || {
      show_logs "$CACHE/kafka/mvn.log"
      die "maven could not fetch the kafka jars"
    }
    # Fail here, not at first start, if the classes we run are missing. A jar's file names are
    # stored uncompressed in the zip directory, so grep finds them without unzip.
    grep -qaF 'kafka/tools/StorageTool.class' "$LIBS"/kafka_2.13-*.jar ||
      die "kafka.tools.StorageTool not found in $LIBS"
    wanted_marker >"$MARKER"
    log "installed $(find "$LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$LIBS" | cut -f1)) in $LIBS"
  )
}

# A minimal Kafka protocol round trip: an ApiVersions v0 request (api key 18, correlation id 42,
# client id "ml") over bash's /dev/tcp, expecting a response with correlation id 42 and error
# code 0. The broker opens its listener socket before it processes requests, so an open port
# alone does not mean it serves; this answer only comes once request handling is enabled at
# the end of startup. Needs no Kafka client (Debian's kcat is too old for Kafka 4, see
# shared/infrastructure.md).
api_versions_ok() {
  local reply
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash, on purpose
  reply=$(timeout 3 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "\x00\x00\x00\x0c\x00\x12\x00\x00\x00\x00\x00\x2a\x00\x02ml" >&3
    head -c 10 <&3 | od -An -tx1' _ "$1" 2>/dev/null) || return 1
  reply=${reply//[[:space:]]/}
  # length (any) | correlation id 42 | error code 0
  [[ $reply == ????????0000002a0000 ]]
}

write_config() {
  local dir=$1 port=$2 cport=$3
  # With --sasl-ssl: the secure listener's port and the files it needs.
  # (USER and PASSWORD, the 7th and 8th, are written with the storage, not here.)
  local sport=${4:-} cert=${5:-} key=${6:-} client_ca=${9:-}
  local listeners="PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
  local advertised="PLAINTEXT://127.0.0.1:$port"
  local protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  if [[ -n $sport ]]; then
    listeners+=",SASL_SSL://127.0.0.1:$sport"
    advertised+=",SASL_SSL://127.0.0.1:$sport"
    protocols+=",SASL_SSL:SASL_SSL"
  fi
  # Rewritten on every start so the file always matches this script; the data stays in data/.
  cat >"$dir/server.properties" <<EOF
# Written by dev/kafka.sh start; edits are overwritten on the next start.
# One process is both broker and controller (KRaft; Kafka 4 has no ZooKeeper mode).
process.roles=broker,controller
node.id=1
# Dynamic quorum of one voter (KIP-853), the form that 'kafka-storage format --standalone'
# sets up; it replaces controller.quorum.voters.
controller.quorum.bootstrap.servers=127.0.0.1:$cport
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols
log.dirs=$dir/data
# A single broker: every internal topic has one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
# The defaults (50 partitions each) make the first consumer group and the first transaction
# wait while 50 partitions are created; a handful is plenty for one dev broker.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
# Consumers join at once instead of after 3 s: tests start and stop consumers often.
group.initial.rebalance.delay.ms=0
# Topics are created explicitly (dev/setup, the test harness), never by a typo in a client.
auto.create.topics.enable=false
num.partitions=3
EOF
  if [[ -n $sport ]]; then
    # The key and certificate in one PEM keystore (Kafka reads PEM since 2.7).
    cat "$key" "$cert" >"$dir/keystore.pem"
    chmod 600 "$dir/keystore.pem"
    cat >>"$dir/server.properties" <<EOF
# The SASL_SSL listener (--sasl-ssl): TLS, then a SCRAM login.
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$dir/keystore.pem
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
    if [[ -n $client_ca ]]; then
      cat >>"$dir/server.properties" <<EOF
# Mutual TLS: a client without a certificate signed by this CA is refused in the handshake.
listener.name.sasl_ssl.ssl.client.auth=required
listener.name.sasl_ssl.ssl.truststore.type=PEM
listener.name.sasl_ssl.ssl.truststore.location=$client_ca
EOF
    fi
  fi
  cat >"$dir/log4j2.properties" <<EOF
# Written by dev/kafka.sh start. The broker's log, rolled at 50 MB (two old files kept).
status = warn
# Kafka logs its own shutdown from a JVM shutdown hook; log4j's hook would close the file first
# and lose those lines. Every line is flushed as written, so nothing needs the hook.
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $dir/kafka.log
appender.file.filePattern = $dir/kafka.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
# Per-request logging is noise at INFO.
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
}

cmd_start() {
  [[ $# -eq 3 || (($# -eq 9 || $# -eq 10) && $4 == --sasl-ssl) ]] ||
    usage "$0 start DIR PORT CONTROLLER_PORT [--sasl-ssl SECURE_PORT CERT KEY USER PASSWORD [CLIENT_CA]]"
  local dir port=$2 cport=$3 pid
  # With --sasl-ssl: SECURE_PORT CERT KEY USER PASSWORD [CLIENT_CA].
  local secure=("${@:5}")
  require_port_pair PORT "$port" CONTROLLER_PORT "$cport"
  dir=$(abs_dir "$1")
  cmd_install
  # One start at a time per DIR (dev/up run twice, or a harness racing itself).
  lock "$dir/.lock"

  if pid=$(running_pid "$dir/kafka.pid" "$dir/server.properties"); then
    # Already running (or still starting from an earlier call): just make sure it serves.
    grep -q "^listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport\(,\|$\)" "$dir/server.properties" ||
      die "a broker from $dir already runs (pid $pid) with other ports; stop it first"
    wait_for "kafka (pid $pid)" 90 "$pid" "$dir/kafka.log" "$dir/kafka.out" -- api_versions_ok "$port"
    log "already running on 127.0.0.1:$port (pid $pid)"
    return 0
  fi
  rm -f "$dir/kafka.pid"
  require_free_port "$port"
  require_free_port "$cport"

  write_config "$dir" "$port" "$cport" "${secure[@]}"

  local cp="$LIBS/*"
  if [[ ! -f $dir/data/meta.properties ]]; then
    # Cluster id: 16 random bytes in Kafka's Uuid text form (URL-safe base64, no padding),
    # generated once per DIR and kept, the same thing `kafka-storage random-uuid` prints.
    # Passed as --cluster-id=ID: an id may start with "-" (1 in 64), which the tool would
    # otherwise take for an option and refuse.
    [[ -s $dir/cluster.id ]] ||
      head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$dir/cluster.id"
    log "formatting storage in $dir/data"
    # With --sasl-ssl the SCRAM credentials of USER are written with the metadata.
    local scram=()
    if ((${#secure[@]})); then
      scram=(--add-scram "SCRAM-SHA-256=[name=${secure[3]},password=${secure[4]}]"
        --add-scram "SCRAM-SHA-512=[name=${secure[3]},password=${secure[4]}]")
    fi
    java -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$cp" kafka.tools.StorageTool \
      format --cluster-id="$(<"$dir/cluster.id")" -c "$dir/server.properties" --standalone \
      "${scram[@]}" >>"$dir/kafka.out" 2>&1 || {
      show_logs "$dir/kafka.out"
      die "storage format failed"
    }
  fi

  log "starting broker on 127.0.0.1:$port (controller 127.0.0.1:$cport), dir $dir"
  # -Xms256m -Xmx1g: plenty for a dev broker; several test brokers fit side by side.
  # preferIPv4Stack: plain IPv4 sockets on 127.0.0.1 (not IPv4-mapped IPv6 ones).
  start_detached "$dir/kafka.pid" "$dir/kafka.out" "$dir" \
    java -Xms256m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Djava.net.preferIPv4Stack=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -cp "$cp" kafka.Kafka "$dir/server.properties"
  pid=$(<"$dir/kafka.pid")
  wait_for "kafka (pid $pid)" 90 "$pid" "$dir/kafka.log" "$dir/kafka.out" -- api_versions_ok "$port"
  log "ready on 127.0.0.1:$port (pid $pid) after ${SECONDS}s"
}

cmd_stop() { server_cmd_stop kafka server.properties "$@"; }
cmd_status() { server_cmd_status kafka server.properties PORT api_versions_ok "$@"; }

cmd_scram() {
  [[ $# -eq 3 ]] || usage "$0 scram PORT USER PASSWORD"
  local port=$1 user=$2 password=$3
  require_port "$port"
  cmd_install
  local out mechanism
  # One mechanism per request: the broker refuses two changes of one user's credentials in one.
  for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
    out=$(java -cp "$LIBS/*" org.apache.kafka.tools.ConfigCommand \
      --bootstrap-server "127.0.0.1:$port" --alter --entity-type users --entity-name "$user" \
      --add-config "$mechanism=[password=$password]" 2>&1) || {
      printf '%s\n' "$out" >&2
      die "setting the $mechanism password of $user failed"
    }
  done
  log "SCRAM password of $user set on 127.0.0.1:$port"
}

if [[ ${1:-} == scram ]]; then
  shift
  cmd_scram "$@"
  exit 0
fi
server_main "$0 install|start DIR PORT CONTROLLER_PORT|scram PORT USER PASSWORD|stop DIR|status DIR PORT" "$@"
