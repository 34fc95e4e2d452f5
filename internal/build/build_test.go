package build

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-dev/kiln/internal/spec"
	"github.com/kiln-dev/kiln/internal/testutil"
)

func TestCheckHost(t *testing.T) {
	tests := []struct {
		goos, goarch string
		ok           bool
	}{
		{"linux", "amd64", true},
		{"linux", "arm64", false},
		{"darwin", "amd64", false},
		{"windows", "amd64", false},
	}
	for _, tt := range tests {
		err := CheckHost(tt.goos, tt.goarch)
		if (err == nil) != tt.ok {
			t.Errorf("CheckHost(%s, %s) = %v, want ok %v", tt.goos, tt.goarch, err, tt.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "x86_64") {
			t.Errorf("CheckHost(%s, %s) = %q, want it to say what to use instead", tt.goos, tt.goarch, err)
		}
	}
}

func TestDroppable(t *testing.T) {
	tests := []struct {
		p    string
		want bool
	}{
		{"/s/usr/lib/python3/dist-packages/torch/bin/test_jit", true},
		{"/s/opt/python/lib/python3.11/site-packages/pkg/helper", true},
		{"/s/usr/lib/python3/dist-packages/torch/lib/libtorch.so", false},
		{"/s/usr/lib/python3/dist-packages/numpy/core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so", false},
		{"/s/usr/lib/x86_64-linux-gnu/libfoo.so.1", false},
		{"/s/usr/bin/python3.11", false},
		{"/elsewhere/usr/lib/python3/dist-packages/x/prog", false},
	}
	for _, tt := range tests {
		if got := droppable("/s", tt.p); got != tt.want {
			t.Errorf("droppable(/s, %s) = %v, want %v", tt.p, got, tt.want)
		}
	}
}

// TestSymlinkTargets: a package symlink that points out of the staged tree
// (Debian's torch/lib/*.so → /usr/lib/x86_64-linux-gnu/…) brings its target.
func TestSymlinkTargets(t *testing.T) {
	root, dir := t.TempDir(), t.TempDir()
	write := func(base, p, data string) {
		t.Helper()
		full := filepath.Join(base, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(base, p, target string) {
		t.Helper()
		full := filepath.Join(base, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, full); err != nil {
			t.Fatal(err)
		}
	}
	write(root, "usr/lib/x86_64-linux-gnu/libdeps.so.1", "deps")
	pkg := "usr/lib/python3/dist-packages/pkg/lib/"
	link(dir, pkg+"libdeps.so", "../../../../x86_64-linux-gnu/libdeps.so.1") // out of the tree
	link(dir, pkg+"libabs.so", "/usr/lib/x86_64-linux-gnu/libdeps.so.1")     // absolute
	write(dir, pkg+"inside.txt", "in")
	link(dir, pkg+"inside", "inside.txt")                                   // resolves in the tree
	link(dir, pkg+"dangling.so", "../../../../x86_64-linux-gnu/libnone.so") // nowhere
	st := &stager{dir: dir, keep: map[string]bool{}}
	n, err := st.symlinkTargets("/usr/lib/python3/dist-packages", root)
	if err != nil {
		t.Fatalf("symlinkTargets() error = %v", err)
	}
	if n != 1 {
		t.Errorf("symlinkTargets() copied %d files, want 1 (two links, one target)", n)
	}
	// Read through the relative link, and at the place the absolute link
	// names inside the image.
	for _, l := range []string{pkg + "libdeps.so", "usr/lib/x86_64-linux-gnu/libdeps.so.1"} {
		got, err := os.ReadFile(filepath.Join(dir, l))
		if err != nil || string(got) != "deps" {
			t.Errorf("reading through %s = %q, %v; want \"deps\"", l, got, err)
		}
	}
}

// TestMkSquashfs: reproducible bytes, and nothing left beside the output.
func TestMkSquashfs(t *testing.T) {
	testutil.NeedTool(t, "mksquashfs", "squashfs-tools")
	tree, outDir := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(tree, "a.py"), []byte("x = 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var imgs [][]byte
	for _, name := range []string{"a.sqfs", "b.sqfs"} {
		out := filepath.Join(outDir, name)
		if err := MkSquashfs(context.Background(), tree, out); err != nil {
			t.Fatalf("MkSquashfs() error = %v", err)
		}
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) < 4 || string(b[:4]) != "hsqs" {
			t.Fatalf("MkSquashfs() wrote %d bytes without the squashfs magic", len(b))
		}
		imgs = append(imgs, b)
	}
	if !bytes.Equal(imgs[0], imgs[1]) {
		t.Errorf("two MkSquashfs runs differ, want identical bytes")
	}
	ents, _ := os.ReadDir(outDir)
	if len(ents) != 2 {
		t.Errorf("output directory holds %d entries, want 2 (no temporary files left)", len(ents))
	}
}

// TestCheckResources: memory beyond the host is a build error naming the
// key; vCPUs beyond the host a warning naming the key.
func TestCheckResources(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	s := &spec.Spec{Memory: "1T", VCPUs: 1}
	if err := checkResources(s, 24000, 2, log); err == nil || !strings.Contains(err.Error(), `key "memory"`) || !strings.Contains(err.Error(), "1T") {
		t.Errorf("checkResources(memory 1T, host 24000 MiB) = %v, want an error naming the key and the value", err)
	}
	s = &spec.Spec{Memory: "512M", VCPUs: 64}
	if err := checkResources(s, 24000, 2, log); err != nil {
		t.Errorf("checkResources(64 vCPUs) = %v, want only a warning", err)
	}
	if !strings.Contains(logs.String(), `key \"vcpus\"`) || !strings.Contains(logs.String(), "64") {
		t.Errorf("checkResources(64 vCPUs on 2 CPUs) logged %q, want a warning naming the key", logs.String())
	}
	logs.Reset()
	if err := checkResources(&spec.Spec{Memory: "512M", VCPUs: 1}, 24000, 2, log); err != nil || logs.Len() != 0 {
		t.Errorf("checkResources(512M, 1 vCPU) = %v, logged %q; want nothing", err, logs.String())
	}
}
