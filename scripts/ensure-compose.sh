#!/usr/bin/env bash
# Make sure the compose stack (docker-compose.yaml) can be brought up on this machine, offline:
#
#   1. Debian's `docker-compose` (v1) is installed (apt; `apt-get update` only if needed);
#   2. a Docker engine answers and the local Debian base image exists
#      (scripts/ensure-docker.sh, scripts/ensure-base-image.sh: Debian's Python 3.11.2, the
#      base of model images);
#   3. docker/wheelhouse/ holds wheels of requirements.txt + docker/requirements-compose.txt
#      (pip wheel on the host, from the package index; redone only when those files change);
#   4. the images exist and are current, each built only when its tag is missing or the content
#      hash of its inputs (label ai.airmlops.inputs) differs:
#        AIRMLOPS_BASE_IMAGE (default airmlops/python:3.11-host)  docker/local/python.Dockerfile:
#                        the Debian base plus this host's CPython 3.11 (>= 3.11.4, which the
#                        airmlops image needs; Debian's is 3.11.2), --network none
#        AIRMLOPS_IMAGE  (default airmlops/airflow:local)   docker/Dockerfile, --network none,
#                        FROM AIRMLOPS_BASE_IMAGE, PIP_SOURCE=wheelhouse
#        POSTGRES_IMAGE  (default airmlops/postgres:local)  docker/local/postgres.Dockerfile
#        REDIS_IMAGE     (default airmlops/redis:local)     docker/local/redis.Dockerfile
#      (the last two with --network host: apt fetches Debian packages from the mirror).
#
# Idempotent; a warm run takes a few seconds. Concurrent runs are serialised. Prints each image
# tag on a line `image NAME=TAG` at the end. Fails loudly, with the reason, if a step fails.
#
# Environment: AIRMLOPS_IMAGE, AIRMLOPS_BASE_IMAGE, POSTGRES_IMAGE, REDIS_IMAGE (tags to build),
#   MLOPS_BASE_IMAGE (the Debian base image, default airmlops/python:3.11-bookworm),
#   AIRMLOPS_HOST_PYTHON (the interpreter whose installation goes into AIRMLOPS_BASE_IMAGE;
#   default: the first CPython 3.11 >= 3.11.4 of python3.11, python3),
#   AIRMLOPS_REBUILD=1 (rebuild every image, without the engine's layer cache).
# The wheelhouse is <repo>/docker/wheelhouse (docker/Dockerfile copies it from the build context).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

AIRMLOPS_IMAGE="${AIRMLOPS_IMAGE:-airmlops/airflow:local}"
AIRMLOPS_BASE_IMAGE="${AIRMLOPS_BASE_IMAGE:-airmlops/python:3.11-host}"
POSTGRES_IMAGE="${POSTGRES_IMAGE:-airmlops/postgres:local}"
REDIS_IMAGE="${REDIS_IMAGE:-airmlops/redis:local}"
BASE_IMAGE="${MLOPS_BASE_IMAGE:-airmlops/python:3.11-bookworm}"
WHEELHOUSE="$ROOT/docker/wheelhouse"
REBUILD="${AIRMLOPS_REBUILD:-0}"
LOCK_FILE=/var/lock/airmlops-compose.lock
INPUTS_LABEL=ai.airmlops.inputs

say() { echo "ensure-compose: $*"; }
die() { echo "ensure-compose: $*" >&2; exit 1; }

TAG_RE='^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$'
for tag in "$AIRMLOPS_IMAGE" "$AIRMLOPS_BASE_IMAGE" "$POSTGRES_IMAGE" "$REDIS_IMAGE" "$BASE_IMAGE"; do
    [[ "$tag" =~ $TAG_RE ]] || die "'$tag' is not a valid name:tag"
done
started=$SECONDS

# --- 1. docker-compose -------------------------------------------------------------------------
if ! command -v docker-compose >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "docker-compose is missing and this is not root: apt-get install docker-compose"
    say "installing Debian's docker-compose"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends docker-compose >/dev/null; then
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends docker-compose >/dev/null
    fi
    command -v docker-compose >/dev/null 2>&1 || die "docker-compose is still missing after apt-get install"
fi
say "$(docker-compose version --short 2>/dev/null || echo '?') (docker-compose)"

# --- 2. engine and base image ------------------------------------------------------------------
bash "$ROOT/scripts/ensure-docker.sh"
MLOPS_BASE_IMAGE="$BASE_IMAGE" bash "$ROOT/scripts/ensure-base-image.sh"

exec 9>"$LOCK_FILE"
if ! flock -n 9; then
    say "another ensure-compose run is working; waiting for it"
    flock 9
fi

# --- 3. wheelhouse -----------------------------------------------------------------------------
# The requirement set the image installs: requirements.txt, with the packages pinned in
# docker/requirements-compose.txt replaced by those pins (as docker/Dockerfile does); only the
# requirement lines, so editing a comment does not refill the wheelhouse.
requirement_set() {
    local replaced
    replaced=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' docker/requirements-compose.txt | paste -sd '|')
    grep -v -i -E "^(${replaced:-^})==" requirements.txt | grep -v -E '^[[:space:]]*(#|$)'
    grep -v -E '^[[:space:]]*(#|$)' docker/requirements-compose.txt
}

pip_runner() {
    local python
    for python in python3.11 python3; do
        if command -v "$python" >/dev/null 2>&1 \
            && "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
            && "$python" -m pip --version >/dev/null 2>&1; then
            echo "$python -m pip"
            return 0
        fi
    done
    if command -v uv >/dev/null 2>&1; then
        echo "uv tool run --quiet --python 3.11 --from pip pip"
        return 0
    fi
    return 1
}

wheel_stamp=$(requirement_set | sha256sum | cut -c1-32)
mkdir -p "$WHEELHOUSE"
if [ "$(cat "$WHEELHOUSE/.complete" 2>/dev/null || true)" = "$wheel_stamp" ]; then
    say "wheelhouse current ($(find "$WHEELHOUSE" -maxdepth 1 -name '*.whl' | wc -l) wheels, set $wheel_stamp)"
else
    runner=$(pip_runner) || die "no pip for Python 3.11 found (python3.11 -m pip, or uv) to fill the wheelhouse"
    say "filling $WHEELHOUSE with $runner wheel (set $wheel_stamp)"
    work=$(mktemp -d "$WHEELHOUSE/../.wheelhouse-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    requirement_set >"$work/requirements.txt"
    t0=$SECONDS
    # Wheels already here are reused (--find-links), so a changed pin downloads only itself.
    # shellcheck disable=SC2086
    if ! $runner wheel --no-deps --disable-pip-version-check --progress-bar off \
            --find-links "$WHEELHOUSE" --wheel-dir "$work/wheels" -r "$work/requirements.txt" \
            >"$work/pip.log" 2>&1; then
        tail -n 30 "$work/pip.log" >&2
        die "pip wheel failed (log above)"
    fi
    # Replace the folder's wheels with exactly the new set.
    find "$WHEELHOUSE" -maxdepth 1 -name '*.whl' -delete
    mv "$work"/wheels/*.whl "$WHEELHOUSE"/
    echo "$wheel_stamp" >"$WHEELHOUSE/.complete"
    rm -rf "$work"
    trap - EXIT
    say "wheelhouse ready: $(find "$WHEELHOUSE" -maxdepth 1 -name '*.whl' | wc -l) wheels in $((SECONDS - t0)) s"
fi

# --- 4. images ---------------------------------------------------------------------------------
# Content hash of a build's inputs: the files (paths and contents), plus extra words.
inputs_hash() {
    local extra="$1"; shift
    {
        echo "$extra"
        find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' \
            -print0 | sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-32
}

image_inputs() {
    docker image inspect --format "{{ index .Config.Labels \"$INPUTS_LABEL\" }}" "$1" 2>/dev/null || true
}

# build TAG HASH NETWORK CONTEXT DOCKERFILE [BUILD ARGS...]
build() {
    local tag="$1" hash="$2" network="$3" context="$4" dockerfile="$5"; shift 5
    local previous current t0=$SECONDS log cache=()
    if [ "$REBUILD" = 1 ]; then
        cache=(--no-cache)
    elif [ "$(image_inputs "$tag")" = "$hash" ]; then
        say "$tag current (inputs $hash)"
        return 0
    fi
    previous=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    say "building $tag (inputs $hash, network $network)"
    log=$(mktemp)
    if ! docker build "${cache[@]}" --force-rm --network "$network" \
            --label "$INPUTS_LABEL=$hash" -f "$dockerfile" \
            -t "$tag" "$@" "$context" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        die "docker build of $tag failed (log above)"
    fi
    rm -f "$log"
    current=$(docker image inspect --format '{{.Id}}' "$tag")
    say "$tag built in $((SECONDS - t0)) s ($(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
    # The replaced image is dangling now: remove it so rebuilds do not pile up (kept if in use).
    if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
        docker image rm "$previous" >/dev/null 2>&1 || true
    fi
}

# The host's CPython 3.11 for AIRMLOPS_BASE_IMAGE: >= 3.11.4, installed under a prefix of its
# own (not /usr: its files would overwrite Debian's Python in the image).
host_python() {
    local candidate
    for candidate in ${AIRMLOPS_HOST_PYTHON:-} python3.11 python3; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        "$candidate" -c 'import sys, tarfile
sys.exit(not (sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)
              and hasattr(tarfile, "data_filter")))' 2>/dev/null || continue
        "$candidate" -c 'import sys; print(sys.base_prefix)'
        return 0
    done
    return 1
}

build_host_python_image() {
    local prefix hash context
    prefix=$(host_python) || die "no CPython 3.11 >= 3.11.4 on this host for $AIRMLOPS_BASE_IMAGE \
(set AIRMLOPS_HOST_PYTHON, or AIRMLOPS_BASE_IMAGE to an image that has one)"
    prefix=$(realpath "$prefix")
    case "$prefix" in
        /usr|/usr/local|/) die "the host's Python lives in $prefix; set AIRMLOPS_BASE_IMAGE to an image with CPython >= 3.11.4" ;;
    esac
    [ -x "$prefix/bin/python3.11" ] || die "$prefix/bin/python3.11 is missing"
    hash=$(inputs_hash "$base_id $prefix $(sha256sum "$prefix/bin/python3.11" | cut -c1-64)" \
        docker/local/python.Dockerfile)
    if [ "$REBUILD" != 1 ] && [ "$(image_inputs "$AIRMLOPS_BASE_IMAGE")" = "$hash" ]; then
        say "$AIRMLOPS_BASE_IMAGE current (inputs $hash)"
        return 0
    fi
    context=$(mktemp -d /var/tmp/airmlops-python-image.XXXXXX)
    cp docker/local/python.Dockerfile "$context/"
    # The interpreter, its shared library and the standard library; no site-packages content,
    # tests, IDLE, tkinter or static library.
    (cd / && tar --create --file "$context/cpython.tar" \
        --exclude="${prefix#/}/lib/python3.11/site-packages/*" \
        --exclude="${prefix#/}/lib/python3.11/test" \
        --exclude="${prefix#/}/lib/python3.11/idlelib" \
        --exclude="${prefix#/}/lib/python3.11/tkinter" \
        --exclude="${prefix#/}/lib/python3.11/turtledemo" \
        --exclude="${prefix#/}/lib/python3.11/config-3.11-*" \
        "${prefix#/}/bin/python3.11" \
        $(cd / && ls -d "${prefix#/}"/lib/libpython3* 2>/dev/null) \
        "${prefix#/}/lib/python3.11")
    build "$AIRMLOPS_BASE_IMAGE" "$hash" none "$context" "$context/python.Dockerfile" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "PYTHON_PREFIX=$prefix"
    rm -rf "$context"
}

base_id=$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE")

build "$POSTGRES_IMAGE" \
    "$(inputs_hash "$base_id" docker/local/postgres.Dockerfile docker/local/postgres-entrypoint.sh)" \
    host docker/local docker/local/postgres.Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE"
build "$REDIS_IMAGE" \
    "$(inputs_hash "$base_id" docker/local/redis.Dockerfile docker/local/redis-entrypoint.sh)" \
    host docker/local docker/local/redis.Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE"
build_host_python_image
airflow_base_id=$(docker image inspect --format '{{.Id}}' "$AIRMLOPS_BASE_IMAGE")
build "$AIRMLOPS_IMAGE" \
    "$(inputs_hash "$airflow_base_id wheelhouse $wheel_stamp" docker/Dockerfile .dockerignore \
        requirements.txt docker/requirements-compose.txt docker/entrypoint.sh \
        docker/healthcheck.py include dags plugins)" \
    none . docker/Dockerfile --build-arg "BASE_IMAGE=$AIRMLOPS_BASE_IMAGE" \
    --build-arg PIP_SOURCE=wheelhouse

say "ready in $((SECONDS - started)) s"
echo "image AIRMLOPS_IMAGE=$AIRMLOPS_IMAGE"
echo "image POSTGRES_IMAGE=$POSTGRES_IMAGE"
echo "image REDIS_IMAGE=$REDIS_IMAGE"
echo "image BASE_IMAGE=$AIRMLOPS_BASE_IMAGE"
echo "image MODEL_BASE_IMAGE=$BASE_IMAGE"
