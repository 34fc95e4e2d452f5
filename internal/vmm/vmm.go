// Package vmm defines the driver interface kiln uses to run a microVM, the registry of drivers, and detects the available CPU accelerator.
package vmm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"regexp"
)

// Accel is a CPU accelerator for the VMM.
type Accel string

// Accelerators.
const (
	KVM Accel = "kvm"
	TCG Accel = "tcg"
)

// ErrClosed is wrapped by Machine.Wait's error when the VMM was stopped by
// Close rather than by the guest.
var ErrClosed = errors.New("machine closed")

// Disk is a byte range of a host file attached to the guest as a virtio block
// device.
type Disk struct {
	Path     string
	Offset   int64 // start of the range in Path
	Size     int64 // length of the range, a multiple of 512; 0 means to the end of Path
	ReadOnly bool
}

// Share is a host directory presented to the guest as a virtio-9p device
// with a mount tag; the guest mounts it (or not) by that tag.
type Share struct {
	Tag      string
	Path     string // an existing directory
	ReadOnly bool   // the VMM refuses every write
}

// Machine types a driver builds (Config.Machine).
const (
	// MachineQ35 is a PC (QEMU's q35): PCI devices, SeaBIOS, ACPI. Any
	// kernel boots on it, Debian's cloud kernel included.
	MachineQ35 = "q35"
	// MachineMicrovm is a minimal machine (QEMU's microvm): no PCI, the
	// devices on virtio-mmio, qboot firmware, a small ACPI table set for
	// power-off. Its kernel needs virtio-mmio and ACPI built in (kiln's
	// own kernel has them) and boots fastest through its PVH entry.
	MachineMicrovm = "microvm"
)

// Machines lists the machine types, the default first.
var Machines = []string{MachineQ35, MachineMicrovm}

// ErrCPUModel is wrapped by Machine.Start's error when the VMM refused the
// CPU model it chose itself (Config.CPU ""): the caller may retry with
// FallbackCPU.
var ErrCPUModel = errors.New("the VMM cannot use its default CPU model here")

// FallbackCPU is the named CPU model for KVM hosts where "host" does not
// work.
const FallbackCPU = "kvm64"

// Config describes a machine.
type Config struct {
	Kernel, Initrd, Cmdline string
	MemoryMiB, VCPUs        int
	// Machine is the machine type: MachineQ35 ("" too) or MachineMicrovm.
	// It is part of the device fingerprint, so a snapshot of one machine
	// type is never restored on another.
	Machine string
	// Binary is the VMM program, a path or a name looked up on PATH; ""
	// is the driver's default.
	Binary string
	Accel  Accel  // "" = DetectAccel()
	CPU    string // "" = "host" under KVM (see ErrCPUModel), "max" under TCG
	Disks  []Disk // the first is /dev/vda
	// Ports names the virtio-serial ports, e.g. {"kiln.ctl","kiln.agent"};
	// their host ends are returned by Machine.Port(name).
	Ports []string
	// Shares are host directories as virtio-9p devices. Their paths and
	// read-only flags are host-side facts, left out of the fingerprint:
	// a snapshot taken with empty shares restores with others.
	Shares []Share
	// RAMFile, when set, backs guest RAM with this file (needed for
	// snapshots). RAMShared maps it shared (snapshot source: guest writes
	// land in the file); otherwise it is a private copy-on-write mapping
	// (restore: the file is never modified).
	RAMFile   string
	RAMShared bool
	// Incoming starts the machine waiting for Machine.LoadState.
	Incoming bool
	Log      *slog.Logger // nil discards
}

// Limits checked by Validate.
const (
	MinMemoryMiB = 32
	MaxMemoryMiB = 1 << 20
	MaxVCPUs     = 64
	MaxDisks     = 16
	MaxPorts     = 30 // virtio-serial-pci has 31 ports by default; port 0 is reserved for consoles
	MaxShares    = 8
)

var portNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Validate checks the configuration, including that the kernel, initrd and
// disk files exist and that every disk range lies inside its file.
func (c *Config) Validate() error {
	if c.Kernel == "" {
		return errors.New("invalid machine config: no kernel")
	}
	if err := checkFile("kernel", c.Kernel); err != nil {
		return err
	}
	if c.Initrd != "" {
		if err := checkFile("initrd", c.Initrd); err != nil {
			return err
		}
	}
	if c.MemoryMiB < MinMemoryMiB || c.MemoryMiB > MaxMemoryMiB {
		return fmt.Errorf("invalid machine config: memory %d MiB out of range [%d, %d]", c.MemoryMiB, MinMemoryMiB, MaxMemoryMiB)
	}
	if c.VCPUs < 1 || c.VCPUs > MaxVCPUs {
		return fmt.Errorf("invalid machine config: %d vCPUs out of range [1, %d]", c.VCPUs, MaxVCPUs)
	}
	switch c.Machine {
	case "", MachineQ35, MachineMicrovm:
	default:
		return fmt.Errorf("invalid machine config: unknown machine type %q (want %q or %q)", c.Machine, MachineQ35, MachineMicrovm)
	}
	switch c.Accel {
	case "", KVM, TCG:
	default:
		return fmt.Errorf("invalid machine config: unknown accelerator %q (want %q or %q)", c.Accel, KVM, TCG)
	}
	if !cpuRE.MatchString(c.CPU) {
		return fmt.Errorf("invalid machine config: bad CPU model %q", c.CPU)
	}
	if len(c.Disks) > MaxDisks {
		return fmt.Errorf("invalid machine config: %d disks, at most %d", len(c.Disks), MaxDisks)
	}
	for i, d := range c.Disks {
		if d.Path == "" {
			return fmt.Errorf("invalid machine config: disk %d has no path", i)
		}
		if d.Offset < 0 || d.Size < 0 {
			return fmt.Errorf("invalid machine config: disk %d (%s): negative offset or size", i, d.Path)
		}
		if d.Size%512 != 0 {
			return fmt.Errorf("invalid machine config: disk %d (%s): size %d is not a multiple of 512 (QEMU's raw driver needs whole sectors; pad the range)", i, d.Path, d.Size)
		}
		fi, err := os.Stat(d.Path)
		if err != nil {
			return fmt.Errorf("invalid machine config: disk %d: %w", i, err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("invalid machine config: disk %d (%s) is not a regular file", i, d.Path)
		}
		end := d.Offset + d.Size
		if d.Size == 0 {
			end = fi.Size()
		}
		if d.Offset > fi.Size() || end > fi.Size() || end < d.Offset {
			return fmt.Errorf("invalid machine config: disk %d (%s): range [%d, %d) exceeds file size %d", i, d.Path, d.Offset, end, fi.Size())
		}
		if end == d.Offset {
			return fmt.Errorf("invalid machine config: disk %d (%s): empty range", i, d.Path)
		}
	}
	if len(c.Ports) > MaxPorts {
		return fmt.Errorf("invalid machine config: %d ports, at most %d", len(c.Ports), MaxPorts)
	}
	seen := make(map[string]bool, len(c.Ports))
	for _, p := range c.Ports {
		if !portNameRE.MatchString(p) {
			return fmt.Errorf("invalid machine config: bad port name %q (want letters, digits, '.', '_', '-', at most 63)", p)
		}
		if seen[p] {
			return fmt.Errorf("invalid machine config: duplicate port name %q", p)
		}
		seen[p] = true
	}
	if len(c.Shares) > MaxShares {
		return fmt.Errorf("invalid machine config: %d shares, at most %d", len(c.Shares), MaxShares)
	}
	tags := make(map[string]bool, len(c.Shares))
	for _, sh := range c.Shares {
		if !tagRE.MatchString(sh.Tag) {
			return fmt.Errorf("invalid machine config: bad share tag %q (want letters, digits, '_', '-', at most 31)", sh.Tag)
		}
		if tags[sh.Tag] {
			return fmt.Errorf("invalid machine config: duplicate share tag %q", sh.Tag)
		}
		tags[sh.Tag] = true
		fi, err := os.Stat(sh.Path)
		if err != nil {
			return fmt.Errorf("invalid machine config: share %s: %w", sh.Tag, err)
		}
		if !fi.IsDir() {
			return fmt.Errorf("invalid machine config: share %s: %s is not a directory", sh.Tag, sh.Path)
		}
	}
	if c.RAMFile == "" && c.RAMShared {
		return errors.New("invalid machine config: RAMShared without RAMFile")
	}
	return nil
}

var tagRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,31}$`)

var cpuRE = regexp.MustCompile(`^([A-Za-z0-9][A-Za-z0-9._-]*)?$`)

func checkFile(what, path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("invalid machine config: %s: %w", what, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("invalid machine config: %s %s is not a regular file", what, path)
	}
	return nil
}

// Machine is a running (or startable) microVM.
type Machine interface {
	// Start launches the VMM and returns once its control channel is
	// ready. ctx bounds only the start-up.
	Start(ctx context.Context) error
	// Port returns the host end of the named virtio-serial port (valid
	// after Start), or nil for an unknown name.
	Port(name string) net.Conn
	// Wait blocks until the VMM exits and returns nil for a clean guest
	// power-off, else an error describing the exit.
	Wait() error
	// Done is closed when the VMM process has exited.
	Done() <-chan struct{}
	// Close kills the VMM if it runs and releases every resource. It is
	// idempotent and safe to call concurrently with Wait.
	Close() error
	// SaveState writes the device state to path (atomically) and leaves the
	// VM paused. Guest RAM is not included when it lives in a shared
	// Config.RAMFile.
	SaveState(ctx context.Context, path string) error
	// LoadState restores device state saved by SaveState into a machine
	// started with Config.Incoming and waits until the guest runs.
	LoadState(ctx context.Context, path string) error
	// Console returns the last 64 KiB of the serial console.
	Console() []byte
	// Pid returns the VMM's process id, or 0 before Start.
	Pid() int
	// Accel returns the accelerator the machine uses.
	Accel() Accel
	// Version returns the VMM's version ("qemu 7.2.19"): a snapshot made
	// by one version is never restored by another.
	Version(ctx context.Context) (string, error)
	// Fingerprint returns a digest of the virtual hardware the machine
	// presents to the guest (machine type, CPU model, devices, kernel
	// command line), derived from what the driver actually builds and
	// independent of host paths and of whether the machine boots, restores
	// or is a snapshot source. Snapshots are keyed by it, so a snapshot of
	// one machine type is never restored on another.
	Fingerprint() string
}
