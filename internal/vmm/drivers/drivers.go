// Package drivers links every VMM driver into the binary; importing it is how a program gets them, by name, through vmm.Lookup.
//
// Adding a driver means adding its import here: no caller changes.
package drivers

import (
	// QEMU (KVM or TCG): the default driver.
	_ "github.com/kiln-dev/kiln/internal/vmm/qemu"
)
