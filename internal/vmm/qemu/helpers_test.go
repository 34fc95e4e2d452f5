package qemu

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/u-root/u-root/pkg/cpio"

	"github.com/kiln-dev/kiln/internal/build/kernel"
	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// shared holds artifacts built once per test binary.
var shared struct {
	dirOnce sync.Once
	root    string // removed by TestMain
	dir     string
	dirErr  error

	kernelOnce sync.Once
	kernel     *kernel.Kernel
	kernelErr  error

	initOnce sync.Once
	init     string
	initErr  error

	rdOnce sync.Once
	rd     string
	rdErr  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.root != "" {
		os.RemoveAll(shared.root)
	}
	os.Exit(code)
}

// sharedDir returns the per-binary artifact directory, created on first use
// (fuzz workers never create it). A comma in its path checks that paths are
// never spliced into QEMU's comma-separated option lists.
func sharedDir(t testing.TB) string {
	t.Helper()
	shared.dirOnce.Do(func() {
		shared.root, shared.dirErr = os.MkdirTemp("", "kiln-qemu-test-")
		if shared.dirErr == nil {
			shared.dir = filepath.Join(shared.root, "a,b=c")
			shared.dirErr = os.Mkdir(shared.dir, 0o755)
		}
	})
	if shared.dirErr != nil {
		t.Fatal(shared.dirErr)
	}
	return shared.dir
}

func testLog(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// testKernel returns Debian's cloud kernel (downloaded into the cache once).
func testKernel(t testing.TB) *kernel.Kernel {
	t.Helper()
	shared.kernelOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		shared.kernel, shared.kernelErr = kernel.Fetch(ctx, nil)
	})
	if shared.kernelErr != nil {
		t.Fatalf("kernel.Fetch: %v", shared.kernelErr)
	}
	return shared.kernel
}

// testInitramfs returns a newc initramfs whose /init is testdata/guestinit
// and which carries the virtio modules listed in /modules.list.
func testInitramfs(t testing.TB) string {
	t.Helper()
	k := testKernel(t)
	dir := sharedDir(t)
	shared.initOnce.Do(func() {
		out := filepath.Join(dir, "guestinit")
		cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./testdata/guestinit")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			shared.initErr = fmt.Errorf("building guestinit: %v\n%s", err, b)
			return
		}
		shared.init = out
	})
	if shared.initErr != nil {
		t.Fatal(shared.initErr)
	}
	shared.rdOnce.Do(func() {
		shared.rd, shared.rdErr = writeInitramfs(k, shared.init, filepath.Join(dir, "initrd.cpio"))
	})
	if shared.rdErr != nil {
		t.Fatal(shared.rdErr)
	}
	return shared.rd
}

func writeInitramfs(k *kernel.Kernel, initBin, out string) (string, error) {
	mods, err := k.ModuleClosure([]string{"virtio_pci", "virtio_blk", "virtio_console"})
	if err != nil {
		return "", err
	}
	initData, err := os.ReadFile(initBin)
	if err != nil {
		return "", err
	}
	recs := []cpio.Record{
		cpio.StaticFile("init", string(initData), 0o755),
		cpio.Directory("modules", 0o755),
	}
	var list bytes.Buffer
	for _, m := range mods {
		b, err := os.ReadFile(m.Path)
		if err != nil {
			return "", err
		}
		p := "modules/" + m.Name + ".ko"
		recs = append(recs, cpio.StaticFile(p, string(b), 0o644))
		fmt.Fprintf(&list, "/%s\n", p)
	}
	recs = append(recs, cpio.StaticFile("modules.list", list.String(), 0o644))
	f, err := os.Create(out)
	if err != nil {
		return "", err
	}
	w := cpio.Newc.Writer(f)
	if err := cpio.WriteRecordsAndDirs(w, recs); err != nil {
		f.Close()
		return "", err
	}
	if err := cpio.WriteTrailer(w); err != nil {
		f.Close()
		return "", err
	}
	return out, f.Close()
}

// testCmdline is the kernel command line of the driver's tests.
const testCmdline = "console=ttyS0 panic=-1 quiet loglevel=3"

// withBinary returns c running the QEMU binary bin.
func withBinary(c vmm.Config, bin string) vmm.Config {
	c.Binary = bin
	return c
}

// bootConfig is a config booting guestinit in the given mode; the test
// boots a VM, so it is gated with testutil.NeedQEMU.
func bootConfig(t testing.TB, mode string) vmm.Config {
	t.Helper()
	testutil.NeedQEMU(t)
	return vmm.Config{
		Kernel:    testKernel(t).Vmlinuz,
		Initrd:    testInitramfs(t),
		Cmdline:   testCmdline + " kilntest=" + mode,
		MemoryMiB: 256,
		VCPUs:     1,
		Log:       testLog(t),
	}
}

// startMachine creates and starts a machine that is closed after the test.
func startMachine(t testing.TB, cfg vmm.Config) *Machine {
	t.Helper()
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	return m
}

// waitConsole waits until the console contains want and returns it.
func waitConsole(t testing.TB, m *Machine, want string) []byte {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		c := m.Console()
		if bytes.Contains(c, []byte(want)) {
			return c
		}
		select {
		case <-m.Done():
			t.Fatalf("qemu exited (%v) before the console showed %q; console:\n%s", m.Wait(), want, m.Console())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("console did not show %q within 2m; console:\n%s", want, c)
		}
	}
}

// countFDs returns the number of open fds of this process.
func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// processGone reports whether pid no longer exists (or is a zombie).
func processGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// State is the field after the parenthesized command name.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] == 'Z'
}
