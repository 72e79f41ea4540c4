#!/usr/bin/env bash
# Build the pinned Kubernetes control plane and etcd from the Go module proxy, into a cache
# outside the clone keyed by version. Idempotent: a binary already in the cache is not rebuilt.
#
#   tools/k8s/build.sh              kube-apiserver kube-controller-manager kube-scheduler kubectl etcd
#   tools/k8s/build.sh kubelet      only the named binaries (any of the above, or kubelet)
#   tools/k8s/build.sh --bin-dir    print the cache's bin directory and exit
#   tools/k8s/build.sh --version    print the pinned Kubernetes version and exit
#   tools/k8s/build.sh --paths      print {"version", "etcd_version", "bin_dir", "etcd"} as JSON and exit
#
# Environment: TTG_K8S_CACHE (default /var/cache/ttg-k8s) holds <version>/bin/ and go/{mod,build};
# TTG_K8S_NICE (default 15) and TTG_K8S_JOBS (go build -p, default 1) share a busy machine.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "build.sh: $*" >&2; exit 1; }

pin() { # pin <go.mod> <module path>: the version that go.mod requires
  awk -v m="$2" '($1 == m && $2 ~ /^v/) { print $2; exit } ($1 == "require" && $2 == m) { print $3; exit }' "$1"
}
version=$(pin "$here/go.mod" k8s.io/kubernetes)
etcd_version=$(pin "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)
[[ $version =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || die "no pinned k8s.io/kubernetes release in $here/go.mod (got '$version')"
major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
[[ -n $etcd_version ]] || die "no pinned go.etcd.io/etcd/server/v3 in $here/etcd/go.mod"

cache=${TTG_K8S_CACHE:-/var/cache/ttg-k8s}
niceness=${TTG_K8S_NICE:-15} jobs=${TTG_K8S_JOBS:-1}
bin="$cache/$version/bin"

declare -A pkg=(
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
  [kubelet]=k8s.io/kubernetes/cmd/kubelet
  [etcd]=go.etcd.io/etcd/server/v3
)
targets=()
for arg in "$@"; do
  case $arg in
    --bin-dir) echo "$bin"; exit 0 ;;
    --version) echo "$version"; exit 0 ;;
    --paths)
      printf '{"version": "%s", "etcd_version": "%s", "bin_dir": "%s", "etcd": "%s"}\n' \
        "$version" "$etcd_version" "$bin" "$bin/etcd-$etcd_version"
      exit 0 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) [[ -n ${pkg[$arg]:-} ]] || die "unknown binary '$arg' (one of: ${!pkg[*]})"; targets+=("$arg") ;;
  esac
done
((${#targets[@]})) || targets=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)

# etcd's version is part of its file's key: a new etcd pin rebuilds etcd, nothing else.
file() { if [[ $1 == etcd ]]; then echo "$bin/etcd-$etcd_version"; else echo "$bin/$1"; fi; }
missing=()
for t in "${targets[@]}"; do [[ -x $(file "$t") ]] || missing+=("$t"); done
if ((${#missing[@]} == 0)); then
  echo "build.sh: cached in $bin: ${targets[*]}"
  exit 0
fi

command -v go >/dev/null || die "go is not installed: cannot build ${missing[*]} (install a Go toolchain >= 1.25)"
mkdir -p "$bin" "$cache/go"
exec 9>"$cache/.build.lock"
flock 9 # one build at a time (CI, a test fixture and a person may start it together)

export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" CGO_ENABLED=0 GOFLAGS=-mod=readonly
tmp=$(mktemp -d "$bin/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

kube=() etcd=()
for t in "${missing[@]}"; do
  [[ -x $(file "$t") ]] && continue # built by whoever held the lock before us
  if [[ $t == etcd ]]; then etcd+=("$t"); else kube+=("$t"); fi
done

started=$SECONDS
if ((${#kube[@]})); then
  # The variables Kubernetes' own build sets (hack/lib/version.sh), for both version packages,
  # so that `kubectl version` and /version report the pinned release. The build date is the
  # release's commit time from the module proxy, so a rebuild gives the same binary.
  date=$(cd "$here" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
  ldflags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$version -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=archive -X $p.buildDate=$date"
  done
  pkgs=()
  for t in "${kube[@]}"; do pkgs+=("${pkg[$t]}"); done
  echo "build.sh: building ${kube[*]} $version into $bin (slow the first time: minutes per binary)"
  (cd "$here" && nice -n "$niceness" go build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}")
fi
if ((${#etcd[@]})); then
  echo "build.sh: building etcd $etcd_version into $bin"
  (cd "$here/etcd" && nice -n "$niceness" go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$tmp/etcd" "${pkg[etcd]}")
  mv "$tmp/etcd" "$tmp/etcd-$etcd_version"
fi
for f in "$tmp"/*; do mv -f "$f" "$bin/"; done # each binary appears whole or not at all
echo "build.sh: built ${missing[*]} in $((SECONDS - started)) s"
