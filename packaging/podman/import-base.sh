#!/bin/sh
# Makes a Debian 12 base image for building flowcoach's image on a machine that cannot pull
# from a registry: debootstraps a minimal rootfs (with ca-certificates, so that the
# Containerfile's runtime stage needs no network) and imports it into Podman.
#
#     packaging/podman/import-base.sh [IMAGE]      # default localhost/bookworm-base
#
# Then: podman build --format docker --build-arg BINARIES=prebuilt \
#           --build-arg RUNTIME_BASE=localhost/bookworm-base -t flowcoach .
#
# Does nothing when the image exists. The rootfs is kept in target/podman/rootfs (override
# with ROOTFS=); the Debian mirror is the first one in /etc/apt (override with MIRROR=).
# Needs root, debootstrap and podman. Takes about a minute.
set -eu

image=${1:-localhost/bookworm-base}
cd "$(dirname "$0")/../.."
rootfs=${ROOTFS:-target/podman/rootfs}

if podman image exists "$image"; then
    echo "import-base: $image exists"
    exit 0
fi

if [ ! -e "$rootfs/.flowcoach-rootfs-complete" ]; then
    if [ -z "${MIRROR:-}" ]; then
        MIRROR=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)[[:space:]]*$/\1/p' \
            /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    fi
    if [ -z "${MIRROR:-}" ]; then
        MIRROR=$(sed -n 's/^deb[[:space:]]\{1,\}\([^[:space:]]*\/debian\)[[:space:]]\{1,\}bookworm[[:space:]].*/\1/p' \
            /etc/apt/sources.list 2>/dev/null | head -n 1)
    fi
    if [ -z "${MIRROR:-}" ]; then
        echo "import-base: no Debian mirror for bookworm in /etc/apt/sources.list or" \
            "/etc/apt/sources.list.d/*.sources: configure APT, or set MIRROR=" >&2
        exit 1
    fi
    echo "import-base: debootstrap bookworm (minbase) from $MIRROR into $rootfs"
    rm -rf "$rootfs.partial"
    mkdir -p "$(dirname "$rootfs")"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs.partial" "$MIRROR"
    touch "$rootfs.partial/.flowcoach-rootfs-complete"
    rm -rf "$rootfs"
    mv "$rootfs.partial" "$rootfs"
fi

echo "import-base: importing $rootfs as $image"
# Leave out debootstrap's downloaded packages and the marker.
tar -C "$rootfs" --numeric-owner \
    --exclude='./var/cache/apt/archives/*.deb' \
    --exclude='./.flowcoach-rootfs-complete' \
    -c . | podman import --change 'CMD ["/bin/bash"]' - "$image"
