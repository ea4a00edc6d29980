#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for tests and benchmarks, beside the system's own broker and
# never touching it. As root; DIR holds everything of the cluster (config, data, logs, PID files, cookie):
#
#   scripts/rabbitmq-cluster.sh start   DIR       start the cluster (a cluster already running in DIR is reused,
#                                                 a node of it that is down is started), wait until the three
#                                                 nodes run in one cluster, print their AMQP URLs
#   scripts/rabbitmq-cluster.sh stop    DIR       stop what was started in DIR, by the PIDs recorded there
#   scripts/rabbitmq-cluster.sh status  DIR       which nodes run (exit status 0 only when all three do)
#   scripts/rabbitmq-cluster.sh urls    DIR       the three AMQP URLs, one a line (then the three amqps:// ones
#                                                 of a cluster started with TLS)
#   scripts/rabbitmq-cluster.sh pid     DIR N     the PID of node N's Erlang VM (beam.smp) while it runs
#   scripts/rabbitmq-cluster.sh kill    DIR N     SIGKILL node N's VM (its data stays: `restart` brings it back)
#   scripts/rabbitmq-cluster.sh freeze  DIR N     SIGSTOP node N's VM: a hung node, its sockets stay open
#   scripts/rabbitmq-cluster.sh thaw    DIR N     SIGCONT node N's VM (frozen longer than about 10 s, it was
#                                                 declared down, and stays partitioned from the others until
#                                                 `restart DIR N`, pause_minority notwithstanding: see below)
#   scripts/rabbitmq-cluster.sh restart DIR N     stop node N if it runs, start it, wait until it is back in the
#                                                 cluster with the other running nodes
#   scripts/rabbitmq-cluster.sh ctl     DIR N ARGS...   rabbitmqctl against node N, e.g.
#                                                 `ctl DIR 1 list_queues name leader members`
#   scripts/rabbitmq-cluster.sh upgrade DIR N ARGS...   rabbitmq-upgrade against node N (drain, revive,
#                                                 await_online_quorum_plus_one: planned maintenance)
#   scripts/rabbitmq-cluster.sh queues  DIR N ARGS...   rabbitmq-queues against node N
#                                                 (check_if_node_is_quorum_critical)
#
# Nodes havip1@localhost, havip2@localhost, havip3@localhost, on 127.0.0.1 only, on ports counted from a base
# (HAVIP_RABBIT_CLUSTER_PORT_BASE, default 25700; written to DIR/ports at the first start and read from there):
#   AMQP                    base+1 .. base+3     25701-25703
#   Erlang distribution     base+11 .. base+13   25711-25713
#   epmd, the cluster's own base+20              25720
#   rabbitmqctl's own node  base+21 .. base+40   25721-25740 (each CLI call holds one while it runs)
#   AMQP over TLS           base+4 .. base+6     25704-25706 (only with TLS, below)
#
# TLS: HAVIP_RABBIT_CLUSTER_TLS_DIR=D at `start` (or `restart`) gives each node a TLS listener too, with D/ca.pem
# (the CA), D/server.pem (the nodes' certificate, for 127.0.0.1: every node uses it) and D/server-key.pem (its
# unencrypted key), copied to DIR/tls and used from there at every later start; `start` then prints the amqps://
# URLs after the amqp:// ones. The nodes ask no certificate of their clients (verify_none, fail_if_no_peer_cert
# false): clients verify the nodes, and log in with a password as over plain AMQP.
# The system broker (rabbit@localhost: 5672, 25672, epmd 4369, /etc/rabbitmq, /var/lib/rabbitmq, its cookie) is
# left alone: the real scripts in /usr/lib/rabbitmq/bin are run directly (the /usr/sbin wrappers switch to the
# rabbitmq user, its HOME and its cookie), /etc/rabbitmq/rabbitmq-env.conf is replaced by an empty file of DIR's,
# every path is set to one under DIR, the Erlang cookie is DIR/home/.erlang.cookie (HOME=DIR/home), and the nodes
# and the CLI register in the cluster's own epmd.
#
# User: guest/guest, RabbitMQ's default, which it accepts from loopback only — every client of these nodes, as
# they listen on 127.0.0.1 only. Virtual host: the default "/".
#
# Every process started here has HAVIP_RABBIT_CLUSTER=DIR in its environment. A PID read from a PID file is
# signalled only while /proc shows that marker, so a PID the kernel has since given to another process is never
# touched; nothing is looked up or signalled by name.
#
# The cluster forms by classic_config peer discovery, the same three names listed on every node, as a compose
# file would configure it. The first node to take the discovery lock waits discovery_retry_limit × 0.5 s for
# a peer that is further along, then starts alone; the others take the lock after it and join it. Measured
# here (2 cores busy with other work, load 4-6.6; from launch to all three running in one cluster):
# classic_config with discovery_retry_limit = 2: 8.7-12.8 s (8 runs); with the default limit of 10: 15.7-19.5 s
# (3 runs); three standalone nodes, then `rabbitmqctl join_cluster` of nodes 2 and 3: 12.9-18.0 s (3 runs).
set -euo pipefail

SBIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)
TIMEOUT_S=${HAVIP_RABBIT_CLUSTER_TIMEOUT:-180}

log() { printf '[rabbitmq-cluster] %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}
usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
    exit 2
}

[ $# -ge 2 ] || usage
command=$1
dir=$2
shift 2
case "$command" in
    start | stop | status | urls) [ $# -eq 0 ] || usage ;;
    pid | kill | freeze | thaw | restart | ctl | upgrade | queues)
        if [ $# -lt 1 ] || ! [[ $1 =~ ^[123]$ ]]; then die "$command needs a node number, 1 to 3"; fi
        node=$1
        shift
        ;;
    *) usage ;;
esac
[ "$(id -u)" = 0 ] || die "run as root"
[ -x "$SBIN/rabbitmq-server" ] || die "RabbitMQ is not installed ($SBIN/rabbitmq-server): run scripts/setup.sh"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P)

if [ -f "$dir/ports" ]; then
    base=$(cat "$dir/ports")
else
    base=${HAVIP_RABBIT_CLUSTER_PORT_BASE:-25700}
    if ! [[ $base =~ ^[0-9]+$ ]] || [ "$base" -lt 1024 ] || [ "$base" -gt 65000 ]; then die "bad port base: $base"; fi
    echo "$base" > "$dir/ports"
fi
epmd_port=$((base + 20))

name_of() { echo "havip$1@localhost"; }
amqp_port() { echo $((base + $1)); }
url_of() { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/"; }
tls_port() { echo $((base + 3 + $1)); }
tls_url_of() { echo "amqps://guest:guest@127.0.0.1:$(tls_port "$1")/"; }
with_tls() { [ -f "$dir/tls/server.pem" ]; }
# HAVIP_RABBIT_CLUSTER_TLS_DIR's files, copied into DIR/tls (read from there by the nodes at every start).
take_tls_files() {
    local from=${HAVIP_RABBIT_CLUSTER_TLS_DIR:-} f
    [ -n "$from" ] || return 0
    for f in ca.pem server.pem server-key.pem; do
        [ -r "$from/$f" ] || die "HAVIP_RABBIT_CLUSTER_TLS_DIR: no readable $from/$f"
    done
    mkdir -p "$dir/tls"
    chmod 700 "$dir/tls"
    for f in ca.pem server.pem server-key.pem; do install -m 600 "$from/$f" "$dir/tls/$f"; done
}
all_urls() {
    local n
    for n in "${NODES[@]}"; do url_of "$n"; done
    if with_tls; then for n in "${NODES[@]}"; do tls_url_of "$n"; done; fi
}
node_dir() { echo "$dir/node$1"; }

# The environment of node N's server and of every CLI call about it (in a subshell).
node_env() {
    local n=$1 d
    d=$(node_dir "$n")
    export HAVIP_RABBIT_CLUSTER=$dir
    export HOME=$dir/home
    export RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf
    export RABBITMQ_NODENAME=havip$n@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=$((base + n)) RABBITMQ_DIST_PORT=$((base + 10 + n))
    export RABBITMQ_CTL_DIST_PORT_MIN=$((base + 21)) RABBITMQ_CTL_DIST_PORT_MAX=$((base + 40))
    export RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf RABBITMQ_CONFIG_FILES=$d/conf.d
    export RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins
    export RABBITMQ_MNESIA_BASE=$d/mnesia RABBITMQ_LOG_BASE=$d/log RABBITMQ_PID_FILE=$d/pid
    export RABBITMQ_MOTD_FILE=$d/motd
    export ERL_EPMD_PORT=$epmd_port ERL_EPMD_ADDRESS=127.0.0.1
    # -start_epmd false: should the cluster's epmd be gone, a node fails instead of starting one nobody recorded.
    export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false"
}

ctl() {
    local n=$1
    shift
    (node_env "$n" && exec "$SBIN/rabbitmqctl" -n "$(name_of "$n")" "$@")
}

# The PID in FILE, printed only while that process is alive and was started for DIR.
ours() {
    local file=$1 pid environ
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    environ=$(tr '\0' '\n' 2> /dev/null < "/proc/$pid/environ") || return 1
    grep -qxF "HAVIP_RABBIT_CLUSTER=$dir" <<< "$environ" || return 1
    echo "$pid"
}
vm_pid() { ours "$(node_dir "$1")/pid"; }
launcher_pid() { ours "$(node_dir "$1")/launcher.pid"; }
frozen() { [ "$(awk '{print $3}' "/proc/$1/stat" 2> /dev/null)" = T ]; }
answers() { (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
deadline() { echo $(($(date +%s) + $1)); }
past() { [ "$(date +%s)" -ge "$1" ]; }
lock() {
    exec 9> "$dir/lock"
    flock -w "$TIMEOUT_S" 9 || die "another command holds $dir/lock"
}

prepare() {
    mkdir -p "$dir/home"
    if [ ! -s "$dir/home/.erlang.cookie" ]; then
        (umask 077 && head -c 32 /dev/urandom | sha256sum | cut -c1-32 | tr a-f A-F > "$dir/home/.erlang.cookie")
        chmod 400 "$dir/home/.erlang.cookie"
    fi
    : > "$dir/rabbitmq-env.conf"
    local n m d
    for n in "${NODES[@]}"; do
        d=$(node_dir "$n")
        mkdir -p "$d/mnesia" "$d/log" "$d/conf.d"
        echo "[]." > "$d/enabled_plugins"
        {
            echo "listeners.tcp.default = 127.0.0.1:$(amqp_port "$n")"
            echo "loopback_users.guest = true"
            # A hung peer (SIGSTOP, a frozen VM) is declared down after about 10 s instead of 60 s.
            echo "net_ticktime = 10"
            # As deploy/rabbitmq/cluster.conf: a node cut off from the majority by the network pauses (closes its
            # clients' connections) until it sees the others again. A node frozen longer than net_ticktime is not
            # healed by it: thawed, it reaches its peers at once, counts a majority and does not pause, and stays
            # partitioned (`rabbitmqctl cluster_status` lists the partition) until it is restarted (`restart N`).
            # Measured here with SIGSTOP for 15 s: still partitioned 80 s after the thaw; with `autoheal` the
            # thawed node was restarted by RabbitMQ itself 61 s after the thaw (its first wait for the winner's
            # go-ahead timed out after 60 s), but autoheal leaves the minority side of a real network split
            # serving its clients, whose quorum-queue operations then stall.
            echo "cluster_partition_handling = pause_minority"
            echo "log.file.level = info"
            echo "log.console = false"
            echo "cluster_formation.peer_discovery_backend = classic_config"
            for m in "${NODES[@]}"; do echo "cluster_formation.classic_config.nodes.$m = $(name_of "$m")"; done
            echo "cluster_formation.discovery_retry_limit = 2"
            if with_tls; then
                echo "listeners.ssl.default = 127.0.0.1:$(tls_port "$n")"
                echo "ssl_options.cacertfile = $dir/tls/ca.pem"
                echo "ssl_options.certfile = $dir/tls/server.pem"
                echo "ssl_options.keyfile = $dir/tls/server-key.pem"
                echo "ssl_options.verify = verify_none"
                echo "ssl_options.fail_if_no_peer_cert = false"
                echo "ssl_options.versions.1 = tlsv1.3"
                echo "ssl_options.versions.2 = tlsv1.2"
            fi
        } > "$d/rabbitmq.conf"
    done
}

start_epmd() {
    ours "$dir/epmd.pid" > /dev/null && return 0
    answers "$epmd_port" && die "127.0.0.1:$epmd_port is taken by a process not started for $dir"
    (
        export HAVIP_RABBIT_CLUSTER=$dir
        exec setsid /usr/bin/epmd -port "$epmd_port" -address 127.0.0.1 >> "$dir/epmd.log" 2>&1 < /dev/null 9>&-
    ) &
    echo $! > "$dir/epmd.pid"
    local until
    until=$(deadline 20)
    until answers "$epmd_port"; do
        past "$until" && die "epmd does not answer on 127.0.0.1:$epmd_port"
        sleep 0.1
    done
}

launch() {
    local n=$1 d
    d=$(node_dir "$n")
    answers "$(amqp_port "$n")" && die "127.0.0.1:$(amqp_port "$n") is taken by a process not started for $dir"
    if with_tls && answers "$(tls_port "$n")"; then
        die "127.0.0.1:$(tls_port "$n") is taken by a process not started for $dir"
    fi
    rm -f "$d/pid"
    (
        node_env "$n"
        cd "$d"
        # A session of its own (a Ctrl-C in the caller's terminal does not reach it); no descriptor of ours.
        exec setsid "$SBIN/rabbitmq-server" >> "$d/stdout.log" 2>&1 < /dev/null 9>&-
    ) &
    echo $! > "$d/launcher.pid"
    log "node $n: $(name_of "$n") starting (launcher PID $!, VM PID in $d/pid)"
}

# Until every node named in $@ answers on its AMQP port and sees all of them running in its cluster.
await_cluster() {
    local until=$1
    shift
    local n names="" check
    for n in "$@"; do
        names+="${names:+, }'$(name_of "$n")'"
        until answers "$(amqp_port "$n")"; do
            vm_pid "$n" > /dev/null || launcher_pid "$n" > /dev/null ||
                die "node $n exited while starting: see $(node_dir "$n")/log and $(node_dir "$n")/stdout.log"
            past "$until" && die "node $n does not answer on 127.0.0.1:$(amqp_port "$n") within ${TIMEOUT_S} s"
            sleep 0.2
        done
        while with_tls && ! answers "$(tls_port "$n")"; do
            past "$until" && die "node $n does not answer on 127.0.0.1:$(tls_port "$n") (TLS) within ${TIMEOUT_S} s"
            sleep 0.2
        done
    done
    # Each node's own view, as `rabbitmqctl cluster_status` shows it under "Running Nodes".
    check="Want = lists:sort([$names]),
        lists:all(fun(N) -> case rpc:call(N, rabbit_nodes, all_running, [], 10000) of
                                L when is_list(L) -> lists:sort(L) =:= Want;
                                _ -> false
                            end end, Want)."
    until [ "$(ctl "$1" -q eval "$check" 2> /dev/null)" = true ]; do
        past "$until" && die "nodes $* are not running in one cluster within ${TIMEOUT_S} s"
        sleep 0.5
    done
}

cmd_start() {
    local t0 until n pid to_start=()
    t0=$(now_ms)
    until=$(deadline "$TIMEOUT_S")
    lock
    take_tls_files
    prepare
    start_epmd
    for n in "${NODES[@]}"; do
        if pid=$(vm_pid "$n"); then
            frozen "$pid" && die "node $n is frozen (SIGSTOP): thaw it first"
        elif ! launcher_pid "$n" > /dev/null; then
            to_start+=("$n")
        fi
    done
    for n in "${to_start[@]}"; do launch "$n"; done
    await_cluster "$until" "${NODES[@]}"
    log "cluster running, $(($(now_ms) - t0)) ms after this start (nodes started now: ${to_start[*]:-none})"
    all_urls
}

# SIGTERM (RabbitMQ stops gracefully on it) to node N's VM, or to its launcher while the VM has not written its
# PID file yet (the launcher passes SIGTERM on); SIGCONT first, as a frozen VM cannot act on SIGTERM.
terminate() {
    local n=$1 pid
    if pid=$(vm_pid "$n"); then
        kill -CONT "$pid" 2> /dev/null || true
        kill -TERM "$pid" 2> /dev/null || true
        log "node $n: stopping (VM PID $pid)"
    elif pid=$(launcher_pid "$n"); then
        kill -TERM "$pid" 2> /dev/null || true
        log "node $n: stopping (launcher PID $pid)"
    fi
}

# Until node N's VM and launcher are gone; SIGKILL once the deadline has passed.
await_gone() {
    local n=$1 until=$2 pid
    while pid=$(vm_pid "$n") || pid=$(launcher_pid "$n"); do
        if past "$until"; then
            log "node $n: PID $pid still there, SIGKILL"
            kill -KILL "$pid" 2> /dev/null || true
        fi
        sleep 0.1
    done
    rm -f "$(node_dir "$n")/pid" "$(node_dir "$n")/launcher.pid"
}

cmd_stop() {
    local n pid until
    lock
    for n in "${NODES[@]}"; do terminate "$n"; done
    until=$(deadline 60)
    for n in "${NODES[@]}"; do await_gone "$n" "$until"; done
    if pid=$(ours "$dir/epmd.pid"); then
        kill -TERM "$pid"
        log "epmd stopped (PID $pid)"
    fi
    rm -f "$dir/epmd.pid"
}

cmd_status() {
    local n pid status=0 asked=""
    for n in "${NODES[@]}"; do
        if ! pid=$(vm_pid "$n"); then
            echo "node $n $(name_of "$n") stopped"
            status=1
        elif frozen "$pid"; then
            echo "node $n $(name_of "$n") frozen  PID $pid $(url_of "$n")"
            status=1
        else
            echo "node $n $(name_of "$n") running PID $pid $(url_of "$n")"
            asked=${asked:-$n}
        fi
    done
    if [ -n "$asked" ]; then
        echo "running nodes as node $asked sees them: $(ctl "$asked" -q eval 'lists:sort(rabbit_nodes:all_running()).' 2>&1)"
    fi
    return "$status"
}

cmd_signal() {
    local signal=$1 n=$2 pid until
    pid=$(vm_pid "$n") || die "node $n is not running"
    kill "-$signal" "$pid"
    log "node $n: SIG$signal sent to VM PID $pid"
    if [ "$signal" = KILL ]; then
        until=$(deadline 20)
        while [ -d "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2> /dev/null)" != Z ]; do
            past "$until" && die "PID $pid still there 20 s after SIGKILL"
            sleep 0.02
        done
    fi
}

cmd_restart() {
    local n=$1 t0 until m pid others=()
    t0=$(now_ms)
    until=$(deadline "$TIMEOUT_S")
    lock
    terminate "$n"
    await_gone "$n" "$until"
    take_tls_files
    prepare
    start_epmd
    launch "$n"
    # A frozen node cannot answer: the restarted one is awaited with the nodes that run.
    for m in "${NODES[@]}"; do
        if [ "$m" != "$n" ] && pid=$(vm_pid "$m") && ! frozen "$pid"; then others+=("$m"); fi
    done
    await_cluster "$until" "$n" "${others[@]}"
    log "node $n: running in the cluster again, $(($(now_ms) - t0)) ms after this restart"
}

case "$command" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    urls) all_urls ;;
    pid) vm_pid "$node" ;;
    kill) cmd_signal KILL "$node" ;;
    freeze) cmd_signal STOP "$node" ;;
    thaw) cmd_signal CONT "$node" ;;
    restart) cmd_restart "$node" ;;
    ctl) ctl "$node" "$@" ;;
    upgrade) (node_env "$node" && exec "$SBIN/rabbitmq-upgrade" -n "$(name_of "$node")" "$@") ;;
    queues) (node_env "$node" && exec "$SBIN/rabbitmq-queues" -n "$(name_of "$node")" "$@") ;;
esac
