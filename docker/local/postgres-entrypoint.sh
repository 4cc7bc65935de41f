#!/usr/bin/env bash
# Entrypoint of airmlops/postgres:local (docker/local/postgres.Dockerfile), modelled on the
# official postgres image's docker-entrypoint.sh for the parts the compose stack relies on:
#
#   POSTGRES_USER (default postgres)   superuser created by initdb
#   POSTGRES_PASSWORD (required)       its password; TCP clients authenticate with scram-sha-256
#   POSTGRES_DB (default $POSTGRES_USER) database created on first start
#   /docker-entrypoint-initdb.d/       *.sh (executed if executable, else sourced) and *.sql,
#                                      run once, in name order, on first start
#   PGDATA, PGPORT                     data folder and port (PGPORT also used by the tools)
#
# The command is `postgres [-c key=value ...]` (arguments starting with '-' imply postgres).
# Runs PostgreSQL as the `postgres` user; as root it first fixes the data folder's owner.
set -euo pipefail

log() { echo "postgres-entrypoint: $*" >&2; }

if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

if [ "$1" != 'postgres' ]; then
    exec "$@"
fi
for arg in "$@"; do
    case "$arg" in
        # Informational runs (-V, --version, --help, -C name) need no data folder.
        -'?'|--help|--describe-config|-V|--version|-C) exec "$@" ;;
    esac
done

if [ "$(id -u)" = '0' ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

POSTGRES_USER="${POSTGRES_USER:-postgres}"
POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
export POSTGRES_USER POSTGRES_DB

run_init_scripts() {
    local file
    for file in /docker-entrypoint-initdb.d/*; do
        [ -e "$file" ] || continue
        case "$file" in
            *.sh)
                if [ -x "$file" ]; then
                    log "running $file"; "$file"
                else
                    log "sourcing $file"; # shellcheck disable=SC1090
                    . "$file"
                fi
                ;;
            *.sql)
                log "running $file"
                psql -v ON_ERROR_STOP=1 --no-password --no-psqlrc --username "$POSTGRES_USER" \
                    --dbname "$POSTGRES_DB" -f "$file"
                ;;
            *) log "ignoring $file" ;;
        esac
    done
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        log "PGDATA is empty and POSTGRES_PASSWORD is not set: refusing to create a database"
        log "superuser without a password. Set POSTGRES_PASSWORD."
        exit 1
    fi
    log "initialising $PGDATA (superuser $POSTGRES_USER, database $POSTGRES_DB)"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
    rm -f "$pwfile"
    # Like the official image: listen on every interface of the container (the command can
    # narrow it, e.g. `-c listen_addresses=127.0.0.1` on the host network) and accept
    # password-authenticated TCP clients from anywhere it listens.
    printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"

    # A temporary server on the unix socket only, for the database and the init scripts.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p ${PGPORT:-5432}" -w start >/dev/null
    export PGHOST=/var/run/postgresql PGPORT="${PGPORT:-5432}"
    if [ "$POSTGRES_DB" != 'postgres' ]; then
        psql -v ON_ERROR_STOP=1 --no-password --no-psqlrc --username "$POSTGRES_USER" \
            --dbname postgres -v db="$POSTGRES_DB" <<'SQL'
CREATE DATABASE :"db";
SQL
    fi
    run_init_scripts
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    unset PGHOST
    log "initialisation done"
fi

exec "$@"
