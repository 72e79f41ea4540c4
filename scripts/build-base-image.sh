#!/usr/bin/env bash
# Make a local Python base image for the worker image where no registry image can be pulled
# (CI, air-gapped machines): a minimal Debian bookworm root with python3, imported into Docker.
#
#   scripts/build-base-image.sh                 # -> ttg-base:bookworm-py311 (skipped if present)
#   scripts/build-base-image.sh --force         # rebuild even if the image exists
#   docker build --build-arg BASE_IMAGE=ttg-base:bookworm-py311 -t ttg-worker:dev worker/
#
# Needs root, debootstrap and a running Docker daemon. The root filesystem is cached as a
# tarball (TTG_BASE_CACHE, default .cache/base-image/) so a fresh Docker data root re-imports
# it in seconds instead of running debootstrap again (~35 s).
set -euo pipefail

IMAGE="${TTG_BASE_IMAGE:-ttg-base:bookworm-py311}"
SUITE="${TTG_BASE_SUITE:-bookworm}"
# The Debian mirror this machine's apt already uses (deb822 or one-line sources).
apt_mirror() {
  awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null ||
    true
  awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true
}
MIRROR="${TTG_BASE_MIRROR:-$(apt_mirror | head -1)}"
CACHE="${TTG_BASE_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache/base-image}"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

die() { echo "build-base-image: $*" >&2; exit 1; }
[[ -n "$MIRROR" ]] || die "no Debian mirror in this machine's apt sources: set TTG_BASE_MIRROR"
command -v docker >/dev/null || die "docker not found (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker daemon reachable (start dockerd first)"

if [[ $FORCE -eq 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build-base-image: $IMAGE already present"
  exit 0
fi

tarball="$CACHE/$SUITE-rootfs.tar"
if [[ $FORCE -eq 1 || ! -s "$tarball" ]]; then
  [[ $EUID -eq 0 ]] || die "debootstrap needs root"
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  mkdir -p "$CACHE"
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  echo "build-base-image: debootstrap $SUITE into $root"
  # python3 only: the worker image's build stage makes a venv with --without-pip and installs
  # from wheels with pip run from its own wheel, so no pip or compiler is ever in the image.
  debootstrap --variant=minbase --include=python3 "$SUITE" "$root" "$MIRROR" >/dev/null
  # Trim what a container never reads: docs, man pages, locales, apt caches and lists.
  rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/debconf/*-old "$root"/var/log/*.log "$root"/var/log/apt/*
  find "$root"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi

docker import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$IMAGE" >/dev/null
echo "build-base-image: $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
