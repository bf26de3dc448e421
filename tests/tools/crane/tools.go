//go:build tools

// Pins crane's package in go.mod so `go build -mod=readonly` finds it.
package tools

import _ "github.com/google/go-containerregistry/cmd/crane"
