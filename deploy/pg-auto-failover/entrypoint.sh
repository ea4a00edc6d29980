#!/bin/sh
# The entry point of docker-compose.yml's `ha` Postgres tier, pg_auto_failover (docs/deploy.md, "High
# availability: the ha profile"):
#
#   pg-auto-failover-entrypoint.sh monitor   the monitor (pg-monitor)
#   pg-auto-failover-entrypoint.sh node      a data node (pg-1, pg-2), registered with PG_AUTOCTL_MONITOR
#
# Each runs `pg_autoctl create … --run`, which creates the node at its first start (the first data node to register
# becomes the primary, the second copies it and becomes its synchronous standby) and runs it again at every later
# one (a killed node rejoins as the standby). Beside it, once a second:
#   * pg_hba.conf is the one below (pg_autoctl is told --skip-pg-hba): pg_auto_failover's own roles are trusted
#     from the compose network only (its monitor's health checks, replication, pg_rewind, the nodes' and the
#     services' calls to the monitor), every other role needs its password (scram-sha-256);
#   * the monitor gets the failover timings of scripts/postgres-ha.sh (seconds, not pg_auto_failover's ≈ 50 s);
#   * on the primary, the application's role POSTGRES_USER (superuser, POSTGRES_PASSWORD) exists and owns the
#     database PG_AUTOCTL_DBNAME;
#   * a standby's base backup waiting for a spread checkpoint on this node gets a CHECKPOINT at once (pg_autoctl
#     runs pg_basebackup without --checkpoint=fast).
# /tmp/havip-ready exists once this node's pg_hba.conf (and, on the monitor, the timings) are in place: the health
# checks ask for it.
set -eu
role=${1:-node}
: "${PGDATA:=/var/lib/postgresql/data}"
: "${PG_AUTOCTL_DBNAME:=havip}"
: "${POSTGRES_USER:=havip}"
export PGDATA
host=$(hostname)
socket=/var/run/postgresql

case "$role" in
    monitor | node) ;;
    *) echo "usage: $0 monitor|node" >&2; exit 2 ;;
esac
if [ "$role" = node ]; then
    : "${PG_AUTOCTL_MONITOR:?set PG_AUTOCTL_MONITOR to the monitor URI (postgresql://autoctl_node@pg-monitor:5432/pg_auto_failover?sslmode=disable)}"
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD: the application role refuses to exist without one}"
fi

# A new start of this container: nothing of a previous one runs. What a killed one left (its PID files, its
# sockets' lock files) would name PIDs this one may reuse.
rm -f "$PGDATA/postmaster.pid" "$socket"/.s.PGSQL.* /tmp/havip-ready
rm -rf /tmp/pg_autoctl "${XDG_RUNTIME_DIR:-/nonexistent}/pg_autoctl"

sql() {  # sql DATABASE ARGS...: as the superuser on the local socket, quiet, unaligned; fails when nobody answers
    db=$1
    shift
    PGCONNECT_TIMEOUT=2 psql -X -q -At -v ON_ERROR_STOP=1 -h "$socket" -p 5432 -U postgres -d "$db" "$@" 2> /dev/null
}

hba() {
    echo "# Written by pg-auto-failover-entrypoint.sh ($role) at every start: havip-hba"
    echo "local all all trust"
    echo "host all all 127.0.0.1/32 trust"
    echo "host all all ::1/128 trust"
    if [ "$role" = monitor ]; then
        echo "host pg_auto_failover autoctl_node samenet trust"
    else
        echo "host replication pgautofailover_replicator samenet trust"
        echo "host all pgautofailover_replicator samenet trust"
        echo "host all pgautofailover_monitor samenet trust"
    fi
    echo "host all all all scram-sha-256"
}

# pg_hba.conf as above, in place and loaded (a standby's arrives with its base backup, already right).
reload=false
ensure_hba() {
    [ -s "$PGDATA/pg_hba.conf" ] || return 1
    if ! grep -q 'havip-hba' "$PGDATA/pg_hba.conf"; then
        hba > "$PGDATA/pg_hba.conf.new" && mv -f "$PGDATA/pg_hba.conf.new" "$PGDATA/pg_hba.conf"
        reload=true
    fi
    if [ "$reload" = true ]; then
        sql postgres -c "SELECT pg_reload_conf()" > /dev/null || return 1
        reload=false
    fi
    sql postgres -c "SELECT 1" > /dev/null
}

MONITOR_SETTINGS="health_check_period=1000 health_check_timeout=1000 health_check_retry_delay=500
health_check_max_retries=1 node_considered_unhealthy_timeout=3000 primary_demote_timeout=5000"
monitor_timings() {
    statements=""
    for setting in $MONITOR_SETTINGS; do
        statements="$statements ALTER SYSTEM SET pgautofailover.${setting%%=*} = ${setting#*=};"
    done
    [ "$(sql pg_auto_failover -c "SHOW pgautofailover.primary_demote_timeout")" = 5s ] && return 0
    # shellcheck disable=SC2086
    printf '%s\nSELECT pg_reload_conf();\n' "$statements" | sql pg_auto_failover > /dev/null
}

# On the primary: the application's role and the database's owner; a base backup waiting for a checkpoint.
node_tick() {
    sql postgres -v user="$POSTGRES_USER" -v dbname="$PG_AUTOCTL_DBNAME" > /dev/null << 'SQL'
\getenv password POSTGRES_PASSWORD
SELECT NOT pg_is_in_recovery() AND NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') AS missing \gset
\if :missing
CREATE ROLE :"user" LOGIN SUPERUSER PASSWORD :'password';
ALTER DATABASE :"dbname" OWNER TO :"user";
\endif
SELECT count(*) > 0 AS waiting FROM pg_stat_progress_basebackup
 WHERE phase = 'waiting for checkpoint to finish' \gset
\if :waiting
CHECKPOINT;
\endif
SQL
}

if [ "$role" = monitor ]; then
    set -- pg_autoctl create monitor --pgdata "$PGDATA" --pgport 5432 --hostname "$host" \
        --skip-pg-hba --no-ssl --pgctl "$(command -v pg_ctl)" --run
else
    set -- pg_autoctl create postgres --pgdata "$PGDATA" --pgport 5432 --hostname "$host" --name "$host" \
        --listen '*' --dbname "$PG_AUTOCTL_DBNAME" --skip-pg-hba --no-ssl \
        --pgctl "$(command -v pg_ctl)" --monitor "$PG_AUTOCTL_MONITOR" --run
fi
"$@" &
child=$!
trap 'kill -TERM "$child" 2> /dev/null || true' TERM INT
while kill -0 "$child" 2> /dev/null; do
    if ensure_hba; then
        if [ "$role" = monitor ]; then
            monitor_timings && touch /tmp/havip-ready
        else
            touch /tmp/havip-ready
            node_tick || true
        fi
    fi
    sleep 1 &
    wait $! || true
done
status=0
wait "$child" || status=$?
echo "pg_autoctl exited with status $status" >&2
exit "$status"
