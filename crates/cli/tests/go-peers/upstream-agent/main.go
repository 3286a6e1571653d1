// Command upstream-agent is apiserver-network-proxy's proxy-agent, built
// from the published module's cmd/agent/app package. Flags are upstream's,
// klog's included.
package main

import (
	"os"

	"sigs.k8s.io/apiserver-network-proxy/cmd/agent/app"
	"sigs.k8s.io/apiserver-network-proxy/cmd/agent/app/options"

	"proxyctl.test/go-peers/internal/klogflags"
)

func main() {
	opts := options.NewGrpcProxyAgentOptions()
	cmd := app.NewAgentCommand(&app.Agent{}, opts)
	cmd.Flags().AddFlagSet(opts.Flags())
	klogflags.Add(cmd.Flags())
	if err := cmd.Execute(); err != nil {
		os.Stderr.WriteString("upstream-agent: " + err.Error() + "\n")
		os.Exit(1)
	}
}
