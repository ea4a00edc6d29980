#!/usr/bin/env bash
# A Postgres 15 primary with a synchronous standby on this one machine, for tests and benchmarks: pg_auto_failover
# (Debian's postgresql-15-auto-failover and pg-auto-failover-cli, installed by scripts/setup.sh) runs a monitor and
# two data nodes, node1 and node2, each on a port of its own on 127.0.0.1. The monitor promotes the standby by
# itself when the primary is lost; clients find the writable node with a multi-host DSN and
# target_session_attrs=read-write.
#
#   postgres-ha.sh start DIR          create (first time) or start again, wait until healthy, print DSN and monitor
#   postgres-ha.sh stop DIR           stop what start started; the data stays in DIR (remove DIR to start afresh)
#   postgres-ha.sh status DIR         processes and the monitor's view; exit 0 when healthy
#   postgres-ha.sh wait DIR           until healthy: primary, secondary, synchronous standby, failover armed
#   postgres-ha.sh state DIR [ARGS]   pg_autoctl show state (ARGS: e.g. --json)
#   postgres-ha.sh nodes DIR          one line a node: name port reported-state assigned-state health
#   postgres-ha.sh kill DIR NODE      kill -9 a whole node, keeper and Postgres (NODE: node1, node2 or primary)
#   postgres-ha.sh restart DIR NODE   pg_autoctl run for a stopped or killed node (it rejoins as a secondary); then `wait`
#   postgres-ha.sh switchover DIR     planned switchover (pg_autoctl perform switchover), then wait until healthy
#
# Run as root; pg_autoctl and Postgres run as user postgres. Everything lives in DIR (data directories,
# pg_autoctl's XDG config/data/runtime directories, logs, the PIDs this script started); only the Unix sockets go to
# the compiled-in /var/run/postgresql. Ports (first start only, then kept in DIR/cluster.env): PGHA_MONITOR_PORT
# (25801), PGHA_NODE1_PORT (25811), PGHA_NODE2_PORT (25812); database PGHA_DBNAME (havip); deadline of a wait
# PGHA_TIMEOUT seconds (180). The system PostgreSQL (5432) is never touched.
#
# TESTS ONLY: every node trusts every connection from loopback (--auth trust).
#
# Encryption: none (--no-ssl), unless PGHA_TLS_DIR=D is given when the cluster is created: D/ca.pem (a CA),
# D/server.pem (a certificate it signed for 127.0.0.1, used by the monitor and both nodes) and D/server-key.pem
# (its unencrypted key) are copied to DIR/tls, and the monitor and the nodes are created with TLS (--ssl-ca-file,
# --server-cert, --server-key) and --ssl-mode verify-full: pg_autoctl's own connections (to the monitor, and the
# standby's replication) verify the certificate and its host name. The DSN printed then carries
# sslmode=verify-full&sslrootcert=DIR/tls/ca.pem. Postgres accepts plain connections too (pg_hba's `host` lines).
set -euo pipefail

PGBIN=/usr/lib/postgresql/15/bin
SOCKETS=/var/run/postgresql
NODES=(node1 node2)

# Monitor timings: the defaults (5 s health checks, 20 s before a node counts as unhealthy, 30 s for an unreachable
# primary to demote itself) give about 50 s without writes when the primary's machine dies. These give seconds.
# The price: a primary that is alive but stalls for ~3 s is failed over. PGHA_MONITOR_TIMINGS=default (at any
# start) keeps pg_auto_failover's own instead, to compare.
MONITOR_SETTINGS=(
    "pgautofailover.health_check_period = 1000"
    "pgautofailover.health_check_timeout = 1000"
    "pgautofailover.health_check_retry_delay = 500"
    "pgautofailover.health_check_max_retries = 1"
    "pgautofailover.node_considered_unhealthy_timeout = 3000"
    "pgautofailover.primary_demote_timeout = 5000"
)

# Network encryption: none, or TLS with the files in DIR/tls (PGHA_TLS_DIR, above), on the monitor and each node;
# the monitor URI handed to the nodes is read back from pg_autoctl, so its sslmode follows.
with_tls() { [ -f "$dir/tls/server.pem" ]; }
ssl_args() {
    if with_tls; then
        printf '%s\n' --ssl-mode verify-full --ssl-ca-file "$dir/tls/ca.pem" \
            --server-cert "$dir/tls/server.pem" --server-key "$dir/tls/server-key.pem"
    else
        printf '%s\n' --no-ssl
    fi
}
# PGHA_TLS_DIR's files, copied into DIR/tls for user postgres (only when the cluster is created).
take_tls_files() {
    local from=${PGHA_TLS_DIR:-} f
    [ -n "$from" ] || return 0
    for f in ca.pem server.pem server-key.pem; do
        [ -r "$from/$f" ] || die "PGHA_TLS_DIR: no readable $from/$f"
    done
    install -d -m 700 -o postgres -g postgres "$dir/tls"
    for f in ca.pem server.pem server-key.pem; do install -m 600 -o postgres -g postgres "$from/$f" "$dir/tls/$f"; done
}

log() { printf '[postgres-ha] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n '7,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd=${1:-}
if [ -z "$cmd" ] || [ -z "${2:-}" ]; then usage; fi
[ "$(id -u)" = 0 ] || die "run as root (pg_autoctl runs as user postgres)"
dir=$(realpath -m "$2")
shift 2
timeout=${PGHA_TIMEOUT:-180}

# --- the cluster's layout ---------------------------------------------------------------------------------------
pgdata() { echo "$dir/$1"; }
pidfile() { echo "$dir/run/$1.pid"; }
config_file() { echo "$dir/xdg/config/pg_autoctl$dir/$1/pg_autoctl.cfg"; }
created() { [ -f "$(config_file "$1")" ]; }

load_ports() {
    if [ -f "$dir/cluster.env" ]; then
        # shellcheck disable=SC1091
        . "$dir/cluster.env"
    else
        MONITOR_PORT=${PGHA_MONITOR_PORT:-25801}
        NODE1_PORT=${PGHA_NODE1_PORT:-25811}
        NODE2_PORT=${PGHA_NODE2_PORT:-25812}
        DBNAME=${PGHA_DBNAME:-havip}
    fi
}
port_of() {
    case $1 in
        monitor) echo "$MONITOR_PORT" ;;
        node1) echo "$NODE1_PORT" ;;
        node2) echo "$NODE2_PORT" ;;
        *) die "no node $1 (node1, node2)" ;;
    esac
}
dsn() {
    local tls=""
    with_tls && tls="&sslmode=verify-full&sslrootcert=$dir/tls/ca.pem"
    echo "postgresql://postgres@127.0.0.1:$NODE1_PORT,127.0.0.1:$NODE2_PORT/$DBNAME?target_session_attrs=read-write$tls"
}

# --- running things as postgres ---------------------------------------------------------------------------------
# As user postgres, in a clean environment (no PG* variable of the caller's reaches pg_autoctl); pg_autoctl keeps
# its configuration, state and PID files under the XDG directories.
AS_POSTGRES=(setpriv --reuid=postgres --regid=postgres --init-groups -- env -i
    PATH="$PGBIN:/usr/bin:/bin" HOME="$dir" LANG=C.UTF-8
    XDG_CONFIG_HOME="$dir/xdg/config" XDG_DATA_HOME="$dir/xdg/data" XDG_RUNTIME_DIR="$dir/xdg/runtime")
as_postgres() { "${AS_POSTGRES[@]}" "$@"; }
# SQL as the superuser over loopback (trust); prints rows unaligned, fails when the server does not answer.
sql() {
    local port=$1 db=$2
    shift 2
    PGCONNECT_TIMEOUT=3 "$PGBIN/psql" -X -q -At -F ' ' -v ON_ERROR_STOP=1 \
        "postgresql://postgres@127.0.0.1:$port/$db?application_name=postgres-ha" "$@" 2>/dev/null
}
now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- the processes this script starts ---------------------------------------------------------------------------
# Each pg_autoctl is started in a session of its own (setsid without a fork: the recorded PID is pg_autoctl's, and
# the session's process group holds its children and Postgres). A PID is recorded with its start time, so that a
# number reused by another process is never taken for ours.
start_time() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
running() { # the recorded pg_autoctl of $1, if alive
    local f pid t
    f=$(pidfile "$1")
    [ -f "$f" ] || return 1
    read -r pid t < "$f"
    [ -n "$pid" ] && [ -n "$t" ] && [ "$(start_time "$pid")" = "$t" ] && echo "$pid"
}
postmaster() { # the Postgres of $1, if alive: postmaster.pid's PID, checked against the process's data directory
    local pid
    pid=$(head -n 1 "$(pgdata "$1")/postmaster.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$(pgdata "$1")" ] && echo "$pid"
}
launch() { # launch NAME ARGS...: pg_autoctl ARGS in the background, its output appended to DIR/log/NAME.log
    local name=$1
    shift
    setsid "${AS_POSTGRES[@]}" pg_autoctl "$@" >> "$dir/log/$name.log" 2>&1 < /dev/null &
    local pid=$!
    local t=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do t=$(start_time "$pid") && [ -n "$t" ] && break; sleep 0.01; done
    echo "$pid $t" > "$(pidfile "$name")"
    log "$name: pg_autoctl $1 (pid $pid, log $dir/log/$name.log)"
}
# A socket and its lock file left in /var/run/postgresql by a Postgres killed on one of OUR ports: removed when
# nothing listens there and the lock names no live postgres. Other ports' files are never looked at.
clean_stale_socket() {
    local port=$1 lock="$SOCKETS/.s.PGSQL.$1.lock" pid
    [ -e "$lock" ] || [ -e "$SOCKETS/.s.PGSQL.$port" ] || return 0
    answers "$port" && return 0
    pid=$(head -n 1 "$lock" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then return 0; fi
    rm -f "$lock" "$SOCKETS/.s.PGSQL.$port"
    log "removed the stale socket and lock file of port $port"
}
answers() { (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
# Signal a node's whole process group (pg_autoctl, its services, Postgres and its backends), and its Postgres
# should it have left the group.
signal_node() {
    local sig=$1 name=$2 pid pm
    if pid=$(running "$name"); then kill "-$sig" -- "-$pid" 2> /dev/null || true; fi
    if pm=$(postmaster "$name"); then kill "-$sig" "$pm" 2> /dev/null || true; fi
}
node_gone() {
    ! running "$1" > /dev/null && ! postmaster "$1" > /dev/null && { [ -z "${2:-}" ] || ! pgrep -g "$2" > /dev/null; }
}
wait_gone() { # wait_gone NAME SECONDS
    local deadline pgid
    deadline=$(($(date +%s) + $2))
    pgid=$(running "$1" || true)
    while ! node_gone "$1" "$pgid"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# --- the monitor's view -----------------------------------------------------------------------------------------
nodes() {
    sql "$MONITOR_PORT" pg_auto_failover -c \
        "SELECT nodename, nodeport, reportedstate, goalstate, health FROM pgautofailover.node ORDER BY nodename"
}
# The node the monitor has made primary and that says it is (a killed primary keeps its last report).
primary_name() {
    nodes | awk '$3 == $4 && ($4 == "primary" || $4 == "wait_primary" || $4 == "single") { print $1; exit }'
}

# pg_auto_failover's pg_basebackup asks for a spread checkpoint (no --checkpoint=fast), which after a fresh initdb
# can take minutes with 0.9 of checkpoint_timeout to spread a few hundred buffers over. An explicit CHECKPOINT on
# the node it copies from completes the one it waits for at once.
hurry_base_backups() {
    local name port waiting
    for name in "${NODES[@]}"; do
        port=$(port_of "$name")
        waiting=$(sql "$port" postgres -c \
            "SELECT count(*) FROM pg_stat_progress_basebackup WHERE phase = 'waiting for checkpoint to finish'") ||
            continue
        if [ "${waiting:-0}" -gt 0 ]; then
            sql "$port" postgres -c CHECKPOINT > /dev/null && log "CHECKPOINT on $name: a base backup was waiting for one"
        fi
    done
}
# The monitor fails nothing over in its first pgautofailover.startup_grace_period (10 s) after it starts: a node it
# finds down meanwhile counts as unhealthy only after that.
failover_armed() {
    [ "$(sql "$MONITOR_PORT" pg_auto_failover -c "SELECT now() - pg_postmaster_start_time() > setting::int
        * interval '1 ms' FROM pg_settings WHERE name = 'pgautofailover.startup_grace_period'")" = t ]
}
# Replicating: one node primary and the other secondary (reported and assigned alike), the primary with a
# synchronous standby set and streaming to it.
replicating() {
    local view primary
    view=$(nodes) || return 1
    primary=$(awk '$3 == "primary" && $4 == "primary" { print $1 }' <<< "$view")
    [ "$(awk '$3 == "primary" && $4 == "primary"' <<< "$view" | wc -l)" = 1 ] || return 1
    [ "$(awk '$3 == "secondary" && $4 == "secondary"' <<< "$view" | wc -l)" = 1 ] || return 1
    [ "$(sql "$(port_of "$primary")" postgres -c "SELECT current_setting('synchronous_standby_names') <> ''
        AND EXISTS (SELECT 1 FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum'))")" = t ]
}
# Healthy: replicating, and the monitor ready to fail over.
healthy() { replicating && failover_armed; }
wait_healthy() { # [T0: a start time, for the log]
    local t0=${1:-$(now)} deadline last="" view said="" name
    deadline=$(($(date +%s) + timeout))
    until healthy; do
        for name in monitor "${NODES[@]}"; do
            running "$name" > /dev/null || die "$name is not running (see $dir/log/$name.log; \`restart\` it)"
        done
        if [ -z "$said" ] && replicating; then
            log "primary $(primary_name) with its synchronous standby ($(since "$t0") s)"
            said=1
        fi
        view=$(nodes 2> /dev/null | awk '{ printf "%s%s %s/%s", sep, $1, $3, $4; sep = ", " }' || true)
        failover_armed || view="$view; monitor in its start-up grace period"
        if [ -n "$view" ] && [ "$view" != "$last" ]; then log "monitor: $view"; last=$view; fi
        [ "$(date +%s)" -lt "$deadline" ] || die "not healthy within ${timeout} s (state: ${view:-monitor unreachable})"
        hurry_base_backups
        sleep 0.2
    done
    log "healthy: primary $(primary_name) with its synchronous standby, failover armed ($(since "$t0") s)"
}

# --- sub-commands -----------------------------------------------------------------------------------------------
check_port_free() {
    local port=$1
    [ "$port" != 5432 ] || die "port 5432 is the system PostgreSQL's"
    answers "$port" && die "port $port is in use by something else"
    return 0
}

start_monitor() {
    local t0=$1 name=monitor
    if ! created monitor; then
        check_port_free "$MONITOR_PORT"
        clean_stale_socket "$MONITOR_PORT"
        log "creating the monitor on 127.0.0.1:$MONITOR_PORT"
        # --listen is accepted by `create monitor` (not in its --help): Postgres listens on loopback from its start.
        # shellcheck disable=SC2046
        as_postgres pg_autoctl create monitor --pgdata "$(pgdata monitor)" --pgport "$MONITOR_PORT" \
            --hostname 127.0.0.1 --listen 127.0.0.1 --auth trust $(ssl_args) --pgctl "$PGBIN/pg_ctl" \
            >> "$dir/log/monitor.log" 2>&1 || die "pg_autoctl create monitor failed: see $dir/log/monitor.log"
    fi
    if ! running monitor > /dev/null; then
        clean_stale_socket "$MONITOR_PORT"
        launch "$name" run --pgdata "$(pgdata monitor)"
    fi
    local deadline=$(($(date +%s) + timeout))
    until sql "$MONITOR_PORT" pg_auto_failover -c "SELECT 1 FROM pgautofailover.node LIMIT 1" > /dev/null; do
        running monitor > /dev/null || die "the monitor's pg_autoctl exited: see $dir/log/monitor.log"
        [ "$(date +%s)" -lt "$deadline" ] || die "the monitor does not answer within ${timeout} s"
        sleep 0.1
    done
    local setting args=()
    for setting in "${MONITOR_SETTINGS[@]}"; do
        if [ "${PGHA_MONITOR_TIMINGS:-tuned}" = default ]; then
            args+=(-c "ALTER SYSTEM RESET ${setting%% =*}")
        else
            args+=(-c "ALTER SYSTEM SET $setting")
        fi
    done
    sql "$MONITOR_PORT" pg_auto_failover "${args[@]}" -c "SELECT pg_reload_conf()" > /dev/null
    log "monitor up ($(since "$t0") s)"
}

start_node() {
    local name=$1 port
    port=$(port_of "$name")
    running "$name" > /dev/null && return 0
    clean_stale_socket "$port"
    if created "$name"; then
        launch "$name" run --pgdata "$(pgdata "$name")"
    else
        check_port_free "$port"
        # shellcheck disable=SC2046
        launch "$name" create postgres --pgdata "$(pgdata "$name")" --pgport "$port" --hostname 127.0.0.1 \
            --listen 127.0.0.1 --name "$name" --dbname "$DBNAME" --auth trust $(ssl_args) \
            --pgctl "$PGBIN/pg_ctl" --monitor "$MONITOR_URI" --run
    fi
}

registered() { nodes | awk -v n="$1" '$1 == n { found = 1 } END { exit !found }'; }

cmd_start() {
    local t0 name
    t0=$(now)
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    as_postgres test -w "$dir" || die "user postgres cannot write $dir (is a parent directory private?)"
    as_postgres mkdir -p "$dir/xdg/config" "$dir/xdg/data" "$dir/xdg/runtime" "$dir/log" "$dir/run"
    chmod 700 "$dir/xdg/runtime"
    chown root:root "$dir/run" # the recorded PIDs are this script's, not postgres's
    if ! created monitor; then take_tls_files; fi
    if [ ! -f "$dir/cluster.env" ]; then
        if [ "$MONITOR_PORT" = "$NODE1_PORT" ] || [ "$MONITOR_PORT" = "$NODE2_PORT" ] || [ "$NODE1_PORT" = "$NODE2_PORT" ]; then
            die "the three ports must differ"
        fi
        printf 'MONITOR_PORT=%s\nNODE1_PORT=%s\nNODE2_PORT=%s\nDBNAME=%s\n' \
            "$MONITOR_PORT" "$NODE1_PORT" "$NODE2_PORT" "$DBNAME" > "$dir/cluster.env"
    fi
    start_monitor "$t0"
    MONITOR_URI=$(as_postgres pg_autoctl show uri --pgdata "$(pgdata monitor)" --formation monitor)
    local fresh=0
    created node1 || fresh=1
    start_node node1
    if [ "$fresh" = 1 ]; then
        # node2 registers second, so node1 becomes the first primary.
        local deadline=$(($(date +%s) + timeout))
        until registered node1; do
            running node1 > /dev/null || die "node1's pg_autoctl exited: see $dir/log/node1.log"
            [ "$(date +%s)" -lt "$deadline" ] || die "node1 not registered within ${timeout} s"
            sleep 0.1
        done
        log "node1 registered ($(since "$t0") s)"
    fi
    start_node node2
    wait_healthy "$t0"
    echo "DSN=$(dsn)"
    echo "MONITOR=$MONITOR_URI"
}

cmd_stop() {
    local name
    # All three at once: the monitor stops with the nodes, so it never sees the primary gone with the standby
    # still up (it would start a failover to a standby being stopped).
    for name in "${NODES[@]}" monitor; do
        if [ -d "$(pgdata "$name")" ] && running "$name" > /dev/null; then
            as_postgres pg_autoctl stop --pgdata "$(pgdata "$name")" > /dev/null 2>&1 || true
        fi
    done
    for name in "${NODES[@]}" monitor; do
        if ! wait_gone "$name" 30; then
            log "$name did not stop within 30 s: SIGINT, then SIGKILL, to its processes"
            signal_node INT "$name"
            wait_gone "$name" 10 || { signal_node KILL "$name"; wait_gone "$name" 10 || die "$name does not stop"; }
        fi
        clean_stale_socket "$(port_of "$name")"
        rm -f "$(pidfile "$name")"
    done
    log "stopped"
}

cmd_status() {
    local name pid pm ok=0
    for name in monitor "${NODES[@]}"; do
        pid=$(running "$name" || true)
        pm=$(postmaster "$name" || true)
        printf '%-8s port %-6s pg_autoctl %-8s postgres %s\n' "$name" "$(port_of "$name")" "${pid:--}" "${pm:--}"
        [ -n "$pid" ] || ok=3
    done
    nodes | awk '{ printf "%-8s reported %-14s assigned %-14s health %s\n", $1, $3, $4, $5 }' || {
        echo "monitor unreachable"
        ok=3
    }
    echo "DSN=$(dsn)"
    healthy || ok=3
    [ "$ok" = 0 ] && echo healthy || echo "not healthy"
    return "$ok"
}

cmd_kill() {
    local name=${1:-} pid pm pgid
    [ -n "$name" ] || usage
    [ "$name" != primary ] || name=$(primary_name) || true
    [ -n "$name" ] || die "no primary known to the monitor"
    port_of "$name" > /dev/null
    pid=$(running "$name") || die "$name is not running"
    pm=$(postmaster "$name" || true)
    pgid=$pid
    # One signal to the whole group (pg_autoctl, its services, Postgres, its backends), as when the node's machine
    # dies.
    kill -KILL -- "-$pgid"
    [ -z "$pm" ] || kill -KILL "$pm" 2> /dev/null || true
    local deadline=$(($(date +%s) + 30))
    while pgrep -g "$pgid" > /dev/null || { [ -n "$pm" ] && kill -0 "$pm" 2> /dev/null; }; do
        [ "$(date +%s)" -lt "$deadline" ] || die "$name's processes survive SIGKILL"
        sleep 0.05
    done
    echo "$name"
    log "killed $name (pg_autoctl $pid and its process group, postgres ${pm:--})"
}

cmd_restart() {
    local name=${1:-}
    [ -n "$name" ] || usage
    port_of "$name" > /dev/null
    created "$name" || die "$name was never created (start first)"
    running "$name" > /dev/null && die "$name is running"
    postmaster "$name" > /dev/null && die "$name's Postgres is still running"
    start_node "$name"
}

cmd_switchover() {
    local t0 before after
    t0=$(now)
    before=$(primary_name)
    as_postgres pg_autoctl perform switchover --pgdata "$(pgdata monitor)" --wait "$timeout" >> "$dir/log/switchover.log" 2>&1 ||
        die "pg_autoctl perform switchover failed: see $dir/log/switchover.log"
    wait_healthy
    after=$(primary_name)
    log "switchover: $before -> $after ($(since "$t0") s)"
    echo "$after"
}

load_ports
case $cmd in
    start) cmd_start ;;
    stop) [ -f "$dir/cluster.env" ] || die "no cluster in $dir"; cmd_stop ;;
    status) cmd_status ;;
    wait) wait_healthy ;;
    state) as_postgres pg_autoctl show state --pgdata "$(pgdata monitor)" "$@" ;;
    nodes) nodes ;;
    kill) cmd_kill "$@" ;;
    restart) cmd_restart "$@" ;;
    switchover) cmd_switchover ;;
    *) usage ;;
esac
