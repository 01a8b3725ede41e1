#!/bin/sh
# Make sure this machine has what the sandbox needs: debootstrap and ssh (to build and
# reach sandbox hosts) and a Docker engine that answers; install and start them if needed.
# Also promtool (Debian's prometheus package, pinned), which checks and unit-tests the
# monitoring role's alert rules; the Prometheus server of that package is not left running.
# And HAProxy (pinned, as the gateway role installs it), which the gateway's unit tests run.
# Usable before servekit's virtualenv exists (make, CI). Same logic as
# servekit.sandbox.engine.ensure_docker_engine:
#   - `docker info` works            -> nothing to do
#   - dockerd missing                -> apt-get install docker.io (Debian's package)
#   - systemd runs                   -> systemctl start docker
#   - otherwise                      -> dockerd in the background, log in $DOCKERD_LOG
# then wait (up to $TIMEOUT seconds) until the engine answers.
set -eu

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/servekit-dockerd.log}
# The version the monitoring role pins on Debian 12 (monitoring_prometheus_version).
PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-2.42.0+ds-5+deb12u1}
# The version the gateway role pins on Debian 12 (gateway_haproxy_version).
HAPROXY_VERSION=${HAPROXY_VERSION:-2.6.12-1+deb12u4}
TIMEOUT=${TIMEOUT:-60}

say() { echo "ensure-docker: $*"; }
die() { echo "ensure-docker: error: $*" >&2; exit 1; }

engine_ready() {
    if command -v docker >/dev/null 2>&1; then
        docker info >/dev/null 2>&1
    else
        # No CLI (yet): ask the socket directly.
        [ -S /var/run/docker.sock ] &&
            curl -fsS --unix-socket /var/run/docker.sock http://localhost/_ping >/dev/null 2>&1
    fi
}

missing=""
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
command -v ssh >/dev/null 2>&1 || missing="$missing openssh-client"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || die "missing:$missing; installing them needs root (run: sudo $0)"
    say "installing$missing…"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >/dev/null || die "apt-get update failed"
    # shellcheck disable=SC2086 # word splitting of the package list is wanted
    apt-get install -y $missing >/dev/null || die "apt-get install$missing failed"
fi

# install_pinned COMMAND PACKAGE VERSION WHY: install PACKAGE=VERSION (no recommends) when
# COMMAND is missing, then stop the service the package starts: only its binary is wanted.
install_pinned() {
    command -v "$1" >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] || die "$1 is missing; installing $2 needs root (run: sudo $0)"
    say "installing $2=$3 ($4)…"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >/dev/null || die "apt-get update failed"
    apt-get install -y --no-install-recommends "$2=$3" >/dev/null ||
        die "apt-get install $2=$3 failed"
    if [ -d /run/systemd/system ]; then
        systemctl disable --now "$2" >/dev/null 2>&1 || true
    else
        service "$2" stop >/dev/null 2>&1 || true
    fi
}

# No recommends for prometheus: they would add node_exporter, which nothing here needs.
install_pinned promtool prometheus "$PROMETHEUS_VERSION" "for promtool"
install_pinned haproxy haproxy "$HAPROXY_VERSION" "the gateway's tests run it"

if engine_ready; then
    exit 0
fi

case "${DOCKER_HOST:-}" in
    "" | unix://*) ;;
    *) die "DOCKER_HOST=$DOCKER_HOST does not answer (only a local engine is started)" ;;
esac

if [ "$(id -u)" != 0 ]; then
    die "the Docker engine is not running; installing or starting it needs root (run: sudo $0)"
fi

if ! command -v dockerd >/dev/null 2>&1; then
    say "installing Debian's docker.io…"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >/dev/null || die "apt-get update failed"
    apt-get install -y docker.io >/dev/null || die "apt-get install docker.io failed"
fi

if [ -d /run/systemd/system ]; then
    say "starting docker.service…"
    systemctl start docker || die "systemctl start docker failed (journalctl -u docker)"
elif [ -f /var/run/docker.pid ] && grep -q dockerd "/proc/$(cat /var/run/docker.pid)/cmdline" 2>/dev/null; then
    say "dockerd is starting (pid $(cat /var/run/docker.pid))…"
else
    say "starting dockerd (log: $DOCKERD_LOG)…"
    setsid dockerd >>"$DOCKERD_LOG" 2>&1 < /dev/null &
fi

waited=0
until engine_ready; do
    if [ "$waited" -ge "$((TIMEOUT * 2))" ]; then
        tail -n 20 "$DOCKERD_LOG" >&2 2>/dev/null || true
        die "the Docker engine did not answer within ${TIMEOUT}s (log: $DOCKERD_LOG)"
    fi
    sleep 0.5
    waited=$((waited + 1))
done
say "Docker engine ready"
