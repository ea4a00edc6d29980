#!/bin/sh
# The entry point of a node of docker-compose.yml's `ha` RabbitMQ cluster (rabbitmq-1..3): writes the cluster's
# Erlang cookie, HAVIP_RABBITMQ_ERLANG_COOKIE, to the node's home (/var/lib/rabbitmq/.erlang.cookie, owner rabbitmq,
# mode 400), where the server and its CLI tools read it, then runs the image's own entry point with the server.
# Every node of a cluster, and every rabbitmqctl that talks to one, needs the same cookie.
set -eu
if [ -z "${HAVIP_RABBITMQ_ERLANG_COOKIE:-}" ]; then
    echo "error: HAVIP_RABBITMQ_ERLANG_COOKIE is not set: the ha profile runs with docker-compose.ha.yml and a" \
        "cookie in .env (docs/deploy.md)" >&2
    exit 1
fi
home=/var/lib/rabbitmq
umask 077
printf '%s' "$HAVIP_RABBITMQ_ERLANG_COOKIE" > "$home/.erlang.cookie.new"
chmod 400 "$home/.erlang.cookie.new"
if [ "$(id -u)" = 0 ]; then  # an image that starts as root and drops to rabbitmq in its entry point
    chown rabbitmq:rabbitmq "$home/.erlang.cookie.new"
fi
mv -f "$home/.erlang.cookie.new" "$home/.erlang.cookie"
unset HAVIP_RABBITMQ_ERLANG_COOKIE
if [ $# -eq 0 ]; then
    # Debian's package: the real script (its /usr/sbin wrapper sends the output to files); elsewhere the one on PATH.
    if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        set -- /usr/lib/rabbitmq/bin/rabbitmq-server
    else
        set -- rabbitmq-server
    fi
fi
exec docker-entrypoint.sh "$@"
