#!/bin/sh
# Debootstrap a minimal Debian 12 (bookworm) root filesystem for servekit's base image.
#
#   build-rootfs.sh DEST [MIRROR]
#
# DEST must not exist or be empty. MIRROR defaults to $SERVEKIT_DEBIAN_MIRROR, then
# http://deb.debian.org/debian. Extra packages come from packages.txt beside this script.
# The result is cleaned (no apt lists, caches, logs, host identity) and ready to be
# imported with `tar -C DEST -c . | docker import - IMAGE`.
set -eu

DEST=${1:?usage: build-rootfs.sh DEST [MIRROR]}
MIRROR=${2:-${SERVEKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}}
SUITE=bookworm
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then
    echo "build-rootfs.sh: debootstrap needs root" >&2
    exit 1
fi

INCLUDE=$(grep -v '^[[:space:]]*#' "$HERE/packages.txt" | tr -s '[:space:]' '\n' | grep -v '^$' | paste -sd, -)

debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$DEST" "$MIRROR"

# Package sources as on a fresh install: the release, its updates and, when the
# default mirror is used, the security archive.
{
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    if [ "$MIRROR" = "http://deb.debian.org/debian" ]; then
        echo "deb http://deb.debian.org/debian-security $SUITE-security main"
    fi
} > "$DEST/etc/apt/sources.list"

# Keep images small: no documentation or man pages from later package installs
# (copyright files stay).
cat > "$DEST/etc/dpkg/dpkg.cfg.d/01-servekit-nodoc" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
find "$DEST/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$DEST/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$DEST/usr/share/man/"* "$DEST/usr/share/info/"*

# Clean: package caches and lists, logs, temporary files and the build host's identity
# (the container runtime provides hostname, hosts and resolv.conf).
chroot "$DEST" apt-get clean
rm -rf "$DEST/var/lib/apt/lists/"* "$DEST/var/cache/apt/"*.bin \
    "$DEST/var/cache/debconf/"*-old "$DEST/var/lib/dpkg/"*-old \
    "$DEST/tmp/"* "$DEST/var/tmp/"* "$DEST/root/.bash_history"
find "$DEST/var/log" -type f -delete
rm -f "$DEST/etc/hostname" "$DEST/etc/resolv.conf"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$DEST/etc/hosts"
if [ -e "$DEST/etc/machine-id" ]; then
    : > "$DEST/etc/machine-id"
fi
