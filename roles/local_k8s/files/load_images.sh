#!/usr/bin/env bash
# Load Docker images into the local node's containerd (CRI namespace k8s.io), each only if that
# name is absent there: the project's images are tagged by their content, so a name present is
# the image wanted. Prints "loaded <image>" for each one loaded (Ansible's changed_when).
#   load_images.sh CONTAINERD_SOCKET IMAGE...
set -euo pipefail
socket=$1; shift
# the name containerd gives an image reference, as Docker's normalization does
normalized() {
  case $1 in
    */*) first=${1%%/*}
         case $first in *.*|*:*|localhost) echo "$1" ;; *) echo "docker.io/$1" ;; esac ;;
    *) echo "docker.io/library/$1" ;;
  esac
}
present=$(ctr --address "$socket" --namespace k8s.io images ls --quiet)
for image in "$@"; do
  if grep -qxF "$(normalized "$image")" <<<"$present"; then continue; fi
  docker image inspect "$image" >/dev/null || { echo "load_images.sh: no Docker image $image to load" >&2; exit 1; }
  docker save "$image" | ctr --address "$socket" --namespace k8s.io images import - >/dev/null
  echo "loaded $image"
done
