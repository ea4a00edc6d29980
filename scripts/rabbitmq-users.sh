#!/bin/sh
# The RabbitMQ users of a HAVIP deployment, each with only the rights its process needs, made with rabbitmqctl;
# idempotent (run it again after an upgrade, or to add a segment or a consumer). What each right is for:
# docs/operations.md, "Broker users and their rights".
#
#   scripts/rabbitmq-users.sh [--print-passwords] [--dry-run] [--segment NAME]... [--consumer NAME]... VHOST [PREFIX]
#
# VHOST    the virtual host of HAVIP_AMQP_URL (created if missing); PREFIX: the deployment's HAVIP_AMQP_PREFIX.
# Users, each name after HAVIP_RABBITMQ_USER_PREFIX (default "havip-"):
#   migrate          `python -m services.allocator migrate` and `… binding migrate`: declares the exchanges, the
#                    dead-letter queue and the services' queues
#   allocator        the allocator's replicas
#   binding          the binding service's replicas
#   watcher-SEGMENT  the ARP watchers of one layer-2 segment (--segment, repeatable; default: default); the
#                    binding's HAVIP_WATCHER_USER_TEMPLATE is then <user prefix>watcher-{segment}
#   consumer-NAME    an event consumer (--consumer, repeatable; NAME: a-z 0-9 _ -): its own queues and exchanges,
#                    named PREFIX consumer-NAME.<anything>, bound to the event exchange
# Passwords come from HAVIP_RABBITMQ_<USER>_PASSWORD, <USER> the name above in capitals with '-' and '.' as '_'
# (HAVIP_RABBITMQ_BINDING_PASSWORD, HAVIP_RABBITMQ_WATCHER_DEFAULT_PASSWORD; with one segment,
# HAVIP_RABBITMQ_WATCHER_PASSWORD also serves). A password given is set, on an existing user too. Without one, an
# existing user keeps its own and a new user gets a random one — printed on stdout as HAVIP_RABBITMQ_<USER>_PASSWORD=…
# with --print-passwords, and an error without it (nobody could log in as that user). Nothing else is printed on
# stdout; what is done is said on stderr, never a password.
# RABBITMQCTL: the command to run (default rabbitmqctl), e.g. "rabbitmqctl -n rabbit@rabbitmq" or
# "podman exec rabbitmq rabbitmqctl". --dry-run prints the rabbitmqctl commands on stdout instead (passwords as ***),
# treating every user as new, without running anything.
set -eu

usage() {
    echo "usage: $0 [--print-passwords] [--dry-run] [--segment NAME]... [--consumer NAME]... VHOST [PREFIX]" >&2
    exit 2
}

fail() {
    echo "$0: $*" >&2
    exit 2
}

named() {  # named KIND NAME: NAME is a segment's (as HAVIP_SEGMENT, shared/events.py SegmentName) or a consumer's
    case "$1" in
        segment) pattern='[A-Za-z0-9][A-Za-z0-9._-]{0,62}' ;;
        consumer) pattern='[a-z0-9][a-z0-9_-]{0,62}' ;;  # no dot: consumer-a's names must not take in consumer-a.b's
    esac
    case "$2" in *"
"*) fail "not a $1 name: $2" ;; esac
    printf '%s\n' "$2" | grep -Eqx -- "$pattern" || fail "not a $1 name: $2"
}

print_passwords=false
dry_run=false
segments=""
consumers=""
while [ $# -gt 0 ]; do
    case "$1" in
        --print-passwords) print_passwords=true ;;
        --dry-run) dry_run=true ;;
        --segment) [ $# -ge 2 ] || usage; named segment "$2"; segments="$segments $2"; shift ;;
        --consumer) [ $# -ge 2 ] || usage; named consumer "$2"; consumers="$consumers $2"; shift ;;
        --) shift; break ;;
        -*) usage ;;
        *) break ;;
    esac
    shift
done
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
vhost=$1
prefix=${2-}
[ -n "$vhost" ] || usage
segments=${segments:-default}
user_prefix=${HAVIP_RABBITMQ_USER_PREFIX-havip-}
ctl=${RABBITMQCTL:-rabbitmqctl}

printf '%s\n' "$user_prefix" | grep -Eqx '[A-Za-z0-9._-]*' || fail "not a user name prefix: $user_prefix"
case "$prefix" in *"
"*) fail "a prefix of one line" ;; esac

# The prefix as a regular expression matching itself (RabbitMQ's regular expressions are PCRE).
p=$(printf '%s' "$prefix" | sed 's/[][\\.^$|?*+(){}]/\\&/g')
events="${p}havip\\.events"
dlx="${p}havip\\.dlx"
dead="${p}havip\\.dead"
nothing='^$'  # RabbitMQ checks the default exchange as amq.default: this matches no exchange or queue

# The routing keys each service publishes (shared/contracts.py publisher_of; tests/unit/test_rabbitmq_users.py).
watcher_keys='^arp\.(claims\.observed(\.[0-9]+)?|watcher\.heartbeat)$'
allocator_keys='^((vpc|subnet|instance)\.[a-z_]+|havip\.(allocated|updated|released|eip\.[a-z_]+|binding\.replay_requested))$'
binding_keys='^havip\.(binding\.(changed|replayed)|claim\.[a-z_]+|flapping\.[a-z_]+|split_brain\.[a-z_]+)$'

run() {  # rabbitmqctl with its arguments; "***" stands for the password in what is printed
    if $dry_run; then
        shown=""
        for arg in "$@"; do
            if [ -n "${secret-}" ] && [ "$arg" = "$secret" ]; then arg="***"; fi
            shown="$shown '$(printf '%s' "$arg" | sed "s/'/'\\\\''/g")'"  # as the shell quotes it
        done
        printf '%s\n' "rabbitmqctl$shown"  # not echo: dash's reads backslashes
    else
        # shellcheck disable=SC2086  # RABBITMQCTL may be a command with arguments
        $ctl -q "$@" >/dev/null
    fi
}

if $dry_run; then
    existing=""
else
    # shellcheck disable=SC2086
    existing=$($ctl -q list_users --no-table-headers | cut -f1)
    # shellcheck disable=SC2086
    if ! $ctl -q list_vhosts --no-table-headers name | grep -Fqx -- "$vhost"; then
        $ctl -q add_vhost "$vhost" >/dev/null
        echo "virtual host $vhost: created" >&2
    fi
fi
count=0
for segment in $segments; do count=$((count + 1)); done
if [ "$count" -eq 1 ]; then one_segment=true; else one_segment=false; fi

# user ROLE CONFIGURE WRITE READ [TOPIC-WRITE]: the user <user prefix>ROLE with these rights on VHOST (and, with
# TOPIC-WRITE, only those routing keys on the event exchange).
user() {
    role=$1
    name="$user_prefix$role"
    variable="HAVIP_RABBITMQ_$(printf '%s' "$role" | tr 'a-z.-' 'A-Z__')_PASSWORD"
    eval "secret=\${$variable-}"
    case "$role" in watcher-*) if [ -z "$secret" ] && $one_segment; then secret=${HAVIP_RABBITMQ_WATCHER_PASSWORD-}; fi ;; esac
    if printf '%s\n' "$existing" | grep -Fqx -- "$name"; then
        if [ -n "$secret" ]; then
            run change_password "$name" "$secret"
            echo "user $name: password set" >&2
        else
            echo "user $name: exists, password kept" >&2
        fi
    else
        if [ -z "$secret" ]; then
            $print_passwords || fail "user $name is new: give its password in $variable, or --print-passwords"
            secret=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
            printf '%s\n' "$variable=$secret"
        fi
        run add_user "$name" "$secret"
        echo "user $name: created" >&2
    fi
    secret=""
    run set_permissions -p "$vhost" "$name" "$2" "$3" "$4"
    if [ $# -ge 5 ]; then
        run set_topic_permissions -p "$vhost" "$name" "${prefix}havip.events" "$5" ".*"
    fi
    echo "user $name: rights set on virtual host $vhost" >&2
}

havip_queues="${p}(binding|allocator)\\..+"
user migrate "^($events|$dlx|$dead|$havip_queues)\$" "^($events|$dlx|$dead|$havip_queues)\$" \
    "^($events|$dlx|$dead|$havip_queues)\$"
# A service declares and binds its own queues (as migrate did, or anew), which RabbitMQ lets it do only with write
# on their dead-letter exchange; it publishes to the event exchange, its own routing keys only.
user allocator "^${p}allocator\\..+\$" "^(${p}allocator\\..+|$events|$dlx)\$" "^(${p}allocator\\..+|$events)\$" \
    "$allocator_keys"
user binding "^${p}binding\\..+\$" "^(${p}binding\\..+|$events|$dlx)\$" "^(${p}binding\\..+|$events)\$" \
    "$binding_keys"
for segment in $segments; do
    user "watcher-$segment" "$nothing" "^$events\$" "$nothing" "$watcher_keys"
done
for consumer in $consumers; do
    own="${p}consumer-$consumer\\..+"
    user "consumer-$consumer" "^$own\$" "^$own\$" "^($own|$events)\$"
done
