// Package testutil gates tests on the components they need and builds the Go binaries end-to-end tests use.
//
// Test tiers: `go test -short ./...` runs no VM, no mkfs and no network;
// the Need* helpers skip such tests there, with a reason. Without -short a
// missing component (no QEMU on PATH, no mkfs.erofs, not root) skips the
// test with a reason too, except in CI ($KILN_CI=1), where it fails: CI
// must run every test, not pass by skipping them.
//
// Artifacts are built once per test binary into a temporary directory that
// Main removes after the tests ran. Images are built by package testimage.
package testutil

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/kiln-dev/kiln/internal/image"
)

var (
	tmpOnce sync.Once
	tmpDir  string
	tmpErr  error
)

// Main runs the tests and removes the shared artifacts afterwards. Use it
// from TestMain: func TestMain(m *testing.M) { testutil.Main(m) }.
//
// Snapshots go to a private store ($KILN_SNAPSHOTS) unless the caller set
// one, so tests never touch the user's snapshots.
func Main(m *testing.M) {
	if os.Getenv("KILN_SNAPSHOTS") == "" {
		d, err := os.MkdirTemp("", "kiln-test-snapshots-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "testutil:", err)
			os.Exit(2)
		}
		os.Setenv("KILN_SNAPSHOTS", d)
		defer os.RemoveAll(d)
	}
	m.Run() // the test binary exits with its code when TestMain returns
	if tmpDir != "" {
		os.RemoveAll(tmpDir)
	}
}

// TempDir returns the per-test-binary artifact directory (removed by Main).
func TempDir(t testing.TB) string {
	tmpOnce.Do(func() { tmpDir, tmpErr = os.MkdirTemp("", "kiln-test-") })
	if tmpErr != nil {
		t.Fatalf("creating shared test directory: %v", tmpErr)
	}
	return tmpDir
}

// RepoRoot returns the repository's top directory.
func RepoRoot(t testing.TB) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

var (
	buildMu  sync.Mutex
	builtBin = map[string]string{} // package and static flag → binary
)

// GoBuild builds the main package pkg of this repository (a path relative
// to the repository's top, such as "./cmd/kiln-init" or a testdata program)
// once per test binary and returns the binary's path. static builds it the
// way guest programs are built: no cgo, -trimpath, no VCS stamp, stripped.
// It is the one builder of test artifacts.
func GoBuild(t testing.TB, pkg string, static bool) string {
	t.Helper()
	key := fmt.Sprintf("%s static=%v", pkg, static)
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := builtBin[key]; ok {
		return p
	}
	d, err := os.MkdirTemp(TempDir(t), "go-")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(d, filepath.Base(pkg))
	args := []string{"build"}
	env := os.Environ()
	if static {
		args = append(args, "-trimpath", "-buildvcs=false", "-ldflags", "-s -w")
		env = append(env, "CGO_ENABLED=0")
	}
	cmd := exec.Command("go", append(args, "-o", out, pkg)...)
	cmd.Dir = RepoRoot(t)
	cmd.Env = env
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	builtBin[key] = out
	return out
}

// KilnInit builds cmd/kiln-init (static, reproducible) once and returns its path.
func KilnInit(t testing.TB) string {
	t.Helper()
	return GoBuild(t, "./cmd/kiln-init", true)
}

var (
	kilnOnce sync.Once
	kilnPath string
	kilnErr  error
)

// Kiln builds the kiln CLI once and returns its path, with kiln-init beside
// it (where the CLI looks for it).
func Kiln(t testing.TB) string {
	t.Helper()
	initBin, cli := KilnInit(t), GoBuild(t, "./cmd/kiln", false)
	kilnOnce.Do(func() {
		d, err := os.MkdirTemp(TempDir(t), "bin-")
		if err != nil {
			kilnErr = err
			return
		}
		for _, f := range [][2]string{{cli, "kiln"}, {initBin, "kiln-init"}} {
			b, err := os.ReadFile(f[0])
			if err == nil {
				err = os.WriteFile(filepath.Join(d, f[1]), b, 0o755)
			}
			if err != nil {
				kilnErr = err
				return
			}
		}
		kilnPath = filepath.Join(d, "kiln")
	})
	if kilnErr != nil {
		t.Fatal(kilnErr)
	}
	return kilnPath
}

// OpenImage opens and verifies the image at path.
func OpenImage(t testing.TB, path string) *image.Image {
	t.Helper()
	img, err := image.OpenVerified(path)
	if err != nil {
		t.Fatalf("opening image %s: %v", path, err)
	}
	return img
}

// CountFDs returns the number of open file descriptors of this process.
func CountFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("reading /proc/self/fd: %v", err)
	}
	return len(ents)
}

// LockedBuffer is a bytes.Buffer safe for concurrent writers (loggers).
type LockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what was written so far.
func (b *LockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// ProcKB returns the value in bytes of a "Field:   N kB" line of a /proc
// file such as /proc/self/status (VmHWM) or /proc/PID/smaps_rollup (Pss).
func ProcKB(t testing.TB, path, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				if kb, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					return kb << 10
				}
			}
		}
	}
	t.Fatalf("no %s in %s", field, path)
	return 0
}

// Children returns the PIDs of the live processes whose parent is pid.
func Children(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[0] != "Z" && f[1] == strconv.Itoa(pid) {
			out = append(out, p)
		}
	}
	return out
}
