#!/usr/bin/env bash
# Make sure a `redis-server` binary is available (tests and benchmarks start their own instance).
#
# Idempotent: does nothing when `redis-server` is already on PATH. Otherwise installs Debian's
# redis-server package non-interactively (running `apt-get update` first only if the install
# fails). It never starts, enables or restarts a system service: policy-rc.d forbids service
# starts during the install, and any instance the package may still have started is stopped.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    echo "redis-server: $(command -v redis-server)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-redis: redis-server is not installed and this is not root; install it with" >&2
    echo "  sudo apt-get install -y redis-server" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
    # Exit code 101 = "action forbidden": package scripts must not start the service.
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT

install() { apt-get install -y --no-install-recommends redis-server; }
if ! install; then
    apt-get update
    install
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "ensure-redis: redis-server is still not on PATH after the install" >&2
    exit 1
fi
echo "redis-server: $(command -v redis-server) ($(redis-server --version))"
