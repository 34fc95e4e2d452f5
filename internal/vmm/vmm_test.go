package vmm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestDetectAccel(t *testing.T) {
	accel, why := DetectAccel()
	if _, err := os.Stat("/dev/kvm"); err != nil {
		want := "no /dev/kvm: using TCG emulation (10-15x slower); load kvm modules or run on a KVM-capable host"
		if accel != TCG || why != want {
			t.Errorf("DetectAccel() = %q, %q; want %q, %q", accel, why, TCG, want)
		}
		return
	}
	switch {
	case accel == KVM && why != "":
		t.Errorf("DetectAccel() = %q, %q; want no reason with KVM", accel, why)
	case accel == TCG && !strings.Contains(why, "TCG"):
		t.Errorf("DetectAccel() = %q, %q; want a reason naming TCG", accel, why)
	case accel != KVM && accel != TCG:
		t.Errorf("DetectAccel() = %q, want kvm or tcg", accel)
	}
}

func TestDetectAccelNotKVM(t *testing.T) {
	for _, tc := range []struct{ dev, want string }{
		{"/nonexistent/kvm", "no /nonexistent/kvm: using TCG"},
		{"/dev/null", "/dev/null: KVM_GET_API_VERSION failed"},
	} {
		accel, why := detectAccel(tc.dev)
		if accel != TCG || !strings.HasPrefix(why, tc.want) {
			t.Errorf("detectAccel(%q) = %q, %q; want %q, %q…", tc.dev, accel, why, TCG, tc.want)
		}
	}
}

func TestValidate(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	disk := filepath.Join(dir, "disk,1.img")
	for _, f := range []struct {
		path string
		size int
	}{{kernel, 10}, {disk, 8192}} {
		if err := os.WriteFile(f.path, make([]byte, f.size), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ok := func() Config {
		return Config{Kernel: kernel, MemoryMiB: 256, VCPUs: 1, Ports: []string{"kiln.ctl", "kiln.agent"},
			Disks: []Disk{{Path: disk, Offset: 4096, Size: 4096, ReadOnly: true}}}
	}
	for _, tc := range []struct {
		name   string
		mod    func(*Config)
		errSub string // "" = valid
	}{
		{"ok", func(c *Config) {}, ""},
		{"ok-minimal", func(c *Config) { c.Ports = nil; c.Disks = nil }, ""},
		{"ok-disk-to-end", func(c *Config) { c.Disks[0].Size = 0 }, ""},
		{"ok-odd-offset", func(c *Config) { c.Disks[0].Offset = 3 }, ""},
		{"ok-ram", func(c *Config) { c.RAMFile = filepath.Join(dir, "ram"); c.RAMShared = true }, ""},
		{"ok-incoming", func(c *Config) { c.Incoming = true; c.RAMFile = "x" }, ""},
		{"ok-accel", func(c *Config) { c.Accel = KVM; c.CPU = "Skylake-Server-v4" }, ""},
		{"ok-q35", func(c *Config) { c.Machine = MachineQ35 }, ""},
		{"ok-microvm", func(c *Config) { c.Machine = MachineMicrovm }, ""},
		{"machine", func(c *Config) { c.Machine = "pc-i440fx" }, `unknown machine type "pc-i440fx"`},
		{"no-kernel", func(c *Config) { c.Kernel = "" }, "no kernel"},
		{"missing-kernel", func(c *Config) { c.Kernel = filepath.Join(dir, "nope") }, "kernel: stat"},
		{"kernel-dir", func(c *Config) { c.Kernel = dir }, "not a regular file"},
		{"missing-initrd", func(c *Config) { c.Initrd = filepath.Join(dir, "nope") }, "initrd: stat"},
		{"memory-low", func(c *Config) { c.MemoryMiB = 0 }, "memory 0 MiB out of range"},
		{"memory-high", func(c *Config) { c.MemoryMiB = MaxMemoryMiB + 1 }, "out of range"},
		{"vcpus-zero", func(c *Config) { c.VCPUs = 0 }, "0 vCPUs"},
		{"vcpus-high", func(c *Config) { c.VCPUs = MaxVCPUs + 1 }, "vCPUs out of range"},
		{"accel", func(c *Config) { c.Accel = "hvf" }, `unknown accelerator "hvf"`},
		{"cpu-comma", func(c *Config) { c.CPU = "max,+vmx" }, "bad CPU model"},
		{"disk-no-path", func(c *Config) { c.Disks[0].Path = "" }, "disk 0 has no path"},
		{"disk-missing", func(c *Config) { c.Disks[0].Path = filepath.Join(dir, "nope") }, "disk 0: stat"},
		{"disk-dir", func(c *Config) { c.Disks[0].Path = dir }, "not a regular file"},
		{"disk-negative", func(c *Config) { c.Disks[0].Offset = -1 }, "negative"},
		{"disk-unaligned-size", func(c *Config) { c.Disks[0].Size = 1000 }, "not a multiple of 512"},
		{"disk-past-end", func(c *Config) { c.Disks[0].Size = 8192 }, "exceeds file size 8192"},
		{"disk-offset-past-end", func(c *Config) { c.Disks[0].Offset = 9000; c.Disks[0].Size = 0 }, "exceeds file size"},
		{"disk-empty", func(c *Config) { c.Disks[0].Offset = 8192; c.Disks[0].Size = 0 }, "empty range"},
		{"disk-overflow", func(c *Config) { c.Disks[0].Size = 1 << 62; c.Disks[0].Offset = 1 << 62 }, "exceeds"},
		{"too-many-disks", func(c *Config) { c.Disks = make([]Disk, MaxDisks+1) }, "disks, at most"},
		{"port-empty", func(c *Config) { c.Ports = []string{""} }, "bad port name"},
		{"port-comma", func(c *Config) { c.Ports = []string{"a,b"} }, "bad port name"},
		{"port-dup", func(c *Config) { c.Ports = []string{"a", "a"} }, `duplicate port name "a"`},
		{"port-long", func(c *Config) { c.Ports = []string{strings.Repeat("a", 64)} }, "bad port name"},
		{"too-many-ports", func(c *Config) {
			c.Ports = nil
			for i := range MaxPorts + 1 {
				c.Ports = append(c.Ports, "p"+strings.Repeat("x", i))
			}
		}, "ports, at most"},
		{"ok-shares", func(c *Config) {
			c.Shares = []Share{{Tag: "kiln0", Path: dir, ReadOnly: true}, {Tag: "kiln1", Path: dir}}
		}, ""},
		{"share-tag", func(c *Config) { c.Shares = []Share{{Tag: "a,b", Path: dir}} }, `bad share tag "a,b"`},
		{"share-dup", func(c *Config) { c.Shares = []Share{{Tag: "a", Path: dir}, {Tag: "a", Path: dir}} }, `duplicate share tag "a"`},
		{"share-missing", func(c *Config) { c.Shares = []Share{{Tag: "a", Path: filepath.Join(dir, "nope")}} }, "share a: stat"},
		{"share-file", func(c *Config) { c.Shares = []Share{{Tag: "a", Path: kernel}} }, "is not a directory"},
		{"too-many-shares", func(c *Config) { c.Shares = make([]Share, MaxShares+1) }, "shares, at most"},
		{"shared-without-file", func(c *Config) { c.RAMShared = true }, "RAMShared without RAMFile"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ok()
			tc.mod(&c)
			err := c.Validate()
			switch {
			case tc.errSub == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tc.errSub != "" && (err == nil || !strings.Contains(err.Error(), tc.errSub)):
				t.Errorf("Validate() = %v, want an error containing %q", err, tc.errSub)
			}
		})
	}
}
