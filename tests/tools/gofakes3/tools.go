//go:build tools

// Wrapper module that builds gofakes3, an S3-compatible server the backup
// tests start on loopback as the object store nodes back up to and restore
// from (an S3 server over HTTP, not an in-process mock). MinIO is not used:
// it is under the AGPL.
package tools

import _ "github.com/johannesboyne/gofakes3/cmd/gofakes3"
