#!/usr/bin/env bash
# Idempotent set-up on a Debian machine, as root: Debian packages, PostgreSQL and RabbitMQ (installed and
# started when nothing answers on their ports), the virtual environment, the database and its migrations.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
    local port=$1 what=$2
    for _ in $(seq 1 120); do answers "$port" && return 0; sleep 0.5; done
    log "$what does not answer on 127.0.0.1:$port"; return 1
}

[ "$(id -u)" = 0 ] || { log "run as root: the lab needs network namespaces and raw sockets"; exit 1; }

# --- Debian packages -------------------------------------------------------------------------------------
# keepalived, arping, tcpdump, tcpreplay, iproute2: the lab and its tests; nftables: the lab's ARP guard (a
# bridge rule inside the lab's own namespace; the host's ruleset is never touched); prometheus: promtool;
# docker-compose: validates docker-compose.yml offline, and brings it up on podman in tests/deploy (with runc,
# netavark and aardvark-dns for service names — netavark 1.4 drives iptables, which a fresh Debian lacks: without
# it every container network fails with "netavark: No such file or directory" —, catatonit for `init: true`,
# debootstrap for the base image); postgresql-15-auto-failover and pg-auto-failover-cli: the Postgres primary with
# a synchronous standby of scripts/postgres-ha.sh (the monitor's extension and pg_autoctl; installing them leaves
# the system cluster alone).
packages=(keepalived arping tcpdump tcpreplay iproute2 nftables procps prometheus docker-compose python3-venv
    podman runc netavark aardvark-dns iptables catatonit debootstrap postgresql-15-auto-failover pg-auto-failover-cli)
answers 5432 || command -v pg_ctlcluster >/dev/null || packages+=(postgresql)
command -v psql >/dev/null || packages+=(postgresql-client)
answers 5672 || command -v rabbitmq-server >/dev/null || packages+=(rabbitmq-server)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- PostgreSQL --------------------------------------------------------------------------------------------
# The services connect as postgres over loopback without a password (as on the service machines); a cluster
# freshly installed from Debian asks for a password there, so the set-up adds a trust line for that one case.
pg_cluster() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1; }
pg_trusts() { psql -w "postgresql://postgres@127.0.0.1:5432/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1; }
allow_loopback() {
    local hba="/etc/postgresql/$1/main/pg_hba.conf"
    grep -q "^host all postgres 127.0.0.1/32 trust" "$hba" ||
        sed -i '1i host all postgres 127.0.0.1/32 trust  # havip set-up: local development only' "$hba"
}
if ! answers 5432; then
    version=$(pg_cluster)
    [ -n "$version" ] || { log "PostgreSQL is installed but has no cluster"; exit 1; }
    allow_loopback "$version"
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_port 5432 PostgreSQL
fi
if ! pg_trusts; then
    version=$(pg_cluster)
    [ -n "$version" ] || { log "cannot connect to PostgreSQL on 127.0.0.1:5432 as postgres"; exit 1; }
    log "allowing postgres on loopback without a password (PostgreSQL $version)"
    allow_loopback "$version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    for _ in $(seq 1 20); do pg_trusts && break; sleep 0.5; done
    pg_trusts || { log "still cannot connect to PostgreSQL on 127.0.0.1:5432 as postgres"; exit 1; }
fi

# --- RabbitMQ ----------------------------------------------------------------------------------------------
if ! answers 5672; then
    log "starting RabbitMQ"
    rabbitmq-server -detached
    wait_port 5672 RabbitMQ
    rabbitmqctl -q await_startup
fi

# --- Python ------------------------------------------------------------------------------------------------
python=$(command -v python3.11 || command -v python3)
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { log "Python 3.11 is required"; exit 1; }
[ -x .venv/bin/python ] || { log "creating .venv"; "$python" -m venv .venv; }
stamp=.venv/.installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing Python packages (requirements.lock)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
    echo "$want" > "$stamp"
fi

# --- database, roles and queues ----------------------------------------------------------------------------
# Each service's migrate creates its database role (havip_allocator, havip_binding; NOLOGIN, no password) when
# missing, gives it the service's schema and declares the service's queue. Both services then use this one URL
# and act as their own role (SET ROLE): neither can read the other's tables.
export HAVIP_DATABASE_URL=${HAVIP_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/havip}
.venv/bin/python -m services.allocator migrate
.venv/bin/python -m services.binding migrate
log "ready"
