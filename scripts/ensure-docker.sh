#!/usr/bin/env bash
# Make sure a Docker engine answers on /var/run/docker.sock (tests and `make run` build images).
#
# Idempotent and gentle: when an engine already answers, it is left exactly as it is. Otherwise
# Debian's docker.io is installed if `dockerd` is missing (non-interactively; `apt-get update`
# only if the install fails), then `dockerd` is started in the background with no bridge and no
# iptables rules, so that no container ever gets a 172.x address: every build and container
# here uses `--network host` (servers bound to 127.0.0.1) or `--network none`.
#
# Environment:
#   MLOPS_DOCKERD_LOG      log file of the daemon started here (default /var/log/airmlops-dockerd.log)
#   MLOPS_DOCKERD_PIDFILE  its pidfile (default /var/run/airmlops-dockerd.pid)
#   MLOPS_DOCKERD_WAIT     seconds to wait for the daemon to answer (default 30)
set -euo pipefail

SOCKET=/var/run/docker.sock
LOG_FILE="${MLOPS_DOCKERD_LOG:-/var/log/airmlops-dockerd.log}"
PID_FILE="${MLOPS_DOCKERD_PIDFILE:-/var/run/airmlops-dockerd.pid}"
WAIT_SECONDS="${MLOPS_DOCKERD_WAIT:-30}"

say() { echo "ensure-docker: $*"; }
die() { echo "ensure-docker: $*" >&2; exit 1; }

engine_answers() {
    command -v docker >/dev/null 2>&1 && [ -S "$SOCKET" ] \
        && timeout 5 docker -H "unix://$SOCKET" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

if engine_answers; then
    say "engine already running (server $(docker -H "unix://$SOCKET" version --format '{{.Server.Version}}'))"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    die "no Docker engine answers on $SOCKET and this is not root; start one (or run as root)."
fi

if ! command -v dockerd >/dev/null 2>&1; then
    say "dockerd is missing: installing Debian's docker.io"
    export DEBIAN_FRONTEND=noninteractive
    POLICY=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$POLICY" ]; then
        # Exit code 101 = "action forbidden": package scripts must not start the service;
        # the daemon is started below with this machine's network flags.
        printf '#!/bin/sh\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        created_policy=1
    fi
    cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$POLICY"; fi; }
    trap cleanup EXIT
    install() { apt-get install -y --no-install-recommends docker.io; }
    if ! install; then
        apt-get update
        install
    fi
    command -v dockerd >/dev/null 2>&1 || die "dockerd is still not on PATH after installing docker.io"
fi
command -v docker >/dev/null 2>&1 || die "the docker CLI is not on PATH"

# A daemon we started earlier may still be booting: wait for it rather than start a second one.
if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    say "dockerd (pid $(cat "$PID_FILE")) is running but not answering yet; waiting"
elif pgrep -x dockerd >/dev/null 2>&1; then
    die "a dockerd process runs but does not answer on $SOCKET; not starting another (see its log)."
else
    mkdir -p "$(dirname "$LOG_FILE")" "$(dirname "$PID_FILE")"
    say "starting dockerd --bridge=none --iptables=false --ip-masq=false (log: $LOG_FILE)"
    # Own session (setsid): a Ctrl-C or the end of the calling terminal/test session does not
    # reach the daemon. Our own pidfile: dockerd keeps its default /var/run/docker.pid.
    setsid nohup dockerd --bridge=none --iptables=false --ip-masq=false \
        --host "unix://$SOCKET" >>"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
fi

deadline=$((SECONDS + WAIT_SECONDS))
until engine_answers; do
    if [ -f "$PID_FILE" ] && ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        tail -n 20 "$LOG_FILE" >&2 || true
        die "dockerd exited during startup; see $LOG_FILE"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        tail -n 20 "$LOG_FILE" >&2 || true
        die "dockerd did not answer on $SOCKET within ${WAIT_SECONDS} s; see $LOG_FILE"
    fi
    sleep 0.5
done
say "engine up (server $(docker -H "unix://$SOCKET" version --format '{{.Server.Version}}'), pid $(cat "$PID_FILE"))"
