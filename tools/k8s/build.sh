#!/usr/bin/env bash
# Build the pinned Kubernetes control plane, node and etcd from the Go module proxy, into a cache
# outside the clone keyed by version. Idempotent: a binary already in the cache is not rebuilt.
#
#   tools/k8s/build.sh              the control plane (kube-apiserver kube-controller-manager
#                                   kube-scheduler kubectl etcd) and the node (kubelet kube-proxy
#                                   coredns pause)
#   tools/k8s/build.sh kubelet      only the named binaries (any of the above)
#   tools/k8s/build.sh --bin-dir    print the cache's bin directory and exit
#   tools/k8s/build.sh --version    print the pinned Kubernetes version and exit
#   tools/k8s/build.sh --paths      print the versions and the binaries' paths as JSON and exit
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
coredns_version=$(pin "$here/coredns/go.mod" github.com/coredns/coredns)
[[ $version =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || die "no pinned k8s.io/kubernetes release in $here/go.mod (got '$version')"
major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
[[ -n $etcd_version ]] || die "no pinned go.etcd.io/etcd/server/v3 in $here/etcd/go.mod"
[[ -n $coredns_version ]] || die "no pinned github.com/coredns/coredns in $here/coredns/go.mod"

cache=${TTG_K8S_CACHE:-/var/cache/ttg-k8s}
niceness=${TTG_K8S_NICE:-15} jobs=${TTG_K8S_JOBS:-1}
bin="$cache/$version/bin"

declare -A pkg=(
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
  [kubelet]=k8s.io/kubernetes/cmd/kubelet
  [kube-proxy]=k8s.io/kubernetes/cmd/kube-proxy
  [etcd]=go.etcd.io/etcd/server/v3
  [coredns]=ttg.local/tools/k8s/coredns
  [pause]=ttg.local/tools/k8s/pause
)
# The binaries built from a module of their own (tools/k8s/<name>/go.mod), cached under
# <name>-<version> so that a new pin of one rebuilds that one only.
declare -A own=([etcd]=$etcd_version [coredns]=$coredns_version [pause]=$version)
targets=()
for arg in "$@"; do
  case $arg in
    --bin-dir) echo "$bin"; exit 0 ;;
    --version) echo "$version"; exit 0 ;;
    --paths)
      printf '{"version": "%s", "etcd_version": "%s", "coredns_version": "%s", "bin_dir": "%s", "etcd": "%s", "coredns": "%s", "pause": "%s"}\n' \
        "$version" "$etcd_version" "$coredns_version" "$bin" "$bin/etcd-$etcd_version" "$bin/coredns-$coredns_version" "$bin/pause-$version"
      exit 0 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) [[ -n ${pkg[$arg]:-} ]] || die "unknown binary '$arg' (one of: ${!pkg[*]})"; targets+=("$arg") ;;
  esac
done
((${#targets[@]})) || targets=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kubelet kube-proxy coredns pause)

file() { if [[ -n ${own[$1]:-} ]]; then echo "$bin/$1-${own[$1]}"; else echo "$bin/$1"; fi; }
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

kube=() others=()
for t in "${missing[@]}"; do
  [[ -x $(file "$t") ]] && continue # built by whoever held the lock before us
  if [[ -n ${own[$t]:-} ]]; then others+=("$t"); else kube+=("$t"); fi
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
for t in "${others[@]}"; do
  echo "build.sh: building $t ${own[$t]} into $bin"
  (cd "$here/$t" && nice -n "$niceness" go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$tmp/$t" "${pkg[$t]}")
  mv "$tmp/$t" "$tmp/$t-${own[$t]}"
done
for f in "$tmp"/*; do mv -f "$f" "$bin/"; done # each binary appears whole or not at all
echo "build.sh: built ${missing[*]} in $((SECONDS - started)) s"
