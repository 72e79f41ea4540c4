// Command coredns is the local cluster's DNS: CoreDNS (pinned in go.mod) with only the plugins
// a cluster without upstream DNS needs. Built by ../build.sh; the Corefile is written by the
// local_k8s role.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugins in the order CoreDNS runs them (a subset of its own plugin.cfg order).
func init() {
	dnsserver.Directives = []string{"bind", "errors", "health", "ready", "cache", "kubernetes"}
}

func main() { coremain.Run() }
