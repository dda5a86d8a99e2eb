#!/bin/sh
# The rabbitmq image's entry point contract, as far as docker-compose.yml uses it: the default
# user from RABBITMQ_DEFAULT_USER/_PASS, then the command (rabbitmq-server).
set -eu
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then
    umask 077
    printf 'default_user = %s\ndefault_pass = %s\nloopback_users = none\n' \
        "$RABBITMQ_DEFAULT_USER" "${RABBITMQ_DEFAULT_PASS:-}" >/etc/rabbitmq/rabbitmq.conf
    chown rabbitmq:rabbitmq /etc/rabbitmq/rabbitmq.conf
fi
exec "$@"
