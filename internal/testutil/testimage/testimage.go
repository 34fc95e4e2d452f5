// Package testimage builds the kiln images end-to-end tests boot, once per test binary.
package testimage

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/build"
	"github.com/kiln-dev/kiln/internal/spec"
	"github.com/kiln-dev/kiln/internal/testutil"
)

// NumpySpec is the spec of the test image: Debian's numpy on Debian's
// python, with the default kernel (kiln's own).
const NumpySpec = `name = "numpy-test"
python = "/usr/bin/python3"
debian = ["python3-numpy"]
env = { OMP_NUM_THREADS = "1" }
memory = "512M"
vcpus = 1
`

// DebianKernelSpec is NumpySpec with Debian's cloud kernel: the other
// kernel, smoke-tested where the default one is tested in depth.
const DebianKernelSpec = NumpySpec + `kernel = "debian"
`

var (
	imgMu   sync.Mutex
	imgPath = map[string]string{}
	imgErr  = map[string]error{}
)

// Image builds the image of specText once per test binary and returns its
// path, for a test that boots it: the test is gated with NeedQEMU (and the
// build with NeedTool and NeedNetwork). Builds are bounded to 30 minutes:
// the first one on a machine may build kiln's kernel (scripts/test.sh
// builds it before the tests, so there it is a cache lookup).
func Image(t testing.TB, specText string) string {
	t.Helper()
	testutil.NeedQEMU(t)
	testutil.NeedTool(t, "mkfs.erofs", "erofs-utils")
	testutil.NeedNetwork(t)
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
	d, err := os.MkdirTemp(testutil.TempDir(t), "img-")
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	t0 := time.Now()
	res, err := build.Build(ctx, s, build.Options{Output: filepath.Join(d, s.Name+".kimg"), Init: testutil.KilnInit(t)})
	if err != nil {
		return "", fmt.Errorf("building test image %s: %w", s.Name, err)
	}
	t.Logf("built test image %s in %s (%d bytes)", res.Path, time.Since(t0).Round(time.Millisecond), res.Size)
	return res.Path, nil
}

// Numpy returns the path of an image built from NumpySpec.
func Numpy(t testing.TB) string { return Image(t, NumpySpec) }

// NumpyDebianKernel returns the path of an image built from DebianKernelSpec.
func NumpyDebianKernel(t testing.TB) string { return Image(t, DebianKernelSpec) }
