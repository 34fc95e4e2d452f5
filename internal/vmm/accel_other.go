//go:build !linux

package vmm

// DetectAccel returns TCG: KVM exists only on Linux.
func DetectAccel() (Accel, string) {
	return TCG, "no KVM on this OS: using TCG emulation (10-15x slower); run on a KVM-capable Linux host"
}
