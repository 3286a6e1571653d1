//go:build tools

// Keeps h2spec in the module graph; install-deps.sh builds it with
// `go build github.com/summerwind/h2spec/cmd/h2spec`.
package tools

import _ "github.com/summerwind/h2spec/cmd/h2spec"
