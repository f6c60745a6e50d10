#!/usr/bin/env bash
# Makes a Debian bookworm base image (minbase + python3, python3-venv, ca-certificates) with debootstrap
# and `docker import`, for building the OAML image where no container registry can be reached
# (`make docker-test`). Cached: an existing image of that name is kept.
#   usage: deploy/docker-base.sh [IMAGE]      (default oaml-base:bookworm; DOCKER=/path/to/docker)
set -euo pipefail
image="${1:-oaml-base:bookworm}"
docker="${DOCKER:-docker}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages="${BASE_PACKAGES:-python3,python3-venv,ca-certificates}"

if "$docker" image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image: cached"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
root="$(mktemp -d /var/tmp/oaml-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "base image $image: debootstrap bookworm ($packages) from $mirror"
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# nothing the image needs: apt's downloaded packages and lists, docs
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base image $image: made ($("$docker" image inspect -f '{{.Size}}' "$image") bytes)"
