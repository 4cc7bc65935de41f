#!/usr/bin/env bash
# Entrypoint of the airmlops image (docker/Dockerfile): a little preparation, then `exec "$@"`.
#
# - The simple auth manager's password file is written from _AIRFLOW_WWW_USER_USERNAME /
#   _AIRFLOW_WWW_USER_PASSWORD when both are set (owner-only), so the login comes from `.env`
#   instead of a password Airflow generates and prints once.
# - The model-image wheelhouse (MLOPS_WHEELHOUSE_DIR, a writable volume) gets a copy of each
#   wheel of AIRMLOPS_WHEELHOUSE_SEED (a read-only mount; may be absent or empty) it lacks, so
#   the containerize stage builds model images without the package index where none is
#   reachable. Only missing wheels are copied: a restart costs nothing.
# - `celery-worker [args]` runs `airflow celery worker` under a node name unique to this
#   container (written to $AIRFLOW_HOME/celery-node for the health check): replicas of a worker
#   on the host network share one host name, and Celery node names must differ.
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }

write_passwords_file() {
    local user="${_AIRFLOW_WWW_USER_USERNAME:-}" password="${_AIRFLOW_WWW_USER_PASSWORD:-}"
    local file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-}"
    [ -n "$user" ] && [ -n "$password" ] && [ -n "$file" ] || return 0
    [[ "$user" =~ ^[A-Za-z0-9_.@-]{1,64}$ ]] || { log "invalid _AIRFLOW_WWW_USER_USERNAME"; exit 2; }
    mkdir -p "$(dirname "$file")"
    local tmp
    tmp=$(mktemp "$(dirname "$file")/.passwords.XXXXXX")
    # JSON-encode with Python: the password may hold any character.
    python3 -c 'import json, sys; print(json.dumps({sys.argv[1]: sys.argv[2]}))' \
        "$user" "$password" >"$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$file"
}

seed_wheelhouse() {
    local seed="${AIRMLOPS_WHEELHOUSE_SEED:-}" target="${MLOPS_WHEELHOUSE_DIR:-}"
    [ -n "$seed" ] && [ -d "$seed" ] && [ -n "$target" ] || return 0
    mkdir -p "$target/pool"
    local wheel name copied=0
    for wheel in "$seed"/*.whl; do
        [ -e "$wheel" ] || continue
        name="${wheel##*/}"
        # Real files, not links: the image build copies them into a build context.
        [ -f "$target/pool/$name" ] && [ ! -L "$target/pool/$name" ] && continue
        cp "$wheel" "$target/pool/.$name.$$"
        mv -f "$target/pool/.$name.$$" "$target/pool/$name"
        copied=$((copied + 1))
    done
    [ "$copied" -eq 0 ] || log "copied $copied wheel(s) from $seed into $target/pool"
}

write_passwords_file
seed_wheelhouse

if [ "${1:-}" = "celery-worker" ]; then
    shift
    node=$(python3 -c 'import secrets, socket; print(f"worker-{secrets.token_hex(4)}@{socket.gethostname()}")')
    mkdir -p "$AIRFLOW_HOME"
    echo "$node" >"$AIRFLOW_HOME/celery-node"
    exec airflow celery worker --celery-hostname "$node" "$@"
fi

exec "$@"
