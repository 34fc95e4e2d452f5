package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
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
			name: "microvm-kvm",
			cfg: vmm.Config{Kernel: kernel, Initrd: initrd, Cmdline: testCmdline, Machine: vmm.MachineMicrovm, MemoryMiB: 512, VCPUs: 1, Accel: vmm.KVM,
				Ports: []string{"kiln.ctl"}, Disks: []vmm.Disk{{Path: disk, ReadOnly: true}}, RAMFile: ram, RAMShared: true},
			want: cat(s(bin), common,
				s("-machine", "microvm,x-option-roms=off,pic=off,pcie=off,acpi=on,memory-backend=mem", "-accel", "kvm", "-cpu", "host", "-m", "512M", "-smp", "1",
					"-object", `{"id":"mem","mem-path":"`+ram+`","qom-type":"memory-backend-file","share":true,"size":536870912}`,
					"-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet loglevel=3"),
				chardevs,
				s("-device", `{"driver":"virtio-serial-device","id":"vser"}`,
					"-chardev", "socket,id=port0,fd=5",
					"-device", `{"bus":"vser.0","chardev":"port0","driver":"virtserialport","name":"kiln.ctl","nr":1}`,
					"-blockdev", `{"driver":"raw","file":{"driver":"file","filename":"`+disk+`","read-only":true},"node-name":"disk0","read-only":true}`,
					"-device", `{"drive":"disk0","driver":"virtio-blk-device","id":"vd0"}`),
				sandbox),
		},
		{
			name: "kvm-fallback-cpu",
			cfg:  vmm.Config{Kernel: kernel, MemoryMiB: 128, VCPUs: 1, Accel: vmm.KVM, CPU: vmm.FallbackCPU},
			want: cat(s(bin), common,
				s("-machine", "q35,sata=off,smbus=off,vmport=off,i8042=off", "-accel", "kvm", "-cpu", "kvm64", "-m", "128M", "-smp", "1",
					"-kernel", kernel),
				chardevs, sandbox),
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

// TestMicrovmTCGCmdline: under TCG a microvm's guest is told the host's
// TSC rate (it has nothing to calibrate it against), and the machine's
// fingerprint differs from q35's.
func TestMicrovmTCGCmdline(t *testing.T) {
	kernel := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(kernel, []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := vmm.Config{Kernel: kernel, Cmdline: testCmdline, Machine: vmm.MachineMicrovm, MemoryMiB: 64, VCPUs: 1, Accel: vmm.TCG}
	m, err := New(withBinary(cfg, "/bin/true"))
	if err != nil {
		t.Fatal(err)
	}
	got := m.cmdline()
	if khz := hostTSCkHz(); khz > 0 {
		if want := testCmdline + " tsc_early_khz=" + strconv.Itoa(khz) + " tsc=reliable"; got != want {
			t.Errorf("cmdline() = %q, want %q", got, want)
		}
	} else if got != testCmdline {
		t.Errorf("cmdline() without a known TSC rate = %q, want %q", got, testCmdline)
	}
	cfg.Machine = vmm.MachineQ35
	q, err := New(withBinary(cfg, "/bin/true"))
	if err != nil {
		t.Fatal(err)
	}
	if q.cmdline() != testCmdline {
		t.Errorf("q35 cmdline() = %q, want %q unchanged", q.cmdline(), testCmdline)
	}
	if q.Fingerprint() == m.Fingerprint() {
		t.Errorf("q35 and microvm have the same fingerprint %s, want them to differ", m.Fingerprint())
	}
}

func TestParseTSCkHz(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     int
	}{
		{"constant", "processor\t: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\nbogomips\t: 4192.00\n\nprocessor\t: 1\nbogomips\t: 4000.00\n", 2096000},
		{"flags after bogomips", "bogomips\t: 5988.42\nflags : constant_tsc\n", 2994210},
		{"not constant", "flags\t: fpu tsc\nbogomips\t: 4192.00\n", 0},
		{"no bogomips", "flags\t: constant_tsc\n", 0},
		{"garbage", "bogomips: lots\nflags: constant_tsc\n", 0},
		{"empty", "", 0},
	} {
		if got := parseTSCkHz([]byte(tc.in)); got != tc.want {
			t.Errorf("parseTSCkHz(%s) = %d, want %d", tc.name, got, tc.want)
		}
	}
}

func FuzzParseTSCkHz(f *testing.F) {
	f.Add("flags\t: constant_tsc\nbogomips\t: 4192.00\n")
	f.Add("bogomips: 1e308\nflags: constant_tsc")
	f.Add("bogomips: -5\nflags: constant_tsc")
	f.Fuzz(func(t *testing.T, in string) {
		if got := parseTSCkHz([]byte(in)); got < 0 || got > 5e8 {
			t.Fatalf("parseTSCkHz(%q) = %d, want 0 or a plausible rate", in, got)
		}
	})
}

// TestCPURefused: under KVM, a QEMU that refuses the CPU model the driver
// chose ("host") makes Start fail with vmm.ErrCPUModel, so that the VM can
// retry with vmm.FallbackCPU; a model the caller chose is not second-guessed.
func TestCPURefused(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	fake := filepath.Join(dir, "qemu")
	if err := os.WriteFile(kernel, []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	script := "#!/bin/sh\necho \"qemu-system-x86_64: -cpu host: CPU model 'host' requires KVM or HVF\" >&2\nexit 1\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cpu  string
		want bool
	}{{"auto", "", true}, {"chosen", "host", false}} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := New(vmm.Config{Kernel: kernel, MemoryMiB: 64, VCPUs: 1, Accel: vmm.KVM, CPU: tc.cpu, Binary: fake})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			err = m.Start(context.Background())
			if err == nil {
				t.Fatal("Start() = nil with a QEMU that exits, want an error")
			}
			if got := errors.Is(err, vmm.ErrCPUModel); got != tc.want {
				t.Errorf("Start() error = %v; errors.Is(ErrCPUModel) = %v, want %v", err, got, tc.want)
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
		RAMFile: filepath.Join(dir, "ram1"), RAMShared: true, Binary: "/bin/true",
		Shares: []vmm.Share{{Tag: "kiln0", Path: dir, ReadOnly: true}, {Tag: "kiln1", Path: dir, ReadOnly: true}}}
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
		// A snapshot taken with empty read-only slots restores with volumes.
		"volumes in the slots": func(c *vmm.Config) {
			c.Shares = []vmm.Share{{Tag: "kiln0", Path: t.TempDir()}, {Tag: "kiln1", Path: t.TempDir(), ReadOnly: true}}
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
		"one slot":    func(c *vmm.Config) { c.Shares = c.Shares[:1] },
		"other tags":  func(c *vmm.Config) { c.Shares = []vmm.Share{{Tag: "a", Path: dir}, {Tag: "b", Path: dir}} },
	}
	for name, mut := range differ {
		c := base
		mut(&c)
		if got := fp(c); got == want {
			t.Errorf("Fingerprint(%s) = %s, the same as the base machine's; want a different one", name, got)
		}
	}
}

func TestFsdevArg(t *testing.T) {
	for _, tt := range []struct {
		sh   vmm.Share
		want string
	}{
		{vmm.Share{Tag: "kiln0", Path: "/data", ReadOnly: true}, "local,id=fs0,path=/data,security_model=none,multidevs=remap,readonly=on"},
		{vmm.Share{Tag: "kiln0", Path: "/a,b=c"}, "local,id=fs0,path=/a,,b=c,security_model=none,multidevs=remap"},
	} {
		if got := fsdevArg("fs0", tt.sh); got != tt.want {
			t.Errorf("fsdevArg(%+v) = %q, want %q", tt.sh, got, tt.want)
		}
	}
}
