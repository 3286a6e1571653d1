// Command upstream-server is apiserver-network-proxy's proxy-server, built
// from the published module's cmd/server/app package (its go.mod has
// replace directives, so it cannot be installed directly). Flags are
// upstream's, klog's included.
package main

import (
	"os"

	"sigs.k8s.io/apiserver-network-proxy/cmd/server/app"
	"sigs.k8s.io/apiserver-network-proxy/cmd/server/app/options"

	"proxyctl.test/go-peers/internal/klogflags"
)

func main() {
	opts := options.NewProxyRunOptions()
	cmd := app.NewProxyCommand(&app.Proxy{}, opts)
	cmd.Flags().AddFlagSet(opts.Flags())
	klogflags.Add(cmd.Flags())
	if err := cmd.Execute(); err != nil {
		os.Stderr.WriteString("upstream-server: " + err.Error() + "\n")
		os.Exit(1)
	}
}
