package build

import (
	"archive/zip"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kiln-dev/kiln/internal/spec"

	"github.com/kiln-dev/kiln/internal/testutil"
)

// bwrapRun runs a command with the staged tree as its root filesystem, the
// way the guest sees it (read-only), and returns its trimmed output.
func bwrapRun(t *testing.T, dir string, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("bwrap"); err != nil {
		t.Fatal("bwrap not found: apt-get install bubblewrap")
	}
	full := append([]string{"--ro-bind", dir, "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
		"--clearenv", "--setenv", "PATH", "/usr/bin", "--"}, args...)
	out, err := exec.Command("bwrap", full...).CombinedOutput()
	if err != nil {
		t.Fatalf("bwrap %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// treeListing describes every entry of a tree: type, mode, content hash or link target.
func treeListing(t *testing.T, root string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			m[rel] = "link " + l
		case d.IsDir():
			m[rel] = fmt.Sprintf("dir %v", fi.Mode().Perm())
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			m[rel] = fmt.Sprintf("file %v %x", fi.Mode().Perm(), sum[:8])
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// writeWheel writes a minimal pure-Python wheel by hand into dir.
func writeWheel(t *testing.T, dir, name, version string, files map[string]string) {
	t.Helper()
	di := fmt.Sprintf("%s-%s.dist-info", name, version)
	all := map[string]string{}
	for k, v := range files {
		all[k] = v
	}
	all[di+"/METADATA"] = fmt.Sprintf("Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: kiln test\n\n", name, version)
	all[di+"/WHEEL"] = "Wheel-Version: 1.0\nGenerator: kiln-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
	var record strings.Builder
	var names []string
	for k := range all {
		names = append(names, k)
	}
	for _, k := range names {
		sum := sha256.Sum256([]byte(all[k]))
		fmt.Fprintf(&record, "%s,sha256=%s,%d\n", k, base64.RawURLEncoding.EncodeToString(sum[:]), len(all[k]))
	}
	record.WriteString(di + "/RECORD,,\n")
	all[di+"/RECORD"] = record.String()
	f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%s-py3-none-any.whl", name, version)))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zw := zip.NewWriter(f)
	for k, v := range all {
		w, err := zw.Create(k)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func TestStageDebianNumpy(t *testing.T) {
	testutil.NeedNetwork(t)
	dir := filepath.Join(t.TempDir(), "rootfs")
	s := &spec.Spec{Name: "np", Python: "/usr/bin/python3", Debian: []string{"python3-numpy"}, Dir: t.TempDir()}
	var steps []string
	st, err := StageRootfs(context.Background(), s, StageOptions{
		Agent:    []byte("print('agent')\n"),
		Progress: func(step, detail string) { steps = append(steps, step+":"+detail) },
	}, dir)
	if err != nil {
		t.Fatalf("StageRootfs: %v", err)
	}
	t.Logf("stage: %+v", st)
	t.Logf("steps: %q", steps)
	if got := bwrapRun(t, dir, "/usr/bin/python3", "-c", "import numpy; print(numpy.arange(10).sum())"); got != "45" {
		t.Errorf("numpy in staged tree printed %q, want 45", got)
	}
	// linalg needs liblapack, reached through Debian's alternatives.
	if got := bwrapRun(t, dir, "/usr/bin/python3", "-c", "import numpy; print(round(float(numpy.linalg.det(numpy.eye(3)*2))))"); got != "8" {
		t.Errorf("numpy.linalg in staged tree printed %q, want 8", got)
	}
	// Byte-code records guest paths and is used (unchecked-hash pycs).
	code := `import json, marshal, importlib.util as u
f = json.__cached__
print(f, marshal.loads(open(f, "rb").read()[16:]).co_filename)`
	want := "/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc /usr/lib/python3.11/json/__init__.py"
	if got := bwrapRun(t, dir, "/usr/bin/python3", "-c", code); got != want {
		t.Errorf("json bytecode = %q, want %q", got, want)
	}
	want2 := st.PythonVersion + " /usr/bin/python3.11 kiln"
	if got := bwrapRun(t, dir, "/usr/bin/python3", "-c", "import os, sys, platform, socket; print(platform.python_version(), os.path.realpath(sys.executable), open('/etc/hostname').read().strip())"); got != want2 {
		t.Errorf("python in staged tree printed %q, want %q", got, want2)
	}
	if st.PythonVersion != "3.11.2" || st.PythonExe != "/usr/bin/python3.11" || !st.Debian {
		t.Errorf("Stage python = %q %q %v, want 3.11.2 /usr/bin/python3.11 true", st.PythonVersion, st.PythonExe, st.Debian)
	}
	found := false
	for _, d := range st.Distributions {
		if d.Name == "numpy" && d.Source == "debian" && d.Version != "" {
			found = true
		}
	}
	if !found {
		t.Errorf("Distributions = %v, want numpy from debian", st.Distributions)
	}
	if st.Files < 100 || st.TreeBytes < 10<<20 {
		t.Errorf("Stage Files=%d TreeBytes=%d, want a real tree", st.Files, st.TreeBytes)
	}
	for _, p := range []string{"usr/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2", "usr/lib/x86_64-linux-gnu/libblas.so.3",
		"usr/lib/x86_64-linux-gnu/liblapack.so.3", "usr/lib/kiln/agent.py", "etc/passwd", "etc/group", "etc/nsswitch.conf", "proc", "sys", "dev", "tmp", "run", "var/tmp", "root", "home"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			t.Errorf("staged tree lacks %s: %v", p, err)
		}
	}
	for _, p := range []string{"usr/lib/python3/dist-packages/pip", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/lib2to3",
		"usr/lib/python3/dist-packages/numpy/core/tests", "usr/lib/python3.11/config-3.11-x86_64-linux-gnu"} {
		if exists(filepath.Join(dir, p)) {
			t.Errorf("staged tree has %s, want it left out or pruned", p)
		}
	}
	for _, l := range [][2]string{{"bin", "usr/bin"}, {"lib", "usr/lib"}, {"lib64", "usr/lib64"}, {"sbin", "usr/sbin"}, {"usr/bin/python3", "python3.11"}} {
		if got, err := os.Readlink(filepath.Join(dir, l[0])); err != nil || got != l[1] {
			t.Errorf("Readlink(%s) = %q, %v; want %q", l[0], got, err, l[1])
		}
	}
	if fi, err := os.Lstat(filepath.Join(dir, "usr/lib/x86_64-linux-gnu/libc.so.6")); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("libc.so.6 is not a regular file under its soname: %v", err)
	}
}

// TestStagePipDeterministic stages a pip requirement from a local wheel twice
// and checks both trees are identical and that their erofs images match.
func TestStagePipDeterministic(t *testing.T) {
	testutil.NeedTool(t, "mkfs.erofs", "erofs-utils")
	project := t.TempDir()
	wheels := filepath.Join(project, "wheels")
	if err := os.MkdirAll(wheels, 0o755); err != nil {
		t.Fatal(err)
	}
	writeWheel(t, wheels, "kilnhello", "1.0", map[string]string{
		"kilnhello/__init__.py":     "X = {'a', 'b', 'c', 'd'}\nANSWER = 42\n",
		"kilnhello/tests/test_x.py": "def test(): pass\n",
		"kilnhello/data/thing.txt":  "hello\n",
	})
	if err := os.MkdirAll(filepath.Join(project, "app"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(project, "app/main.py"), []byte("import kilnhello\nprint(kilnhello.ANSWER)\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(project, "run.sh"), []byte("#!/bin/sh\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	s := &spec.Spec{
		Name: "pip", Python: "/usr/bin/python3", Dir: project,
		Requirements: []string{"kilnhello==1.0"},
		PipArgs:      []string{"--no-index", "--find-links", "./wheels"},
		Files:        map[string]string{"app": "/app", "run.sh": "/usr/local/bin/"},
	}
	var trees []string
	for i := range 2 {
		dir := filepath.Join(t.TempDir(), fmt.Sprintf("rootfs%d", i))
		st, err := StageRootfs(context.Background(), s, StageOptions{Agent: []byte("pass\n")}, dir)
		if err != nil {
			t.Fatalf("StageRootfs #%d: %v", i, err)
		}
		// Every image also carries Debian's dash as /bin/sh, at whatever
		// version apt offers.
		shell := Distribution{Name: ShellPackage, Source: "debian-package"}
		for _, d := range st.Distributions {
			if d.Name == ShellPackage {
				shell.Version = d.Version
			}
		}
		if diff := cmp.Diff([]Distribution{shell, {Name: "kilnhello", Version: "1.0", Source: "pip"}}, st.Distributions); diff != "" || shell.Version == "" {
			t.Errorf("Distributions mismatch (-want +got):\n%s", diff)
		}
		trees = append(trees, dir)
	}
	if got := bwrapRun(t, trees[0], "/usr/bin/python3", "/app/main.py"); got != "42" {
		t.Errorf("/app/main.py printed %q, want 42", got)
	}
	site := filepath.Join(trees[0], "usr/local/lib/python3.11/dist-packages")
	if !exists(filepath.Join(site, "kilnhello/__pycache__/__init__.cpython-311.pyc")) {
		t.Errorf("kilnhello was not byte-compiled")
	}
	if exists(filepath.Join(site, "kilnhello/tests")) || exists(filepath.Join(site, "bin")) {
		t.Errorf("pip target not pruned (tests/ or bin/ left)")
	}
	if fi, err := os.Stat(filepath.Join(trees[0], "usr/local/bin/run.sh")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("run.sh staged as %v, %v; want mode 0755", fi, err)
	}
	if fi, err := os.Stat(filepath.Join(trees[0], "app/main.py")); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("app/main.py staged as %v, %v; want mode 0644", fi, err)
	}
	if diff := cmp.Diff(treeListing(t, trees[0]), treeListing(t, trees[1])); diff != "" {
		t.Errorf("two stagings differ (-first +second):\n%s", diff)
	}

	// MkErofs: same tree twice and the two identical trees give identical bytes.
	out := t.TempDir()
	var imgs [][]byte
	for i, tree := range []string{trees[0], trees[0], trees[1]} {
		img := filepath.Join(out, fmt.Sprintf("r%d.erofs", i))
		if err := MkErofs(context.Background(), tree, img, ""); err != nil {
			t.Fatalf("MkErofs: %v", err)
		}
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, b)
	}
	for i := 1; i < len(imgs); i++ {
		if a, b := sha256.Sum256(imgs[0]), sha256.Sum256(imgs[i]); a != b {
			t.Errorf("MkErofs image %d sha256 = %s, want %s (reproducible)", i, hex.EncodeToString(b[:]), hex.EncodeToString(a[:]))
		}
	}
}

func TestStageErrors(t *testing.T) {
	project := t.TempDir()
	if err := os.MkdirAll(filepath.Join(project, "wheels"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		s    spec.Spec
		want []string
	}{
		{"missing absolute interpreter", spec.Spec{Python: "/nonexistent/python3.11"}, []string{"/nonexistent/python3.11", "not found"}},
		{"missing interpreter on PATH", spec.Spec{Python: "kiln-no-such-python"}, []string{`"kiln-no-such-python" not found`}},
		{"debian with non-Debian python", spec.Spec{Python: "python3", Debian: []string{"python3-numpy"}},
			[]string{"debian packages only fit Debian's own interpreter /usr/bin/python3"}},
		{"pip offline", spec.Spec{Python: "/usr/bin/python3", Requirements: []string{"kiln-no-such-dist"}, PipArgs: []string{"--no-index", "--find-links", "./wheels"}},
			[]string{"kiln-no-such-dist", pipHint}},
		{"missing file", spec.Spec{Python: "/usr/bin/python3", Files: map[string]string{"nope.txt": "/nope.txt"}}, []string{"nope.txt", "fix the source path"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := tt.s
			s.Name, s.Dir = "e", project
			_, err := StageRootfs(context.Background(), &s, StageOptions{}, filepath.Join(t.TempDir(), "rootfs"))
			if err == nil {
				t.Fatalf("StageRootfs(%s) succeeded, want error", tt.name)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("StageRootfs(%s) error = %q, want it to contain %q", tt.name, err, w)
				}
			}
		})
	}
}

// TestStageRelocated stages a venv of a non-Debian interpreter (the pyenv
// python3 on PATH) into /opt/python and runs it under bwrap.
func TestStageRelocated(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Fatal("python3 not on PATH")
	}
	info, err := probePython(context.Background(), py)
	if err != nil {
		t.Fatal(err)
	}
	if info.Debian {
		t.Skip("python3 on PATH is Debian's own: no relocatable interpreter to test")
	}
	venv := filepath.Join(t.TempDir(), "venv")
	if out, err := exec.Command(py, "-m", "venv", "--without-pip", venv).CombinedOutput(); err != nil {
		t.Fatalf("creating venv: %v\n%s", err, out)
	}
	site := filepath.Join(venv, "lib", "python"+info.short(), "site-packages")
	if err := os.MkdirAll(filepath.Join(site, "kilnvenv"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(site, "kilnvenv/__init__.py"), []byte("X = 7\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "rootfs")
	s := &spec.Spec{Name: "v", Python: filepath.Join(venv, "bin/python"), Dir: t.TempDir()}
	st, err := StageRootfs(context.Background(), s, StageOptions{}, dir)
	if err != nil {
		t.Fatalf("StageRootfs: %v", err)
	}
	v := "python" + info.short()
	if st.Debian || st.PythonExe != "/opt/python/bin/"+v {
		t.Errorf("Stage = Debian %v exe %q, want false /opt/python/bin/%s", st.Debian, st.PythonExe, v)
	}
	got := bwrapRun(t, dir, "/usr/bin/python3", "-c", "import sys, json, ssl, sqlite3, ctypes, kilnvenv; print(sys.prefix, kilnvenv.X)")
	if got != "/opt/python 7" {
		t.Errorf("relocated python printed %q, want %q", got, "/opt/python 7")
	}
	if exists(filepath.Join(dir, "opt/python/lib", v, "tkinter")) {
		t.Errorf("tkinter not pruned")
	}
}

func TestPruneRules(t *testing.T) {
	type entry struct {
		rel string
		dir bool
	}
	tests := []struct {
		keep  []string
		stdl  map[entry]bool // entry -> skipped by skipStdlib
		sites map[entry]bool // entry -> skipped by skipSite
	}{
		{nil,
			map[entry]bool{{"test", true}: true, {"idlelib", true}: true, {"tkinter", true}: true, {"turtledemo", true}: true,
				{"ensurepip", true}: true, {"config-3.11-x86_64-linux-gnu", true}: true, {"lib2to3", true}: true, {"pydoc_data", true}: true,
				{"site-packages", true}: true, {"json", true}: false, {"json/__pycache__", true}: true, {"os.py", false}: false, {"os.pyc", false}: true,
				{"lib-dynload/_tkinter.cpython-311-x86_64-linux-gnu.so", false}: true, {"lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so", false}: false,
				{"email/test", true}: false},
			map[entry]bool{{"numpy/core/tests", true}: true, {"pkg/test", true}: true, {"tests", true}: true, {"numpy/testing", true}: false,
				{"pkg/tests.py", false}: false, {"pkg/__pycache__", true}: true}},
		{[]string{"test", "tkinter", "config", "tests", "idlelib"},
			map[entry]bool{{"test", true}: false, {"tkinter", true}: false, {"turtledemo", true}: false, {"config-3.11", true}: false,
				{"idlelib", true}: false, {"lib2to3", true}: true, {"lib-dynload/_tkinter.cpython-311-x86_64-linux-gnu.so", false}: false},
			map[entry]bool{{"numpy/core/tests", true}: false, {"pkg/test", true}: false}},
	}
	for _, tt := range tests {
		st := &stager{keep: map[string]bool{}}
		for _, k := range tt.keep {
			st.keep[k] = true
		}
		for e, want := range tt.stdl {
			if got := st.skipStdlib(e.rel, fakeEntry{path.Base(e.rel), e.dir}); got != want {
				t.Errorf("keep %v: skipStdlib(%q) = %v, want %v", tt.keep, e.rel, got, want)
			}
		}
		for e, want := range tt.sites {
			if got := st.skipSite(e.rel, fakeEntry{path.Base(e.rel), e.dir}); got != want {
				t.Errorf("keep %v: skipSite(%q) = %v, want %v", tt.keep, e.rel, got, want)
			}
		}
	}
}

type fakeEntry struct {
	name string
	dir  bool
}

func (f fakeEntry) Name() string { return f.name }
func (f fakeEntry) IsDir() bool  { return f.dir }
func (f fakeEntry) Type() fs.FileMode {
	if f.dir {
		return fs.ModeDir
	}
	return 0
}
func (f fakeEntry) Info() (fs.FileInfo, error) { return nil, fs.ErrInvalid }

func TestParseMetadata(t *testing.T) {
	tests := []struct {
		in   string
		want Distribution
	}{
		{"Metadata-Version: 2.1\nName: numpy\nVersion: 1.24.2\nSummary: x\n\nName: body\n", Distribution{Name: "numpy", Version: "1.24.2"}},
		{"Name:   spaced  \r\nversion: 2\n", Distribution{Name: "spaced", Version: "2"}},
		{"garbage", Distribution{}},
		{"", Distribution{}},
		{"\nName: after-blank\n", Distribution{}},
	}
	for _, tt := range tests {
		if got := parseMetadata(strings.NewReader(tt.in)); got != tt.want {
			t.Errorf("parseMetadata(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
	}
}

func FuzzParseMetadata(f *testing.F) {
	f.Add("Metadata-Version: 2.1\nName: numpy\nVersion: 1.24.2\n\nbody")
	f.Add("Name: a\nName: b\n")
	f.Add(":\n:")
	f.Fuzz(func(t *testing.T, s string) {
		d := parseMetadata(strings.NewReader(s))
		if d.Name != strings.TrimSpace(d.Name) || d.Version != strings.TrimSpace(d.Version) {
			t.Fatalf("parseMetadata(%q) = %+v: untrimmed", s, d)
		}
	})
}

// TestStageDebianLibrary: a Debian package that is not a Python package
// (libgomp1) lands in the image, with its library, and the build checks
// preload modules inside the staged tree.
func TestStageDebianLibrary(t *testing.T) {
	testutil.NeedNetwork(t)
	dir := filepath.Join(t.TempDir(), "rootfs")
	s := &spec.Spec{Name: "gomp", Python: "/usr/bin/python3", Debian: []string{"libgomp1"}, Dir: t.TempDir()}
	st, err := StageRootfs(context.Background(), s, StageOptions{}, dir)
	if err != nil {
		t.Fatalf("StageRootfs(debian = [\"libgomp1\"]): %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "usr/lib/x86_64-linux-gnu/libgomp.so.1")); err != nil {
		t.Errorf("staged tree lacks libgomp1's library: %v", err)
	}
	if exists(filepath.Join(dir, "usr/share/doc/libgomp1")) {
		t.Errorf("staged tree has libgomp1's documentation, want it left out")
	}
	found := false
	for _, d := range st.Distributions {
		found = found || d.Name == "libgomp1" && d.Source == "debian-package" && d.Version != ""
	}
	if !found {
		t.Errorf("Distributions = %v, want libgomp1 as a Debian package", st.Distributions)
	}
	if got := bwrapRun(t, dir, "/usr/bin/python3", "-c", "import ctypes; ctypes.CDLL('libgomp.so.1'); print('ok')"); got != "ok" {
		t.Errorf("loading libgomp.so.1 in the staged tree printed %q, want ok", got)
	}

	s.Preload = []string{"json", "nosuchmodule_kiln"}
	_, err = checkPreload(context.Background(), s, dir, st.PythonExe, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), `key "preload"`) || !strings.Contains(err.Error(), "nosuchmodule_kiln: ModuleNotFoundError") || strings.Contains(err.Error(), "json") {
		t.Errorf("checkPreload(json, nosuchmodule_kiln) = %v, want an error naming the key, nosuchmodule_kiln and its ImportError only", err)
	}
	s.Preload = []string{"json"}
	if detail, err := checkPreload(context.Background(), s, dir, st.PythonExe, slog.New(slog.DiscardHandler)); err != nil || detail != "1 modules import" {
		t.Errorf("checkPreload(json) = %q, %v; want success", detail, err)
	}
}
