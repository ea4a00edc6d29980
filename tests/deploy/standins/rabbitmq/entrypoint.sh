#!/bin/sh
# The official image's behaviour in short: the default user and password from the environment, reachable
# from other containers (no loopback-only users), logs on the console.
set -eu
{
    echo "loopback_users = none"
    echo "log.console = true"
    echo "log.file = false"
    if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then echo "default_user = $RABBITMQ_DEFAULT_USER"; fi
    if [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then echo "default_pass = $RABBITMQ_DEFAULT_PASS"; fi
} > /etc/rabbitmq/conf.d/10-defaults.conf
exec "$@"
