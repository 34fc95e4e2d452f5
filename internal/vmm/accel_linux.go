package vmm

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// KVM ioctls (linux/kvm.h).
const (
	kvmGetAPIVersion = 0xAE00
	kvmCreateVM      = 0xAE01
	kvmAPIVersion    = 12
)

// tcgHint tells the user what running without KVM means and how to fix it.
const tcgHint = "using TCG emulation (10-15x slower); load kvm modules or run on a KVM-capable host"

// DetectAccel returns KVM when /dev/kvm can create a VM, else TCG with a
// one-line reason for the user.
func DetectAccel() (Accel, string) {
	if runtime.GOARCH != "amd64" {
		// KVM runs guests of the host's own architecture; kiln's guests
		// are x86_64.
		return TCG, "host is " + runtime.GOARCH + ", guests are x86_64: using TCG emulation (10-15x slower)"
	}
	return detectAccel("/dev/kvm")
}

func detectAccel(dev string) (Accel, string) {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if err == unix.ENOENT {
			return TCG, "no " + dev + ": " + tcgHint
		}
		return TCG, fmt.Sprintf("cannot open %s (%v): %s", dev, err, tcgHint)
	}
	defer unix.Close(fd)
	v, err := unix.IoctlRetInt(fd, kvmGetAPIVersion)
	if err != nil {
		return TCG, fmt.Sprintf("%s: KVM_GET_API_VERSION failed (%v): %s", dev, err, tcgHint)
	}
	if v != kvmAPIVersion {
		return TCG, fmt.Sprintf("%s: KVM API version %d, want %d: %s", dev, v, kvmAPIVersion, tcgHint)
	}
	vm, err := unix.IoctlRetInt(fd, kvmCreateVM)
	if err != nil {
		return TCG, fmt.Sprintf("%s: KVM_CREATE_VM failed (%v): %s", dev, err, tcgHint)
	}
	unix.Close(vm)
	return KVM, ""
}
