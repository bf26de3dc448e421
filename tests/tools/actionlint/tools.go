//go:build tools

// Pins actionlint's command in go.mod so `go build -mod=readonly` finds it.
package tools

import _ "github.com/rhysd/actionlint/cmd/actionlint"
