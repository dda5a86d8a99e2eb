#!/bin/sh
# docker-compose: the postgres image runs this once, when it initialises an empty data volume, as
# its superuser. It creates the prebuilds roles with deploy/postgres/roles.sql (mounted at
# /opt/prebuilds/roles.sql) before `prebuildsctl migrate` runs as the operator; the `db-grants`
# service runs the same file again after migrate for the table grants. Passwords come from the
# PREBUILDS_<ROLE>_DB_PASSWORD variables of the postgres service.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v operator_password="$PREBUILDS_OPERATOR_DB_PASSWORD" \
    -v worker_password="$PREBUILDS_WORKER_DB_PASSWORD" \
    -v scheduler_password="$PREBUILDS_SCHEDULER_DB_PASSWORD" \
    -v provisioner_password="$PREBUILDS_PROVISIONER_DB_PASSWORD" \
    -v claims_password="$PREBUILDS_CLAIMS_DB_PASSWORD" \
    -v notifier_password="$PREBUILDS_NOTIFIER_DB_PASSWORD" \
    -v api_password="$PREBUILDS_API_DB_PASSWORD" \
    -f /opt/prebuilds/roles.sql
