// Package testutil builds the real artifacts end-to-end tests need: the kiln-init binary and kiln images.
//
// Artifacts are built once per test binary into a temporary directory that
// Main removes after the tests ran.
package testutil

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/build"
	"github.com/kiln-dev/kiln/internal/spec"
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

func dir(t testing.TB) string {
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
	initOnce sync.Once
	initPath string
	initErr  error
)

// KilnInit builds cmd/kiln-init (static, reproducible) once and returns its path.
func KilnInit(t testing.TB) string {
	t.Helper()
	d := dir(t)
	initOnce.Do(func() {
		p := filepath.Join(d, "kiln-init")
		initErr = goBuild(t, p, "./cmd/kiln-init", []string{"CGO_ENABLED=0"}, "-trimpath", "-buildvcs=false", "-ldflags", "-s -w")
		initPath = p
	})
	if initErr != nil {
		t.Fatal(initErr)
	}
	return initPath
}

// NumpySpec is the spec of the test image: Debian's numpy on Debian's python.
const NumpySpec = `name = "numpy-test"
python = "/usr/bin/python3"
debian = ["python3-numpy"]
env = { OMP_NUM_THREADS = "1" }
memory = "512M"
vcpus = 1
`

var (
	imgMu   sync.Mutex
	imgPath = map[string]string{}
	imgErr  = map[string]error{}
)

// Image builds the image of specText once per test binary and returns its
// path. Builds are bounded to 15 minutes.
func Image(t testing.TB, specText string) string {
	t.Helper()
	imgMu.Lock()
	defer imgMu.Unlock()
	if p, ok := imgPath[specText]; ok {
		return p
	}
	if err, ok := imgErr[specText]; ok {
		t.Fatal(err)
	}
	p, err := buildImage(t, specText)
	if err != nil {
		imgErr[specText] = err
		t.Fatal(err)
	}
	imgPath[specText] = p
	return p
}

func buildImage(t testing.TB, specText string) (string, error) {
	d, err := os.MkdirTemp(dir(t), "img-")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(d, "kiln.toml"), []byte(specText), 0o644); err != nil {
		return "", err
	}
	s, err := spec.Load(d)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	t0 := time.Now()
	res, err := build.Build(ctx, s, build.Options{Output: filepath.Join(d, s.Name+".kimg"), Init: KilnInit(t)})
	if err != nil {
		return "", fmt.Errorf("building test image %s: %w", s.Name, err)
	}
	t.Logf("built test image %s in %s (%d bytes)", res.Path, time.Since(t0).Round(time.Millisecond), res.Size)
	return res.Path, nil
}

// NumpyImage returns the path of an image built from NumpySpec.
func NumpyImage(t testing.TB) string { return Image(t, NumpySpec) }

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

var (
	kilnOnce sync.Once
	kilnPath string
	kilnErr  error
)

// Kiln builds the kiln CLI once and returns its path, with kiln-init beside
// it (where the CLI looks for it).
func Kiln(t testing.TB) string {
	t.Helper()
	initBin := KilnInit(t)
	kilnOnce.Do(func() {
		d, err := os.MkdirTemp(dir(t), "bin-")
		if err != nil {
			kilnErr = err
			return
		}
		p := filepath.Join(d, "kiln")
		if kilnErr = goBuild(t, p, "./cmd/kiln", nil); kilnErr != nil {
			return
		}
		b, err := os.ReadFile(initBin)
		if err == nil {
			err = os.WriteFile(filepath.Join(d, "kiln-init"), b, 0o755)
		}
		kilnErr = err
		kilnPath = p
	})
	if kilnErr != nil {
		t.Fatal(kilnErr)
	}
	return kilnPath
}

// goBuild builds the main package pkg of this repository into out.
func goBuild(t testing.TB, out, pkg string, env []string, flags ...string) error {
	cmd := exec.Command("go", append(append([]string{"build"}, flags...), "-o", out, pkg)...)
	cmd.Dir = RepoRoot(t)
	cmd.Env = append(os.Environ(), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return nil
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
