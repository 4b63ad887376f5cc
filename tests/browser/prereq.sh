#!/bin/sh
# Decides, for `make test`, whether the browser tests (tests/browser.rs) can run here. As root it
# installs what they need through apt (Chromium, iproute2 for `ip netns`) and checks that a
# network namespace can be made. Exit 0: run them. Exit 1: skip them; then it has printed one
# loud line saying why and how to run them.
set -u

skip() {
    echo "*** SKIPPING the browser tests (tests/browser.rs): $1. To run them: $2 ***"
    exit 1
}

if [ "${TUNNEL_SKIP_BROWSER:-}" = 1 ]; then
    skip "TUNNEL_SKIP_BROWSER=1 is set" "unset it"
fi
if [ "$(id -u)" != 0 ]; then
    skip "not root (they need a network namespace, and make test installs Chromium with apt)" \
        "sudo make test, or as root: apt-get install chromium iproute2"
fi

need=""
[ -x /usr/bin/chromium ] || need="$need chromium"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
if [ -n "$need" ]; then
    echo "installing for the browser tests:$need"
    if ! command -v apt-get >/dev/null 2>&1; then
        skip "no apt-get to install$need" "install$need (Chromium as /usr/bin/chromium), then make test"
    fi
    apt-get update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null ||
        skip "apt-get install$need failed" "apt-get install$need, then make test"
    [ -x /usr/bin/chromium ] ||
        skip "apt installed no /usr/bin/chromium" "install Chromium as /usr/bin/chromium"
fi

probe="tnl-probe-$$"
if ! ip netns add "$probe" 2>/dev/null; then
    skip "cannot create a network namespace (ip netns add: no CAP_SYS_ADMIN, e.g. an unprivileged container)" \
        "make test as root on a machine or a privileged container"
fi
ip netns del "$probe"
exit 0
