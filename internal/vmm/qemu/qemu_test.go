package qemu

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/vmm"
)

func TestArgs(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "x,y")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "qemu")
	kernel := filepath.Join(dir, "vmlinuz")
	initrd := filepath.Join(dir, "initrd")
	disk := filepath.Join(dir, "img,ro")
	for _, p := range []string{bin, kernel, initrd, disk} {
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ram := filepath.Join(dir, "ram")
	common := []string{"-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot"}
	sandbox := []string{"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"}
	chardevs := []string{
		"-chardev", "socket,id=qmp,fd=3", "-mon", "chardev=qmp,mode=control",
		"-chardev", "socket,id=con,fd=4", "-serial", "chardev:con",
	}
	cat := func(parts ...[]string) []string {
		var out []string
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	s := func(a ...string) []string { return a }
	for _, tc := range []struct {
		name string
		cfg  vmm.Config
		want []string
	}{
		{
			name: "minimal-tcg",
			cfg:  vmm.Config{Kernel: kernel, MemoryMiB: 128, VCPUs: 1, Accel: vmm.TCG},
			want: cat(s(bin), common,
				s("-machine", "q35,sata=off,smbus=off,vmport=off,i8042=off", "-accel", "tcg", "-cpu", "max", "-m", "128M", "-smp", "1",
					"-kernel", kernel),
				chardevs, sandbox),
		},
		{
			name: "kvm-two-cpus",
			cfg:  vmm.Config{Kernel: kernel, Initrd: initrd, Cmdline: testCmdline, MemoryMiB: 512, VCPUs: 2, Accel: vmm.KVM},
			want: cat(s(bin), common,
				s("-machine", "q35,sata=off,smbus=off,vmport=off,i8042=off", "-accel", "kvm", "-cpu", "host", "-m", "512M", "-smp", "2",
					"-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet loglevel=3"),
				chardevs, sandbox),
		},
		{
			name: "snapshot-source",
			cfg: vmm.Config{Kernel: kernel, MemoryMiB: 256, VCPUs: 2, Accel: vmm.TCG, CPU: "Haswell",
				Ports:   []string{"kiln.ctl", "kiln.agent"},
				Disks:   []vmm.Disk{{Path: disk, Offset: 4096, Size: 8192, ReadOnly: true}, {Path: disk}},
				RAMFile: ram, RAMShared: true},
			want: cat(s(bin), common,
				s("-machine", "q35,sata=off,smbus=off,vmport=off,i8042=off,memory-backend=mem", "-accel", "tcg,thread=multi", "-cpu", "Haswell", "-m", "256M", "-smp", "2",
					"-object", `{"id":"mem","mem-path":"`+ram+`","qom-type":"memory-backend-file","share":true,"size":268435456}`,
					"-kernel", kernel),
				chardevs,
				s("-device", `{"driver":"virtio-serial-pci","id":"vser"}`,
					"-chardev", "socket,id=port0,fd=5",
					"-device", `{"bus":"vser.0","chardev":"port0","driver":"virtserialport","name":"kiln.ctl","nr":1}`,
					"-chardev", "socket,id=port1,fd=6",
					"-device", `{"bus":"vser.0","chardev":"port1","driver":"virtserialport","name":"kiln.agent","nr":2}`,
					"-blockdev", `{"driver":"raw","file":{"driver":"file","filename":"`+disk+`","read-only":true},"node-name":"disk0","offset":4096,"read-only":true,"size":8192}`,
					"-device", `{"drive":"disk0","driver":"virtio-blk-pci","id":"vd0"}`,
					"-blockdev", `{"driver":"raw","file":{"driver":"file","filename":"`+disk+`","read-only":false},"node-name":"disk1","read-only":false}`,
					"-device", `{"drive":"disk1","driver":"virtio-blk-pci","id":"vd1"}`),
				sandbox),
		},
		{
			name: "restore",
			cfg:  vmm.Config{Kernel: kernel, MemoryMiB: 64, VCPUs: 1, Accel: vmm.TCG, RAMFile: ram, Incoming: true},
			want: cat(s(bin), common,
				s("-machine", "q35,sata=off,smbus=off,vmport=off,i8042=off,memory-backend=mem", "-accel", "tcg", "-cpu", "max", "-m", "64M", "-smp", "1",
					"-object", `{"id":"mem","mem-path":"`+ram+`","qom-type":"memory-backend-file","share":false,"size":67108864}`,
					"-kernel", kernel),
				chardevs, sandbox, s("-incoming", "defer")),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := New(withBinary(tc.cfg, bin))
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			if diff := cmp.Diff(tc.want, m.Args()); diff != "" {
				t.Errorf("Args() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestNewErrors(t *testing.T) {
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(kernel, []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := vmm.Config{Kernel: kernel, MemoryMiB: 64, VCPUs: 1}

	t.Setenv("PATH", t.TempDir())
	_, err := New(cfg)
	want := "qemu-system-x86_64 not found: install qemu-system-x86 (apt-get install qemu-system-x86)"
	if err == nil || err.Error() != want {
		t.Errorf("New without qemu on PATH = %v, want %q", err, want)
	}
	_, err = New(withBinary(cfg, "/nonexistent/qemu"))
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/qemu") {
		t.Errorf("New(Binary: /nonexistent/qemu) = %v, want an error naming the path", err)
	}
	bad := cfg
	bad.VCPUs = 0
	if _, err := New(withBinary(bad, "/bin/true")); err == nil || !strings.Contains(err.Error(), "vCPUs") {
		t.Errorf("New(invalid config) = %v, want the validation error", err)
	}
	m, err := New(withBinary(cfg, "/bin/true"))
	if err != nil {
		t.Fatal(err)
	}
	if m.Accel() != vmm.TCG && m.Accel() != vmm.KVM {
		t.Errorf("Accel() = %q after detection, want kvm or tcg", m.Accel())
	}
	if m.Pid() != 0 || m.Port("kiln.ctl") != nil {
		t.Errorf("before Start: Pid() = %d, Port = %v; want 0, nil", m.Pid(), m.Port("kiln.ctl"))
	}
	if err := m.Close(); err != nil {
		t.Errorf("Close before Start = %v", err)
	}
	if err := m.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	<-m.Done()
}

func TestRing(t *testing.T) {
	for _, tc := range []struct {
		name   string
		writes []string
		want   string
	}{
		{"empty", nil, ""},
		{"short", []string{"ab", "cd"}, "abcd"},
		{"exact", []string{"abcdefgh"}, "abcdefgh"},
		{"one-big", []string{"0123456789"}, "23456789"},
		{"wraps", []string{"abcde", "fghij", "klmno", "pqrst", "uvwxy"}, "rstuvwxy"},
		{"big-after-small", []string{"ab", "0123456789"}, "23456789"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRing(8)
			for _, w := range tc.writes {
				if n, err := r.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("Write(%q) = %d, %v", w, n, err)
				}
			}
			if got := r.Bytes(); !bytes.Equal(got, []byte(tc.want)) {
				t.Errorf("Bytes() = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	testutil.NeedQEMU(t)
	v, err := Version(context.Background(), "qemu-system-x86_64")
	if err != nil {
		t.Fatalf("Version: %v", err)
	}
	if !strings.HasPrefix(v, "QEMU emulator version ") || strings.Contains(v, "\n") {
		t.Errorf("Version = %q, want one line starting with \"QEMU emulator version \"", v)
	}
	if _, err := Version(context.Background(), "/nonexistent/qemu-system-x86_64"); err == nil {
		t.Error("Version(missing binary) succeeded, want an error")
	}
	if _, err := Version(context.Background(), "kiln-no-such-qemu"); err == nil || !strings.Contains(err.Error(), "install qemu-system-x86") {
		t.Errorf("Version(not on PATH) = %v, want a hint to install qemu-system-x86", err)
	}
}

// TestFingerprint: a snapshot source and its restores, at other paths, have
// one fingerprint; a change to what the guest sees changes it.
func TestFingerprint(t *testing.T) {
	dir := t.TempDir()
	file := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	base := vmm.Config{Kernel: file("k1"), Initrd: file("i1"), Cmdline: testCmdline, MemoryMiB: 256, VCPUs: 1, Accel: vmm.TCG,
		Ports: []string{"kiln.ctl", "kiln.agent"}, Disks: []vmm.Disk{{Path: file("d1"), Offset: 4096, Size: 8192, ReadOnly: true}},
		RAMFile: filepath.Join(dir, "ram1"), RAMShared: true, Binary: "/bin/true"}
	fp := func(c vmm.Config) string {
		t.Helper()
		m, err := New(c)
		if err != nil {
			t.Fatal(err)
		}
		return m.Fingerprint()
	}
	want := fp(base)
	same := map[string]func(c *vmm.Config){
		"restore": func(c *vmm.Config) { c.RAMShared, c.Incoming = false, true },
		"other paths": func(c *vmm.Config) {
			c.Kernel, c.Initrd, c.RAMFile = file("k2"), file("i2"), filepath.Join(dir, "ram2")
			c.Disks = []vmm.Disk{{Path: file("d2"), Offset: 8192, Size: 4096, ReadOnly: true}}
		},
	}
	for name, mut := range same {
		c := base
		mut(&c)
		if got := fp(c); got != want {
			t.Errorf("Fingerprint(%s) = %s, want %s (the same machine)", name, got, want)
		}
	}
	differ := map[string]func(c *vmm.Config){
		"cmdline":     func(c *vmm.Config) { c.Cmdline += " quiet" },
		"ports":       func(c *vmm.Config) { c.Ports = []string{"kiln.ctl"} },
		"cpu":         func(c *vmm.Config) { c.CPU = "Haswell" },
		"no RAM file": func(c *vmm.Config) { c.RAMFile, c.RAMShared = "", false },
		"two disks":   func(c *vmm.Config) { c.Disks = append(c.Disks, vmm.Disk{Path: c.Disks[0].Path}) },
	}
	for name, mut := range differ {
		c := base
		mut(&c)
		if got := fp(c); got == want {
			t.Errorf("Fingerprint(%s) = %s, the same as the base machine's; want a different one", name, got)
		}
	}
}
