package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/kiln-dev/kiln/internal/build/kernel"
	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
)

// TestKernelCLI: kiln kernel build builds kiln's kernel or finds it in the
// cache (scripts/test.sh has built it), and kiln kernel ls lists it.
func TestKernelCLI(t *testing.T) {
	testutil.NeedNetwork(t)
	for _, tool := range kernel.BuildTools {
		testutil.NeedTool(t, tool[0], tool[1])
	}
	stdout, stderr, err := kiln(t, "kernel", "build", "--json")
	if err != nil {
		t.Fatalf("kiln kernel build error = %v\nstderr:\n%s", err, stderr)
	}
	var built kernelJSON
	if err := json.Unmarshal([]byte(stdout), &built); err != nil {
		t.Fatalf("kiln kernel build --json output is not JSON: %v\n%s", err, stdout)
	}
	if built.Kind != "minimal" || !built.Current || len(built.VmlinuxSHA256) != 64 || built.SourcePackage != kernel.SourcePackage || built.VmlinuxSize == 0 {
		t.Errorf("kiln kernel build --json = %+v, want the current minimal kernel with its digest", built)
	}
	stdout, _, err = kiln(t, "kernel", "ls", "--json")
	if err != nil {
		t.Fatalf("kiln kernel ls --json error = %v", err)
	}
	var listed []kernelJSON
	if err := json.Unmarshal([]byte(stdout), &listed); err != nil {
		t.Fatalf("kiln kernel ls --json output is not JSON: %v\n%s", err, stdout)
	}
	found := false
	for _, k := range listed {
		found = found || k.VmlinuxSHA256 == built.VmlinuxSHA256
	}
	if !found {
		t.Errorf("kiln kernel ls --json = %+v, want it to list %s", listed, built.VmlinuxSHA256)
	}
	stdout, _, err = kiln(t, "kernel", "ls")
	if err != nil || !strings.Contains(stdout, built.VmlinuxSHA256[:16]) || !strings.Contains(stdout, "yes") {
		t.Errorf("kiln kernel ls = %q, %v; want a row for %s marked current", stdout, err, built.VmlinuxSHA256[:16])
	}
}

// TestDebianKernel is the smoke test of the kernel that is not the
// default: an image with Debian's cloud kernel (and its modules) on q35
// boots cold, creates a snapshot and restores from it.
func TestDebianKernel(t *testing.T) {
	img := testimage.NumpyDebianKernel(t)
	stdout, _, err := kiln(t, "inspect", img)
	if err != nil {
		t.Fatalf("kiln inspect error = %v", err)
	}
	for _, w := range []string{"debian 6.1.", "cloud-amd64", "virtio_blk", "q35 machine"} {
		if !strings.Contains(stdout, w) {
			t.Errorf("kiln inspect output lacks %q:\n%s", w, stdout)
		}
	}
	phases := map[string][]string{
		"cold":     {"init_started", "command_exited"},
		"snapshot": {"state_loaded_resumed", "first_result"},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			args := append(append([]string{"run", img, "--timings"}, m.flag...), "--", "python3", "-c", "import numpy; print(numpy.arange(10).sum())")
			stdout, stderr, err := kiln(t, args...)
			if err != nil {
				t.Fatalf("kiln run error = %v\nstderr:\n%s", err, stderr)
			}
			if stdout != "45\n" {
				t.Errorf("kiln run stdout = %q, want %q", stdout, "45\n")
			}
			for _, phase := range phases[m.name] {
				if !strings.Contains(stderr, phase) {
					t.Errorf("kiln run --timings stderr = %q, want phase %s", stderr, phase)
				}
			}
		})
	}
}
