// Command kiln-init is the guest's PID 1; its logic is package pid1.
package main

import "github.com/kiln-dev/kiln/internal/guest/pid1"

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// main never returns: PID 1 powers the VM off when its work is done.
func main() { pid1.Boot(version) }
