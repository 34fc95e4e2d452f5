package vm

import (
	"errors"
	"strings"
	"testing"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/image"
)

func testImage() *image.Image {
	return &image.Image{Path: "/nonexistent.kimg", Manifest: &image.Manifest{MemoryMiB: 512, VCPUs: 1, Agent: []string{"python3", "agent.py"}}}
}

func TestResources(t *testing.T) {
	for _, tt := range []struct {
		mem, cpus         int
		wantMem, wantCPUs int
	}{{0, 0, 512, 1}, {1024, 0, 1024, 1}, {0, 2, 512, 2}, {2048, 4, 2048, 4}} {
		c := Config{Image: testImage(), MemoryMiB: tt.mem, VCPUs: tt.cpus}
		if m, n := c.Resources(); m != tt.wantMem || n != tt.wantCPUs {
			t.Errorf("Resources(memory %d, vcpus %d) = %d, %d; want %d, %d", tt.mem, tt.cpus, m, n, tt.wantMem, tt.wantCPUs)
		}
	}
}

func TestNewRejects(t *testing.T) {
	img := testImage()
	for _, tt := range []struct {
		name string
		cfg  Config
		opts []Option
		want string
	}{
		{"no image", Config{}, []Option{WithAgent(nil)}, "no image"},
		{"negative memory", Config{Image: img, MemoryMiB: -1}, []Option{WithAgent(nil)}, "must not be negative"},
		{"nothing to run", Config{Image: img}, nil, "nothing to run"},
		{"restore and command", Config{Image: img}, []Option{WithSnapshot("r", "s"), WithCommand([]string{"x"}, nil, Stdio{})}, "excludes"},
		{"restore and source", Config{Image: img}, []Option{WithSnapshot("r", "s"), WithSnapshotSource("r")}, "exclude each other"},
		{"source in run mode", Config{Image: img}, []Option{WithCommand([]string{"x"}, nil, Stdio{}), WithSnapshotSource("r")}, "goes with WithAgent"},
		{"unknown machine", Config{Image: img, Machine: "isapc"}, []Option{WithAgent(nil)}, `unknown machine type "isapc"`},
		{"debian kernel on a microvm", Config{Image: img, Machine: "microvm"}, []Option{WithAgent(nil)}, "cannot boot on a microvm"},
	} {
		if _, err := New(tt.cfg, tt.opts...); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("New(%s) error = %v, want one containing %q", tt.name, err, tt.want)
		}
	}
}

func TestMachineFor(t *testing.T) {
	for _, tt := range []struct {
		kernel image.Kernel
		want   string
	}{
		{image.Kernel{Kind: "minimal"}, "microvm"},
		{image.Kernel{Kind: "debian", Package: "linux-image-6.1.0-57-cloud-amd64"}, "q35"},
		{image.Kernel{Kind: "local"}, "q35"},
		{image.Kernel{Package: "linux-image-6.1.0-56-cloud-amd64"}, "q35"}, // an image from before kernel kinds
	} {
		if got := MachineFor(&image.Manifest{Kernel: tt.kernel}); got != tt.want {
			t.Errorf("MachineFor(kernel %+v) = %q, want %q", tt.kernel, got, tt.want)
		}
	}
}

func TestDeathError(t *testing.T) {
	eof := errors.New("EOF")
	for _, tt := range []struct {
		name string
		d    Death
		want []string
	}{
		{"exit status", Death{Who: "the agent", Exit: &proto.ExitMsg{Code: 1, Signal: "SIGKILL"}, VMMExited: true}, []string{"the agent exited with status 1 (signal SIGKILL)"}},
		{"init error", Death{Who: "kiln-init", Exit: &proto.ExitMsg{Code: 1, Error: "mounting rootfs: EIO"}}, []string{"kiln-init exited: mounting rootfs: EIO"}},
		{"oom", Death{Who: "the agent", Exit: &proto.ExitMsg{Code: 137, OOM: true}}, []string{"ran out of memory"}},
		{"vmm died", Death{Who: "the agent", VMMExited: true, VMM: errors.New("qemu killed by signal SIGKILL"), Console: "Kernel panic - not syncing\n"}, []string{"the VM died", "VMM: qemu killed", "Kernel panic"}},
		{"silent", Death{Who: "the agent", Cause: eof}, []string{"stopped answering", "EOF"}},
	} {
		got := tt.d.Error()
		for _, w := range tt.want {
			if !strings.Contains(got, w) {
				t.Errorf("%s: Death.Error() = %q, want it to contain %q", tt.name, got, w)
			}
		}
	}
	if d := (&Death{Cause: eof}); !errors.Is(d, eof) {
		t.Errorf("errors.Is(Death{Cause: eof}, eof) = false, want true")
	}
}
