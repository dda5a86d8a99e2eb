#!/bin/sh
# docker-compose entry point of the rabbitmq service: starts the broker with the image's own entry
# point, creates the prebuilds users with users.sh (mounted at /opt/prebuilds/users.sh) as soon as
# the broker accepts commands, and only then creates the marker the healthcheck looks for, so no
# service connects before its user exists. SIGTERM/SIGINT go to the broker; this script exits with
# the broker's status.
set -eu
ready=/tmp/prebuilds-users-ready
rm -f "$ready"

docker-entrypoint.sh rabbitmq-server &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' TERM INT

# rabbitmqctl cannot reach the node until it has started its distribution: poll until it can.
until rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        wait "$server" || exit $?
        exit 1
    fi
    sleep 1
done
/opt/prebuilds/users.sh
touch "$ready"

status=0
wait "$server" || status=$?
# A trapped signal interrupts `wait`; wait again until the broker has stopped.
while kill -0 "$server" 2>/dev/null; do
    wait "$server" || status=$?
done
exit "$status"
