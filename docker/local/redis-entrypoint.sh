#!/usr/bin/env bash
# Entrypoint of airmlops/redis:local (docker/local/redis.Dockerfile), modelled on the official
# redis image's: `redis-server [options]` runs as the `redis` user in /data; without an explicit
# --protected-mode, protected mode is off (the official image builds Redis with it off).
set -euo pipefail

if [ "${1:0:1}" = '-' ] || [[ "${1:-}" == *.conf ]]; then
    set -- redis-server "$@"
fi

if [ "$1" = 'redis-server' ]; then
    if [ "$(id -u)" = '0' ]; then
        find /data \! -user redis -exec chown redis:redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
    fi
    protected=0
    for arg in "$@"; do
        [ "$arg" = '--protected-mode' ] && protected=1
    done
    if [ "$protected" = 0 ]; then
        set -- "$@" --protected-mode no
    fi
fi

exec "$@"
