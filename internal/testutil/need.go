package testutil

import (
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/vmm"
)

// CIEnv is the environment variable that marks a CI run: there a missing
// component fails the test instead of skipping it.
const CIEnv = "KILN_CI"

// InCI reports whether this is a CI run ($KILN_CI=1).
func InCI() bool { return os.Getenv(CIEnv) == "1" }

// missing skips t with why, or fails it in CI.
func missing(t testing.TB, why string) {
	t.Helper()
	if InCI() {
		t.Fatalf("%s (%s=1: CI runs every test, so a missing component is a failure)", why, CIEnv)
	}
	t.Skip(why)
}

// NeedQEMU marks a test that boots VMs: skipped with -short, and when
// qemu-system-x86_64 is not on PATH.
func NeedQEMU(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots VMs: skipped with -short")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		missing(t, "boots VMs, but qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)")
	}
}

// NeedKVM marks a test of the KVM path: it needs QEMU and a usable
// /dev/kvm. This one is skipped in CI too when the machine has no KVM, as
// kiln's CI machines have none; the skip says so.
func NeedKVM(t testing.TB) {
	t.Helper()
	NeedQEMU(t)
	if acc, why := vmm.DetectAccel(); acc != vmm.KVM {
		t.Skip("needs KVM: " + why)
	}
}

// NeedRoot marks a test that needs root (FUSE mounts with allow_other,
// loop mounts).
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "needs root")
	}
}

// NeedTool marks a test that runs an external program (mkfs.erofs,
// mksquashfs): skipped with -short, and when the program is missing, with
// the Debian package to install.
func NeedTool(t testing.TB, tool, pkg string) {
	t.Helper()
	if testing.Short() {
		t.Skip("runs " + tool + ": skipped with -short")
	}
	if _, err := exec.LookPath(tool); err != nil {
		missing(t, "needs "+tool+" (apt-get install "+pkg+")")
	}
}

// NeedNetwork marks a test that downloads (apt-get download of Debian
// packages and kernels): skipped with -short.
func NeedNetwork(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("downloads packages: skipped with -short")
	}
}

// WaitFor polls cond until it holds or timeout passes, then fails the test
// with what it waited for. Tests wait for events this way, never with a
// fixed sleep.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
