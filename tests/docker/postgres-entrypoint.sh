#!/bin/sh
# Initialise the cluster on first start (user, password, database from the POSTGRES_* variables), then run it.
set -eu
bin="$(ls -d /usr/lib/postgresql/*/bin | head -n 1)"
user="${POSTGRES_USER:-postgres}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile="$(mktemp)"
    printf '%s\n' "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}" > "$pwfile"
    "$bin/initdb" -D "$PGDATA" -U "$user" --pwfile="$pwfile" -A scram-sha-256 >/dev/null
    rm -f "$pwfile"
    "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses='' -p $PGPORT -k /run/postgresql" -w start >/dev/null
    if [ "${POSTGRES_DB:-postgres}" != postgres ]; then
        PGPASSWORD="$POSTGRES_PASSWORD" "$bin/createdb" -h /run/postgresql -p "$PGPORT" -U "$user" "$POSTGRES_DB"
    fi
    "$bin/pg_ctl" -D "$PGDATA" -w stop >/dev/null
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses=127.0.0.1 -p "$PGPORT" -k /run/postgresql
