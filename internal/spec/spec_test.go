package spec

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const example = `name = "numpy-demo"
python = "/usr/bin/python3"
debian = ["python3-numpy"]
requirements = ["six==1.16.0"]
pip_args = ["--no-index", "--find-links", "./wheels"]
files = { "src/" = "/app" }
env = { OMP_NUM_THREADS = "1" }
command = ["python3", "-m", "app"]
memory = "512M"
vcpus = 1
preload = ["numpy"]
`

func TestParseExample(t *testing.T) {
	dir := t.TempDir()
	got, err := Parse([]byte(example), "kiln.toml", dir)
	if err != nil {
		t.Fatalf("Parse(example) error: %v", err)
	}
	want := &Spec{
		Name:         "numpy-demo",
		Python:       "/usr/bin/python3",
		Debian:       []string{"python3-numpy"},
		Requirements: []string{"six==1.16.0"},
		PipArgs:      []string{"--no-index", "--find-links", "./wheels"},
		Files:        map[string]string{"src/": "/app"},
		Env:          map[string]string{"OMP_NUM_THREADS": "1"},
		Command:      []string{"python3", "-m", "app"},
		Memory:       "512M",
		VCPUs:        1,
		Preload:      []string{"numpy"},
		Compression:  "lz4hc",
		Kernel:       "minimal",
		Dir:          dir,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Parse(example) mismatch (-want +got):\n%s", diff)
	}
	if got.MemoryMiB() != 512 {
		t.Errorf("MemoryMiB() = %d, want 512", got.MemoryMiB())
	}
	if err := got.Validate(); err != nil {
		t.Errorf("Validate() on parsed spec = %v, want nil", err)
	}
}

func TestParseDefaults(t *testing.T) {
	tests := []struct {
		name, doc string
		want      Spec
	}{
		{"minimal", `name = "a"`, Spec{Name: "a", Python: "python3", Memory: "512M", VCPUs: 1, Compression: "lz4hc", Kernel: "minimal"}},
		{"debian picks Debian python", "name = \"a\"\ndebian = [\"python3-six\"]",
			Spec{Name: "a", Python: "/usr/bin/python3", Debian: []string{"python3-six"}, Memory: "512M", VCPUs: 1, Compression: "lz4hc", Kernel: "minimal"}},
		{"explicit python kept", "name = \"a\"\npython = \"python3.12\"\ndebian = [\"python3-six\"]",
			Spec{Name: "a", Python: "python3.12", Debian: []string{"python3-six"}, Memory: "512M", VCPUs: 1, Compression: "lz4hc", Kernel: "minimal"}},
		{"overrides", "name = \"a\"\nmemory = \"1g\"\nvcpus = 4\ncompression = \"none\"\nkeep = [\"tests\", \"lib2to3\"]\nkernel = \"debian\"",
			Spec{Name: "a", Python: "python3", Memory: "1g", VCPUs: 4, Compression: "none", Kernel: "debian", Keep: []string{"tests", "lib2to3"}}},
		{"files as table", "name = \"a\"\n[files]\n\"src/\" = \"/app\"\n\"x.py\" = \"/app/x.py\"",
			Spec{Name: "a", Python: "python3", Memory: "512M", VCPUs: 1, Compression: "lz4hc", Kernel: "minimal", Files: map[string]string{"src/": "/app", "x.py": "/app/x.py"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.doc), "kiln.toml", "/spec")
			if err != nil {
				t.Fatalf("Parse(%q) error: %v", tt.doc, err)
			}
			tt.want.Dir = "/spec"
			if diff := cmp.Diff(&tt.want, got); diff != "" {
				t.Errorf("Parse(%q) mismatch (-want +got):\n%s", tt.doc, diff)
			}
		})
	}
}

func TestRequirementsFile(t *testing.T) {
	got, err := Parse([]byte("name = \"a\"\nrequirements = \"reqs/requirements.txt\""), "kiln.toml", "/spec")
	if err != nil {
		t.Fatalf("Parse error: %v", err)
	}
	if want := "/spec/reqs/requirements.txt"; got.RequirementsFile != want {
		t.Errorf("RequirementsFile = %q, want %q", got.RequirementsFile, want)
	}
	if got.Requirements != nil {
		t.Errorf("Requirements = %q, want nil", got.Requirements)
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, doc string
		want      []string // substrings, all must appear
	}{
		{"unknown key", "name = \"a\"\n\nfoo = 1", []string{`kiln.toml:3: unknown key "foo"`}},
		{"typo suggestion", "name = \"a\"\nvcpu = 2", []string{`kiln.toml:2: unknown key "vcpu"`, `did you mean "vcpus"`}},
		{"unknown table", "name = \"a\"\n[extra]\nx = 1", []string{`kiln.toml:2: unknown key "extra"`}},
		{"two unknown keys", "foo = 1\nname = \"a\"\nbar = 2", []string{`kiln.toml:1: unknown key "foo"`, `kiln.toml:3: unknown key "bar"`}},
		{"vcpus string", "name = \"a\"\n\n\n\nvcpus = \"2\"", []string{`kiln.toml:5: key "vcpus": expected integer, got string`}},
		{"vcpus float", "name = \"a\"\nvcpus = 1.5", []string{`kiln.toml:2: key "vcpus": expected integer, got float`}},
		{"name integer", "name = 1", []string{`kiln.toml:1: key "name": expected string, got integer`}},
		{"debian string", "name = \"a\"\ndebian = \"python3-numpy\"", []string{`kiln.toml:2: key "debian": expected array of strings, got string`}},
		{"debian element", "name = \"a\"\ndebian = [1]", []string{`kiln.toml:2: key "debian": expected string, got integer`}},
		{"env value int", "name = \"a\"\nenv = { A = 1 }", []string{`kiln.toml:2: key "env": expected string, got integer`}},
		{"memory int", "name = \"a\"\nmemory = 512", []string{`kiln.toml:2: key "memory": expected string, got integer`}},
		{"requirements int", "name = \"a\"\n\nrequirements = 3", []string{`kiln.toml:3: key "requirements": expected array of strings or a requirements file path, got integer`}},
		{"requirements element", "name = \"a\"\nrequirements = [\n  \"six\",\n  2,\n]", []string{`kiln.toml:2: key "requirements": element 1: expected string, got integer`}},
		{"requirements empty string", "name = \"a\"\nrequirements = \"\"", []string{`kiln.toml:2: key "requirements"`, "empty string"}},
		{"requirements newline", "name = \"a\"\nrequirements = [\"six\\nnumpy\"]", []string{`kiln.toml:2: key "requirements"`, "not a valid requirement"}},
		{"syntax", "name = \"a\"\nvcpus = ", []string{`kiln.toml:2: syntax error`}},
		{"duplicate", "name = \"a\"\nname = \"b\"", []string{`kiln.toml:2: key "name": key name is already defined`}},
		{"missing name", "vcpus = 1", []string{`kiln.toml: missing required key "name"`}},
		{"bad name", "\nname = \"-x\"", []string{`kiln.toml:2: key "name": "-x" must start`}},
		{"name with slash", "name = \"a/b\"", []string{`kiln.toml:1: key "name": "a/b"`}},
		{"vcpus zero", "name = \"a\"\nvcpus = 0", []string{`kiln.toml:2: key "vcpus": must be between 1 and 64, got 0`}},
		{"vcpus big", "name = \"a\"\nvcpus = 65", []string{`kiln.toml:2: key "vcpus": must be between 1 and 64, got 65`}},
		{"memory garbage", "name = \"a\"\nmemory = \"lots\"", []string{`kiln.toml:2: key "memory": invalid size "lots"`}},
		{"memory unit", "name = \"a\"\nmemory = \"5X\"", []string{`kiln.toml:2: key "memory": invalid size "5X": unknown unit "X"`}},
		{"memory small", "name = \"a\"\nmemory = \"64M\"", []string{`kiln.toml:2: key "memory": "64M" is below the minimum of 128M`}},
		{"memory empty", "name = \"a\"\nmemory = \"\"", []string{`kiln.toml:2: key "memory": invalid size ""`}},
		{"compression", "name = \"a\"\ncompression = \"zstd\"", []string{`kiln.toml:2: key "compression": "zstd" is not one of none, lz4, lz4hc`}},
		{"kernel", "name = \"a\"\nkernel = \"tiny\"", []string{`kiln.toml:2: key "kernel": "tiny" is not one of minimal, debian`}},
		{"kernel type", "name = \"a\"\nkernel = 1", []string{`kiln.toml:2: key "kernel": expected string`}},
		{"debian name", "name = \"a\"\ndebian = [\"Python3\"]", []string{`kiln.toml:2: key "debian": "Python3" is not a valid Debian package name`}},
		{"debian option", "name = \"a\"\ndebian = [\"-y\"]", []string{`kiln.toml:2: key "debian": "-y"`}},
		{"preload", "name = \"a\"\npreload = [\"numpy\", \"scipy..linalg\"]", []string{`kiln.toml:2: key "preload": "scipy..linalg" is not a Python module name`}},
		{"preload comma", "name = \"a\"\npreload = [\"a,b\"]", []string{`kiln.toml:2: key "preload": "a,b"`}},
		{"keep", "name = \"a\"\nkeep = [\"docs\"]", []string{`kiln.toml:2: key "keep": "docs" is not one of tests`}},
		{"env key", "name = \"a\"\nenv = { \"1A\" = \"x\" }", []string{`kiln.toml:2: key "env": "1A" is not a valid environment variable name`}},
		{"files dest relative", "name = \"a\"\nfiles = { \"src/\" = \"app\" }", []string{`kiln.toml:2: key "files": destination "app" for "src/" must be an absolute guest path`}},
		{"files dest dotdot", "name = \"a\"\nfiles = { \"src/\" = \"/app/../etc\" }", []string{`kiln.toml:2: key "files": destination "/app/../etc"`, `".."`}},
		{"files src escapes", "name = \"a\"\n[files]\n\"x\" = \"/x\"\n\"../secret\" = \"/s\"", []string{`kiln.toml:4: key "files": source "../secret" must be a path relative to the spec directory`}},
		{"files src absolute", "name = \"a\"\nfiles = { \"/etc/passwd\" = \"/p\" }", []string{`kiln.toml:2: key "files": source "/etc/passwd"`}},
		{"files src empty", "name = \"a\"\nfiles = { \"\" = \"/p\" }", []string{`kiln.toml:2: key "files": source ""`}},
		{"command empty program", "name = \"a\"\ncommand = [\"\", \"x\"]", []string{`kiln.toml:2: key "command": the program`}},
		{"several problems", "name = \"a\"\nvcpus = 0\nmemory = \"1M\"", []string{`kiln.toml:2: key "vcpus"`, `kiln.toml:3: key "memory"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Parse([]byte(tt.doc), "kiln.toml", "/spec")
			if err == nil {
				t.Fatalf("Parse(%q) = %+v, want error", tt.doc, s)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Parse(%q) error = %q, want it to contain %q", tt.doc, err, w)
				}
			}
			var se *Error
			if !errors.As(err, &se) {
				t.Errorf("Parse(%q) error %T is not a *spec.Error", tt.doc, err)
			}
		})
	}
}

func TestValidateDirect(t *testing.T) {
	s := &Spec{Name: "ok", Python: "python3", Memory: "512M", VCPUs: 1, Compression: "lz4"}
	if err := s.Validate(); err != nil {
		t.Fatalf("Validate(%+v) = %v, want nil", s, err)
	}
	s.VCPUs = 100
	s.Memory = ""
	err := s.Validate()
	if err == nil {
		t.Fatalf("Validate(%+v) = nil, want error", s)
	}
	for _, w := range []string{`key "vcpus": must be between 1 and 64, got 100`, `key "memory": invalid size ""`} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("Validate() = %q, want it to contain %q", err, w)
		}
	}
}

func TestMemoryMiB(t *testing.T) {
	for in, want := range map[string]int{"512M": 512, "1G": 1024, "134217728": 128, "200000000": 190, "bad": 0} {
		if got := (&Spec{Memory: in}).MemoryMiB(); got != want {
			t.Errorf("Spec{Memory: %q}.MemoryMiB() = %d, want %d", in, got, want)
		}
	}
}

func writeFile(t *testing.T, p, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "kiln.toml"), "name = \"d\"\nrequirements = \"requirements.txt\"\nfiles = { \"src/\" = \"/app\" }\n")
	writeFile(t, filepath.Join(dir, "requirements.txt"), "six\n")
	writeFile(t, filepath.Join(dir, "src", "app.py"), "print(1)\n")
	writeFile(t, filepath.Join(dir, "other.toml"), "name = \"f\"\n")

	s, err := Load(dir)
	if err != nil {
		t.Fatalf("Load(dir) error: %v", err)
	}
	if s.Name != "d" || s.Dir != dir || s.RequirementsFile != filepath.Join(dir, "requirements.txt") {
		t.Errorf("Load(dir) = name %q dir %q reqfile %q, want d, %s, %s/requirements.txt", s.Name, s.Dir, s.RequirementsFile, dir, dir)
	}

	s, err = Load(filepath.Join(dir, "other.toml"))
	if err != nil {
		t.Fatalf("Load(file) error: %v", err)
	}
	if s.Name != "f" || s.Dir != dir {
		t.Errorf("Load(file) = name %q dir %q, want f, %s", s.Name, s.Dir, dir)
	}

	t.Chdir(dir)
	s, err = Load("")
	if err != nil {
		t.Fatalf("Load(\"\") error: %v", err)
	}
	if s.Name != "d" {
		t.Errorf("Load(\"\").Name = %q, want d", s.Name)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	empty := t.TempDir()
	_, err := Load(empty)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(empty, "kiln.toml")) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load(empty dir) = %v, want not-exist error naming %s/kiln.toml", err, empty)
	}
	missing := filepath.Join(dir, "nope.toml")
	if _, err := Load(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("Load(missing) = %v, want error naming %s", err, missing)
	}

	spec := filepath.Join(dir, "kiln.toml")
	writeFile(t, spec, "name = \"d\"\nrequirements = \"requirements.txt\"\nfiles = { \"src/\" = \"/app\" }\n")
	_, err = Load(dir)
	if err == nil {
		t.Fatal("Load(spec with missing files) = nil error")
	}
	for _, w := range []string{spec + `:2: key "requirements": requirements file`, spec + `:3: key "files": source "src/"`} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("Load() error = %q, want it to contain %q", err, w)
		}
	}
}

func TestJSON(t *testing.T) {
	s, err := Parse([]byte(example), "kiln.toml", "/spec")
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var back Spec
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	s.Dir = ""
	if diff := cmp.Diff(s, &back); diff != "" {
		t.Errorf("JSON round trip mismatch (-want +got):\n%s", diff)
	}
	if strings.Contains(string(b), "/spec") {
		t.Errorf("JSON %s contains the host spec dir", b)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(example))
	f.Add([]byte(`name = "a"`))
	f.Add([]byte("name = \"a\"\nrequirements = \"r.txt\""))
	f.Add([]byte("name = \"a\"\n[files]\n\"a\" = \"/b\"\n[env]\nX = \"1\""))
	f.Add([]byte("name = \"a\"\nvcpus = \"x\"\nfoo.bar = 1"))
	f.Add([]byte("requirements = [1, {a = 2}]"))
	f.Add([]byte("files.a.b = 1\nmemory = \"99999999999999T\""))
	f.Add([]byte("[[name]]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse(data, "kiln.toml", "/spec")
		if err != nil {
			if err.Error() == "" {
				t.Errorf("Parse(%q) returned an empty error", data)
			}
			return
		}
		if err := s.Validate(); err != nil {
			t.Errorf("Parse(%q) succeeded but Validate() = %v", data, err)
		}
		if m := s.MemoryMiB(); m < MinMemoryMiB || m > MaxMemoryMiB {
			t.Errorf("Parse(%q).MemoryMiB() = %d, out of range", data, m)
		}
	})
}
