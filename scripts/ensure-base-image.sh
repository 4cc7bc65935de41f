#!/usr/bin/env bash
# Make sure the base image of model images is present in the local Docker engine.
#
# Real users pull a normal Python image; this machine reaches no container registry, so when the
# tag is missing it is built locally, once: a minimal Debian bookworm root filesystem with
# Python 3.11 (debootstrap, from the machine's own Debian mirror), imported with `docker import`.
# Idempotent: an existing tag is never rebuilt or touched. Concurrent runs are serialised.
#
# Environment:
#   MLOPS_BASE_IMAGE     image tag (default airmlops/python:3.11-bookworm)
#   MLOPS_DEBIAN_MIRROR  Debian mirror URL (default: read from this machine's apt sources)
#   MLOPS_PYTHON_MINOR   Python minor the image must have, e.g. 3.11 (default: the project's)
set -euo pipefail

TAG="${MLOPS_BASE_IMAGE:-airmlops/python:3.11-bookworm}"
SUITE=bookworm
PYTHON_MINOR="${MLOPS_PYTHON_MINOR:-3.11}"
LOCK_FILE=/var/lock/airmlops-base-image.lock

say() { echo "ensure-base-image: $*"; }
die() { echo "ensure-base-image: $*" >&2; exit 1; }

# name[:tag] with a lowercase registry-style repository, the same rule the Python side uses.
TAG_RE='^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$'
[[ "$TAG" =~ $TAG_RE ]] || die "MLOPS_BASE_IMAGE '$TAG' is not a valid name:tag"

command -v docker >/dev/null 2>&1 || die "the docker CLI is not on PATH (run scripts/ensure-docker.sh)"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "no Docker engine answers (run scripts/ensure-docker.sh first)"

if docker image inspect "$TAG" >/dev/null 2>&1; then
    say "$TAG present ($(docker image inspect --format '{{.Id}}' "$TAG"))"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "$TAG is missing and building it needs root (debootstrap, chroot)."

# One builder at a time; whoever waited re-checks, since the first may have built it.
exec 9>"$LOCK_FILE"
flock 9
if docker image inspect "$TAG" >/dev/null 2>&1; then
    say "$TAG was built by a concurrent run"
    exit 0
fi

mirror_from_apt_sources() {
    # One-line format: "deb [opts] URI SUITE COMPONENTS..."
    local file line uri
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        while read -r line; do
            line="${line%%#*}"
            [[ "$line" =~ ^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([a-z]+://[^[:space:]]+)[[:space:]]+${SUITE}[[:space:]] ]] || continue
            uri="${BASH_REMATCH[2]}"
            echo "${uri%/}"
            return 0
        done <"$file"
    done
    # deb822 format: stanzas separated by blank lines with "URIs:" and "Suites:" fields.
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        uri=$(awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = ""; uris = ""; suites = ""
            }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            tolower($1) == "types:"  { $1 = ""; types = $0 }
            tolower($1) == "uris:"   { $1 = ""; uris = $0 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            END { if (!found) flush() }
        ' "$file" | sed -e 's/^ *//' -e 's:/*$::' | head -n 1)
        if [ -n "$uri" ]; then
            echo "$uri"
            return 0
        fi
    done
    return 1
}

MIRROR="${MLOPS_DEBIAN_MIRROR:-}"
if [ -z "$MIRROR" ]; then
    MIRROR=$(mirror_from_apt_sources) \
        || die "no '$SUITE' Debian mirror in /etc/apt/sources.list{,.d/*}; set MLOPS_DEBIAN_MIRROR"
fi
[[ "$MIRROR" =~ ^https?://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~/-]*)?$ ]] \
    || die "mirror '$MIRROR' is not a plain http(s) URL"

if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends debootstrap; then
        apt-get update
        apt-get install -y --no-install-recommends debootstrap
    fi
fi

WORK=$(mktemp -d /var/tmp/airmlops-base-image.XXXXXX)
cleanup() { rm -rf --one-file-system "$WORK"; }
trap cleanup EXIT
ROOTFS="$WORK/rootfs"

started=$SECONDS
say "building $TAG: debootstrap --variant=minbase $SUITE from $MIRROR (about 2 minutes)"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    die "debootstrap failed (log above)"
}
say "debootstrap done in $((SECONDS - started)) s"

image_python=$(chroot "$ROOTFS" /usr/bin/python3 -c \
    'import sys; print("%d.%d" % sys.version_info[:2], sys.version.split()[0])') \
    || die "python3 does not run in the new root filesystem"
say "image Python: ${image_python#* }"
[ "${image_python%% *}" = "$PYTHON_MINOR" ] \
    || die "the image has Python ${image_python%% *}, not $PYTHON_MINOR (the wheelhouse targets cp${PYTHON_MINOR/./})"

# Nothing of this host stays in the image: no package caches or lists, no resolver or host name
# (the engine provides its own at run time), no machine id. CA certificates are Debian's own.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache
rm -f "$ROOTFS"/etc/resolv.conf "$ROOTFS"/etc/hostname "$ROOTFS"/etc/machine-id
: >"$ROOTFS/etc/machine-id"

say "importing into Docker as $TAG"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/usr/bin/python3"]' \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase, Python ${image_python#* } (debootstrap)\"" \
    --message "debootstrap --variant=minbase $SUITE" \
    - "$TAG" >/dev/null
say "$TAG built in $((SECONDS - started)) s ($(docker image inspect --format '{{.Id}} {{.Size}} bytes' "$TAG"))"
