package elfdeps

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func sonames(libs []Lib) map[string]string {
	m := map[string]string{}
	for _, l := range libs {
		m[l.Soname] = l.Path
	}
	return m
}

func TestClosureSystem(t *testing.T) {
	numpy, _ := filepath.Glob("/usr/lib/python3/dist-packages/numpy/core/_multiarray_umath*.so")
	linalg, _ := filepath.Glob("/usr/lib/python3/dist-packages/numpy/linalg/_umath_linalg*.so")
	if len(numpy) == 0 || len(linalg) == 0 {
		t.Fatal("numpy extension not found: apt-get install python3-numpy")
	}
	tests := []struct {
		name  string
		files []string
		want  []string
	}{
		{"python", []string{"/usr/bin/python3.11"}, []string{"libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1"}},
		{"numpy", append(numpy[:1], linalg[0]), []string{"libblas.so.3", "liblapack.so.3", "libc.so.6"}},
		{"non-elf skipped", []string{"/etc/os-release"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &Resolver{Roots: []string{"/"}}
			libs, interp, err := r.Closure(tt.files)
			if err != nil {
				t.Fatalf("Closure(%v) error: %v", tt.files, err)
			}
			got := sonames(libs)
			for _, so := range tt.want {
				p, ok := got[so]
				if !ok {
					t.Errorf("Closure(%v) lacks %s; got %v", tt.files, so, got)
					continue
				}
				if st, err := os.Lstat(p); err != nil || !st.Mode().IsRegular() {
					t.Errorf("Closure(%v): %s path %s is not a regular file (symlinks must be resolved)", tt.files, so, p)
				}
			}
			if tt.name == "python" && !strings.HasSuffix(interp, "ld-linux-x86-64.so.2") {
				t.Errorf("Closure(%v) interp = %q, want ld-linux-x86-64.so.2", tt.files, interp)
			}
			if tt.want == nil && len(libs) != 0 {
				t.Errorf("Closure(%v) = %v, want none", tt.files, libs)
			}
		})
	}
}

// TestAlternativesFallback checks the extracted-.deb case: libblas.so.3 is a
// dangling symlink to /etc/alternatives and only blas/libblas.so.3 exists.
func TestAlternativesFallback(t *testing.T) {
	root := t.TempDir()
	ma := filepath.Join(root, "usr/lib/x86_64-linux-gnu")
	if err := os.MkdirAll(filepath.Join(ma, "blas"), 0o755); err != nil {
		t.Fatal(err)
	}
	real, err := filepath.EvalSymlinks("/usr/lib/x86_64-linux-gnu/libblas.so.3")
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(real)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ma, "blas/libblas.so.3.11.0"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("libblas.so.3.11.0", filepath.Join(ma, "blas/libblas.so.3")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc/alternatives/libblas.so.3-x86_64-linux-gnu", filepath.Join(ma, "libblas.so.3")); err != nil {
		t.Fatal(err)
	}
	r := &Resolver{Roots: []string{root, "/"}}
	lib, ok, err := r.find("libblas.so.3", nil, "/")
	if err != nil || !ok {
		t.Fatalf("find(libblas.so.3) = %v, %v, %v; want found", lib, ok, err)
	}
	if want := filepath.Join(ma, "blas/libblas.so.3.11.0"); lib.Path != want {
		t.Errorf("find(libblas.so.3).Path = %s, want %s (the earlier root wins)", lib.Path, want)
	}
}

func gcc(t *testing.T, args ...string) {
	t.Helper()
	cmd := exec.Command("gcc", args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("gcc %v: %v\n%s", args, err, out)
	}
}

func TestClosureOriginAndMissing(t *testing.T) {
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Fatal("gcc not found: apt-get install gcc")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "foo.c")
	if err := os.WriteFile(src, []byte("int foo(void){return 42;}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	main := filepath.Join(dir, "main.c")
	if err := os.WriteFile(main, []byte("int foo(void);\nint main(void){return foo()-42;}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "lib"), 0o755); err != nil {
		t.Fatal(err)
	}
	lib := filepath.Join(dir, "lib/libkilnfoo.so")
	gcc(t, "-shared", "-fPIC", "-Wl,-soname,libkilnfoo.so.1", "-o", lib, src)
	if err := os.Symlink("libkilnfoo.so", filepath.Join(dir, "lib/libkilnfoo.so.1")); err != nil {
		t.Fatal(err)
	}
	prog := filepath.Join(dir, "prog")
	gcc(t, "-o", prog, main, "-L"+filepath.Join(dir, "lib"), "-lkilnfoo", "-Wl,-rpath,$ORIGIN/lib")
	if out, err := exec.Command(prog).CombinedOutput(); err != nil {
		t.Fatalf("running %s: %v\n%s", prog, err, out)
	}

	r := &Resolver{Roots: []string{"/"}}
	libs, interp, err := r.Closure([]string{prog})
	if err != nil {
		t.Fatalf("Closure(prog) error: %v", err)
	}
	got := sonames(libs)
	if got["libkilnfoo.so.1"] != lib {
		t.Errorf("Closure(prog)[libkilnfoo.so.1] = %q, want %q", got["libkilnfoo.so.1"], lib)
	}
	if _, ok := got["libc.so.6"]; !ok {
		t.Errorf("Closure(prog) lacks libc.so.6: %v", got)
	}
	if interp == "" {
		t.Errorf("Closure(prog) interp empty")
	}

	// Remove the library: the closure must name it and the program.
	if err := os.Remove(filepath.Join(dir, "lib/libkilnfoo.so.1")); err != nil {
		t.Fatal(err)
	}
	_, _, err = r.Closure([]string{prog})
	var me *MissingError
	if !errors.As(err, &me) || me.Soname != "libkilnfoo.so.1" || me.File != prog {
		t.Fatalf("Closure(prog) without lib error = %v, want MissingError{libkilnfoo.so.1, %s}", err, prog)
	}
	if !strings.Contains(err.Error(), "libkilnfoo.so.1") || !strings.Contains(err.Error(), prog) {
		t.Errorf("error %q does not name library and file", err)
	}
}

func TestResolveIn(t *testing.T) {
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "usr/lib"), 0o755))
	must(os.WriteFile(filepath.Join(root, "usr/lib/real"), []byte("x"), 0o644))
	must(os.Symlink("usr/lib", filepath.Join(root, "lib")))
	must(os.Symlink("/lib/real", filepath.Join(root, "usr/lib/abs")))
	must(os.Symlink("../lib/real", filepath.Join(root, "usr/lib/rel")))
	must(os.Symlink("/etc/alternatives/nothing", filepath.Join(root, "usr/lib/dangling")))
	must(os.Symlink("loop", filepath.Join(root, "usr/lib/loop")))
	want := filepath.Join(root, "usr/lib/real")
	tests := []struct {
		p    string
		want string
		ok   bool
	}{
		{"/usr/lib/real", want, true},
		{"/lib/real", want, true},
		{"/usr/lib/abs", want, true},
		{"/lib/rel", want, true},
		{"/usr/lib/dangling", "", false},
		{"/usr/lib/loop", "", false},
		{"/../../usr/lib/real", want, true},
		{"/usr/lib", "", false},
	}
	for _, tt := range tests {
		got, ok := ResolveIn(root, tt.p)
		if got != tt.want || ok != tt.ok {
			t.Errorf("ResolveIn(root, %q) = %q, %v; want %q, %v", tt.p, got, ok, tt.want, tt.ok)
		}
	}
}

func TestIsELF(t *testing.T) {
	tests := []struct {
		p    string
		want bool
	}{
		{"/usr/bin/python3.11", true},
		{"/etc/os-release", false},
		{"/nonexistent", false},
	}
	for _, tt := range tests {
		if got := IsELF(tt.p); got != tt.want {
			t.Errorf("IsELF(%q) = %v, want %v", tt.p, got, tt.want)
		}
	}
}

func TestLdSoConf(t *testing.T) {
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "etc/ld.so.conf.d"), 0o755))
	must(os.WriteFile(filepath.Join(root, "etc/ld.so.conf"), []byte("# c\n/opt/a\ninclude /etc/ld.so.conf.d/*.conf\n"), 0o644))
	must(os.WriteFile(filepath.Join(root, "etc/ld.so.conf.d/b.conf"), []byte("/opt/b # x\n\n/opt/c:/opt/d\n"), 0o644))
	must(os.WriteFile(filepath.Join(root, "etc/ld.so.conf.d/a.conf"), []byte("/opt/e\n"), 0o644))
	r := &Resolver{}
	got, err := r.ldSoConf(root)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/opt/a", "/opt/e", "/opt/b", "/opt/c", "/opt/d"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("ldSoConf = %v, want %v", got, want)
	}
}
