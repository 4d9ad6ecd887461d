#!/usr/bin/env bash
# Makes the local base image localhost/debian-base:bookworm (Debian 12 minbase) without a registry:
# debootstrap from Debian's mirror, then `podman import`. The rootfs tarball is cached, so a
# machine builds it once. Usage: docker/build-base.sh [IMAGE]   (needs root, debootstrap, podman)
set -euo pipefail
IMAGE=${1:-localhost/debian-base:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${THINKINGVIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/thinkingvit-serve}
TARBALL="$CACHE/debian-$SUITE-minbase.tar"

if podman image exists "$IMAGE"; then
    echo "base image $IMAGE exists"
    exit 0
fi
if [ ! -s "$TARBALL" ]; then
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$TARBALL.part"' EXIT
    echo "debootstrap $SUITE into $rootfs"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
    # Lean, like the official slim images: no apt lists or caches in the layer.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" --numeric-owner -cf "$TARBALL.part" .
    mv "$TARBALL.part" "$TARBALL"
fi
echo "importing $TARBALL as $IMAGE"
podman import --change 'CMD ["/bin/bash"]' "$TARBALL" "$IMAGE" >/dev/null
