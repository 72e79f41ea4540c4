// The local cluster's pause (sandbox) binary, built by ../build.sh. No dependencies.
module ttg.local/tools/k8s/pause

go 1.25.0
