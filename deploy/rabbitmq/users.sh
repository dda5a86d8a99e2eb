#!/bin/sh
# Creates the RabbitMQ users of a prebuilds deployment, one per role, each allowed exactly what that
# role does on the broker (README "Least privilege" has the matrix and the reasons). Idempotent: an
# existing user gets its password and permissions set again.
#
#   PREBUILDS_AMQP_PREFIX=prebuilds RABBITMQ_VHOST=/ \
#   WORKER_PASSWORD=… SCHEDULER_PASSWORD=… PROVISIONER_PASSWORD=… CLAIMS_PASSWORD=… \
#   NOTIFIER_PASSWORD=… OPERATOR_PASSWORD=… deploy/rabbitmq/users.sh
#
# Users are named <USER_PREFIX><role>: prebuilds-worker, prebuilds-scheduler,
# prebuilds-provisioner, prebuilds-claims (whatever sends claim requests), prebuilds-notifier and
# prebuilds-operator
# (`prebuildsctl`, including `migrate`, which declares the topology). Every service then runs with
# PREBUILDS_DECLARE_TOPOLOGY=false: it only checks with passive declares, which need no permission,
# that what it uses exists. RABBITMQCTL overrides the command (for example
# "docker compose exec -T rabbitmq rabbitmqctl"). Passwords go to rabbitmqctl on standard input, so
# they never show in a process list.
set -eu

prefix=${PREBUILDS_AMQP_PREFIX:-prebuilds}
vhost=${RABBITMQ_VHOST:-/}
user_prefix=${USER_PREFIX:-prebuilds-}
ctl=${RABBITMQCTL:-rabbitmqctl}

# The binaries accept the same characters (PREBUILDS_AMQP_PREFIX); only '.' is special in a regex.
case $prefix in
    '' | *[!a-z0-9._-]*) valid=false ;;
    *) valid=true ;;
esac
if [ "$valid" = false ] || [ "${#prefix}" -gt 64 ]; then
    echo "users.sh: PREBUILDS_AMQP_PREFIX '$prefix' must be 1-64 characters of a-z, 0-9, '-', '_' or '.'" >&2
    exit 2
fi
p=$(printf '%s' "$prefix" | sed 's/\./\\./g')

# The permission matrix. Each pattern is anchored and lists names exactly: the topic exchange
# "$p", the dead-letter exchange "$p.dlx", the queues "$p.<name>", and "amq.default", the default
# exchange that RPC replies to direct reply-to (amq.rabbitmq.reply-to) are published on. Consuming
# from amq.rabbitmq.reply-to needs no permission; dead-lettering by the broker itself needs none.
nothing='^$'
work_queues='reconcile|claims|provisioner-jobs|provisioner-jobs-user|provisioner-events|notifications'

# configure / write / read, per role
worker_configure=$nothing
worker_write="^($p|$p\\.dlx|amq\\.default)\$"
worker_read="^$p\\.(reconcile|claims|provisioner-events)\$"

scheduler_configure=$nothing
scheduler_write="^$p\$"
scheduler_read=$nothing

provisioner_configure=$nothing
provisioner_write="^$p(\\.dlx)?\$"
provisioner_read="^$p\\.provisioner-jobs(-user)?\$"

claims_configure=$nothing
claims_write="^$p\$"
claims_read=$nothing

# The notifier consumes notifications and publishes only the ones it dead-letters, with their
# reason, to the dead-letter exchange.
notifier_configure=$nothing
notifier_write="^$p\\.dlx\$"
notifier_read="^$p\\.notifications\$"

# migrate declares every exchange and queue (configure), binds each queue (write on the queue, read
# on the exchange) and gives the work queues their dead-letter exchange, which RabbitMQ allows only
# with read on the queue and write on that exchange; the other commands publish to the topic
# exchange and read the dead letters. Together: every name of the prefix, for all three.
operator_all="^$p(\\.(dlx|dead|$work_queues))?\$"
operator_configure=$operator_all
operator_write=$operator_all
operator_read=$operator_all

for role in worker scheduler provisioner claims notifier operator; do
    upper=$(printf '%s' "$role" | tr '[:lower:]' '[:upper:]')
    eval "password=\${${upper}_PASSWORD:-}"
    if [ -z "$password" ]; then
        echo "users.sh: set ${upper}_PASSWORD (the password of RabbitMQ user $user_prefix$role)" >&2
        exit 2
    fi
    user=$user_prefix$role
    if $ctl list_users --silent | cut -f1 | grep -qxF "$user"; then
        printf '%s' "$password" | $ctl change_password "$user" >/dev/null
    else
        printf '%s' "$password" | $ctl add_user "$user" >/dev/null
    fi
    eval "configure=\$${role}_configure write=\$${role}_write read=\$${role}_read"
    # shellcheck disable=SC2154 # set by the eval above
    $ctl set_permissions -p "$vhost" "$user" "$configure" "$write" "$read" >/dev/null
    echo "$user: configure '$configure' write '$write' read '$read' on vhost '$vhost'"
done
