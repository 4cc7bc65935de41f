#!/usr/bin/env bash
# Entrypoint of the airmlops image (docker/Dockerfile): a little preparation, then `exec "$@"`.
#
# - `init` (the airflow-init service): `airflow db migrate`, then the admin user of the FAB auth
#   manager (role Admin) from _AIRFLOW_WWW_USER_USERNAME / _AIRFLOW_WWW_USER_PASSWORD (both
#   required; an existing user is left as it is: change its password in the UI or with
#   `airflow users reset-password`).
# - MLflow's basic-auth configuration is written (owner-only) to MLFLOW_AUTH_CONFIG_PATH when
#   that and MLFLOW_AUTH_DATABASE_URI are set (the mlflow service): users and permissions live in
#   that database; the admin user comes from MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD, which MLflow
#   reads from the environment itself.
# - The model-image wheelhouse (MLOPS_WHEELHOUSE_DIR, a writable volume) gets a copy of each
#   wheel of AIRMLOPS_WHEELHOUSE_SEED (a read-only mount; may be absent or empty) it lacks, so
#   the containerize stage builds model images without the package index where none is
#   reachable. Only missing wheels are copied: a restart costs nothing.
# - `celery-worker [args]` runs `airflow celery worker` under a node name unique to this
#   container (written to $AIRFLOW_HOME/celery-node for the health check): replicas of a worker
#   on the host network share one host name, and Celery node names must differ.
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }

write_mlflow_auth_config() {
    local file="${MLFLOW_AUTH_CONFIG_PATH:-}" database="${MLFLOW_AUTH_DATABASE_URI:-}"
    [ -n "$file" ] && [ -n "$database" ] || return 0
    mkdir -p "$(dirname "$file")"
    local tmp
    tmp=$(mktemp "$(dirname "$file")/.auth.XXXXXX")
    chmod 0600 "$tmp"
    # configparser writes it: the URI (it holds the database password) may hold any character;
    # '%' is doubled because MLflow reads the file with interpolation.
    python3 - "$tmp" <<'PY'
import configparser, os, sys

config = configparser.RawConfigParser()
config["mlflow"] = {
    "default_permission": "NO_PERMISSIONS",
    "database_uri": os.environ["MLFLOW_AUTH_DATABASE_URI"].replace("%", "%%"),
    "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
}
with open(sys.argv[1], "w", encoding="utf-8") as handle:
    config.write(handle)
PY
    mv -f "$tmp" "$file"
}

init_airflow() {
    local user="${_AIRFLOW_WWW_USER_USERNAME:-}" password="${_AIRFLOW_WWW_USER_PASSWORD:-}"
    [ -n "$user" ] || { log "_AIRFLOW_WWW_USER_USERNAME is not set"; exit 2; }
    [ -n "$password" ] || { log "_AIRFLOW_WWW_USER_PASSWORD is not set (no default password)"; exit 2; }
    [[ "$user" =~ ^[A-Za-z0-9_.@-]{1,64}$ ]] || { log "invalid _AIRFLOW_WWW_USER_USERNAME"; exit 2; }
    airflow db migrate
    airflow users create --role Admin --username "$user" --password "$password" \
        --firstname Admin --lastname User --email "$user@airmlops.invalid"
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

write_mlflow_auth_config
seed_wheelhouse

if [ "${1:-}" = "init" ]; then
    init_airflow
    exit 0
fi

if [ "${1:-}" = "celery-worker" ]; then
    shift
    node=$(python3 -c 'import secrets, socket; print(f"worker-{secrets.token_hex(4)}@{socket.gethostname()}")')
    mkdir -p "$AIRFLOW_HOME"
    echo "$node" >"$AIRFLOW_HOME/celery-node"
    exec airflow celery worker --celery-hostname "$node" "$@"
fi

exec "$@"
