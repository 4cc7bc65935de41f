#!/usr/bin/env bash
# Make sure Debian's Chromium is installed at /usr/bin/chromium (the browser tests drive it with
# Playwright; Playwright's own browser download is not used).
#
# Idempotent: does nothing when /usr/bin/chromium is already there. Otherwise installs the
# `chromium` package and a font package (without fonts, screenshots show boxes instead of text)
# non-interactively, running `apt-get update` first only if the install fails. Fails loudly, with
# what to do, when it cannot install: the browser tests must not silently skip.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "chromium: $CHROMIUM ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-chromium: $CHROMIUM is missing and this is not root; install it with" >&2
    echo "  sudo apt-get install -y chromium fonts-liberation" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y --no-install-recommends chromium fonts-liberation; }
if ! install; then
    apt-get update
    install
fi

if [ ! -x "$CHROMIUM" ]; then
    echo "ensure-chromium: $CHROMIUM is still missing after installing the chromium package" >&2
    exit 1
fi
echo "chromium: $CHROMIUM ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
