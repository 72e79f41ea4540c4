// Command pause holds a pod's namespaces for as long as the pod lives, as Kubernetes' own
// build/pause/linux/pause.c does: it exits on SIGINT or SIGTERM and reaps any orphaned child.
// Built by ../build.sh (static, no dependencies) into the local cluster's sandbox image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for { // reap every child that has exited
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
