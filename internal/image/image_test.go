package image

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kiln-dev/kiln/internal/spec"
)

func testManifest() *Manifest {
	return &Manifest{
		Name: "demo",
		Spec: &spec.Spec{Name: "demo", Python: "/usr/bin/python3", Memory: "512M", VCPUs: 1,
			Env: map[string]string{"B": "2", "A": "1", "C": "3"}},
		Python:        Python{Version: "3.11.2", Executable: "/usr/bin/python3.11", Debian: true},
		Distributions: []Distribution{{Name: "numpy", Version: "1.24.2", Source: "debian"}},
		Kernel:        Kernel{Version: "6.1.0-28-cloud-amd64", Package: "linux-image-6.1.0-28-cloud-amd64", PackageVersion: "6.1.119-1", Modules: []string{"virtio_blk", "erofs"}},
		Rootfs:        Rootfs{Filesystem: "erofs", Compression: "lz4hc", Files: 3, TreeBytes: 12345},
		Command:       []string{"python3", "-c", "print(1)"},
		Env:           map[string]string{"Z": "1", "A": "2", "M": "3"},
		MemoryMiB:     512,
		VCPUs:         1,
		Preload:       []string{"numpy"},
		Agent:         []string{"/usr/bin/python3", "-u", "/usr/lib/kiln/agent.py"},
		KilnVersion:   "test",
	}
}

// pattern returns n deterministic, part-specific bytes.
func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	x := uint32(seed) + 1
	for i := range b {
		x = x*1664525 + 1013904223
		b[i] = byte(x >> 24)
	}
	return b
}

type fixture struct {
	dir     string
	path    string
	digest  string
	inputs  map[string][]byte
	sources []PartSource
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	t.Setenv("KILN_CACHE", filepath.Join(t.TempDir(), "cache"))
	fx := &fixture{dir: t.TempDir(), inputs: map[string][]byte{
		PartKernel:    pattern(1, 5000),
		PartInitramfs: pattern(2, Align), // exactly aligned
		PartRootfs:    pattern(3, 3*Align+17),
	}}
	for _, name := range []string{PartRootfs, PartKernel, PartInitramfs} { // order of sources must not matter
		p := filepath.Join(fx.dir, name+".in")
		if err := os.WriteFile(p, fx.inputs[name], 0o644); err != nil {
			t.Fatal(err)
		}
		fx.sources = append(fx.sources, PartSource{Name: name, Path: p})
	}
	fx.path = filepath.Join(fx.dir, "demo.kiln")
	d, err := Create(fx.path, testManifest(), fx.sources)
	if err != nil {
		t.Fatalf("Create() error: %v", err)
	}
	fx.digest = d
	return fx
}

func TestRoundTrip(t *testing.T) {
	fx := newFixture(t)
	img, err := Open(fx.path)
	if err != nil {
		t.Fatalf("Open() error: %v", err)
	}
	if img.Digest != fx.digest {
		t.Errorf("Open().Digest = %s, want Create's %s", img.Digest, fx.digest)
	}
	want := testManifest()
	want.Format = FormatVersion
	if diff := cmp.Diff(want, img.Manifest); diff != "" {
		t.Errorf("manifest mismatch (-want +got):\n%s", diff)
	}
	fi, _ := os.Stat(fx.path)
	if img.Size != fi.Size() || img.Size%Align != 0 {
		t.Errorf("Size = %d, file is %d bytes; want equal and a multiple of %d", img.Size, fi.Size(), Align)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("image mode = %v, want 0644", fi.Mode().Perm())
	}
	var names []string
	for _, p := range img.Parts {
		names = append(names, p.Name)
		if p.Offset%Align != 0 {
			t.Errorf("part %s offset %d not aligned", p.Name, p.Offset)
		}
	}
	if diff := cmp.Diff(PartNames, names); diff != "" {
		t.Errorf("part order mismatch (-want +got):\n%s", diff)
	}
	if err := img.Verify(); err != nil {
		t.Fatalf("Verify() error: %v", err)
	}
	raw, err := os.ReadFile(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	for name, in := range fx.inputs {
		out := filepath.Join(t.TempDir(), name)
		if err := img.Extract(name, out); err != nil {
			t.Fatalf("Extract(%s) error: %v", name, err)
		}
		got, _ := os.ReadFile(out)
		if !bytes.Equal(got, in) {
			t.Errorf("Extract(%s) = %d bytes, differs from the %d input bytes", name, len(got), len(in))
		}
		// The rootfs is attached to QEMU as a byte range of the file: check it directly.
		p, ok := img.Part(name)
		if !ok || !bytes.Equal(raw[p.Offset:p.Offset+p.Size], in) {
			t.Errorf("bytes at part %s range [%d,+%d) differ from the input", name, p.Offset, p.Size)
		}
	}
	if _, ok := img.Part("nope"); ok {
		t.Errorf("Part(nope) found, want not found")
	}
	if err := img.Extract("nope", filepath.Join(t.TempDir(), "x")); err == nil {
		t.Errorf("Extract(nope) = nil, want error")
	}
}

func TestDeterministic(t *testing.T) {
	fx := newFixture(t)
	other := filepath.Join(fx.dir, "other.kiln")
	time.Sleep(10 * time.Millisecond) // make a time-dependent encoding show up
	d2, err := Create(other, testManifest(), fx.sources)
	if err != nil {
		t.Fatalf("Create() error: %v", err)
	}
	a, _ := os.ReadFile(fx.path)
	b, _ := os.ReadFile(other)
	if !bytes.Equal(a, b) || d2 != fx.digest {
		t.Errorf("two Creates differ: %d vs %d bytes, digest %s vs %s", len(a), len(b), fx.digest, d2)
	}
}

func TestCreateErrors(t *testing.T) {
	fx := newFixture(t)
	src := map[string]string{}
	for _, s := range fx.sources {
		src[s.Name] = s.Path
	}
	tests := []struct {
		name  string
		parts []PartSource
		want  string
	}{
		{"missing rootfs", []PartSource{{PartKernel, src[PartKernel]}, {PartInitramfs, src[PartInitramfs]}}, `missing part "rootfs"`},
		{"unknown", append(append([]PartSource(nil), fx.sources...), PartSource{"extra", src[PartKernel]}), `unknown part "extra"`},
		{"manifest given", append(append([]PartSource(nil), fx.sources...), PartSource{PartManifest, src[PartKernel]}), "manifest part is generated"},
		{"duplicate", append(append([]PartSource(nil), fx.sources...), PartSource{PartKernel, src[PartKernel]}), `part "kernel" given twice`},
		{"source missing", []PartSource{{PartKernel, src[PartKernel]}, {PartInitramfs, src[PartInitramfs]}, {PartRootfs, filepath.Join(fx.dir, "absent")}}, "part rootfs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			out := filepath.Join(dir, "x.kiln")
			_, err := Create(out, testManifest(), tt.parts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Create() error = %v, want it to contain %q", err, tt.want)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("Create() failure left files behind: %v", ents)
			}
		})
	}
	if _, err := Create(filepath.Join(t.TempDir(), "x"), &Manifest{Format: 99}, fx.sources); err == nil {
		t.Errorf("Create(format 99) = nil error, want error")
	}
}

// mutate copies the fixture image, applies f to its bytes and returns the new path.
func mutate(t *testing.T, fx *fixture, f func(b []byte) []byte) string {
	t.Helper()
	b, err := os.ReadFile(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "mutated.kiln")
	if err := os.WriteFile(p, f(b), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func partOf(t *testing.T, fx *fixture, name string) Part {
	img, err := Open(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := img.Part(name)
	return p
}

func TestOpenErrors(t *testing.T) {
	fx := newFixture(t)
	manifest := partOf(t, fx, PartManifest)
	rootfs := partOf(t, fx, PartRootfs)
	tests := []struct {
		name    string
		mutate  func([]byte) []byte
		want    []string
		version bool
	}{
		{"empty", func([]byte) []byte { return nil }, []string{"empty", "not a kiln image", "kiln build"}, false},
		{"tiny prefix", func(b []byte) []byte { return b[:3] }, []string{"truncated"}, false},
		{"header only", func(b []byte) []byte { return b[:12] }, []string{"truncated", "rebuild it with kiln build"}, false},
		{"half header", func(b []byte) []byte { return b[:100] }, []string{"truncated", "rebuild it with kiln build"}, false},
		{"truncated rootfs", func(b []byte) []byte { return b[:rootfs.Offset+rootfs.Size-1] }, []string{"image truncated", "part rootfs", "rebuild it with kiln build"}, false},
		{"truncated to header", func(b []byte) []byte { return b[:Align] }, []string{"image truncated", "rebuild it with kiln build"}, false},
		{"bad magic", func(b []byte) []byte { b[0] = 'X'; return b }, []string{"not a kiln image", "bad magic"}, false},
		{"text file", func([]byte) []byte { return []byte("hello world, this is not an image\n") }, []string{"not a kiln image"}, false},
		{"wrong version", func(b []byte) []byte { binary.LittleEndian.PutUint32(b[8:], 2); return b }, []string{"image format version 2", "reads version 1", "kiln build"}, true},
		{"index length zero", func(b []byte) []byte { binary.LittleEndian.PutUint32(b[12:], 0); return b }, []string{"index length 0"}, false},
		{"index length huge", func(b []byte) []byte { binary.LittleEndian.PutUint32(b[12:], 1<<30); return b }, []string{"index length"}, false},
		{"index damaged", func(b []byte) []byte { b[headerFixed] = '['; return b }, []string{"decoding index"}, false},
		{"manifest bit flip", func(b []byte) []byte { b[manifest.Offset+5] ^= 1; return b }, []string{"manifest sha256 mismatch", "rebuild"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := mutate(t, fx, tt.mutate)
			img, err := Open(p)
			if err == nil {
				t.Fatalf("Open(%s) = %+v, want error", tt.name, img)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Open() error = %q, want it to contain %q", err, w)
				}
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("Open() error %q does not wrap ErrCorrupt", err)
			}
			if got := errors.Is(err, ErrVersion); got != tt.version {
				t.Errorf("errors.Is(%q, ErrVersion) = %v, want %v", err, got, tt.version)
			}
		})
	}
}

func TestOpenMissing(t *testing.T) {
	p := filepath.Join(t.TempDir(), "absent.kiln")
	_, err := Open(p)
	if err == nil || !errors.Is(err, fs.ErrNotExist) || errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), p) {
		t.Errorf("Open(missing) = %v, want a not-exist error naming %s, not ErrCorrupt", err, p)
	}
	if _, err := Open(t.TempDir()); err == nil {
		t.Errorf("Open(directory) = nil error, want error")
	}
}

func TestRootfsBitFlip(t *testing.T) {
	fx := newFixture(t)
	rootfs := partOf(t, fx, PartRootfs)
	p := mutate(t, fx, func(b []byte) []byte { b[rootfs.Offset+rootfs.Size/2] ^= 0x10; return b })
	img, err := Open(p)
	if err != nil {
		t.Fatalf("Open() of an image with a damaged rootfs = %v, want nil (Open does not hash the rootfs)", err)
	}
	err = img.Verify()
	if err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "part rootfs sha256 mismatch") {
		t.Errorf("Verify() = %v, want ErrCorrupt naming part rootfs", err)
	}
	err = img.Extract(PartRootfs, filepath.Join(t.TempDir(), "rootfs"))
	if err == nil || !errors.Is(err, ErrCorrupt) {
		t.Errorf("Extract(rootfs) = %v, want ErrCorrupt", err)
	}
	// Kernel and initramfs are intact, so boot files still extract.
	if _, _, err := img.BootFiles(); err != nil {
		t.Errorf("BootFiles() = %v, want nil", err)
	}
	dir, _ := os.ReadDir(filepath.Join(os.Getenv("KILN_CACHE"), "verified"))
	if len(dir) != 0 {
		t.Errorf("failed Verify left a stamp: %v", dir)
	}
}

func TestVerifyStamp(t *testing.T) {
	fx := newFixture(t)
	var hashed []string
	verifyHook = func(p string) { hashed = append(hashed, p) }
	defer func() { verifyHook = nil }()

	img, err := Open(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Verify(); err != nil {
		t.Fatalf("first Verify() error: %v", err)
	}
	if diff := cmp.Diff(PartNames, hashed); diff != "" {
		t.Errorf("first Verify hashed (-want +got):\n%s", diff)
	}
	stamps, _ := os.ReadDir(filepath.Join(os.Getenv("KILN_CACHE"), "verified"))
	if len(stamps) != 1 {
		t.Errorf("after Verify the verified cache holds %d entries, want 1", len(stamps))
	}

	hashed = nil
	img2, err := Open(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	if err := img2.Verify(); err != nil {
		t.Fatalf("second Verify() error: %v", err)
	}
	if len(hashed) != 0 {
		t.Errorf("second Verify of an unchanged file hashed %v, want nothing (stamp fast path)", hashed)
	}

	// Changing the mtime invalidates the stamp.
	hashed = nil
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(fx.path, old, old); err != nil {
		t.Fatal(err)
	}
	if err := img2.Verify(); err != nil {
		t.Fatalf("Verify() after touch error: %v", err)
	}
	if len(hashed) != len(PartNames) {
		t.Errorf("Verify after mtime change hashed %v, want all parts", hashed)
	}
}

func TestBootFiles(t *testing.T) {
	fx := newFixture(t)
	img, err := Open(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	k, i, err := img.BootFiles()
	if err != nil {
		t.Fatalf("BootFiles() error: %v", err)
	}
	wantDir := filepath.Join(os.Getenv("KILN_CACHE"), "boot", img.Digest)
	if filepath.Dir(k) != wantDir || filepath.Dir(i) != wantDir {
		t.Errorf("BootFiles() = %s, %s, want files in %s", k, i, wantDir)
	}
	for path, name := range map[string]string{k: PartKernel, i: PartInitramfs} {
		got, err := os.ReadFile(path)
		if err != nil || !bytes.Equal(got, fx.inputs[name]) {
			t.Errorf("%s at %s: %d bytes, err %v; want the %d input bytes", name, path, len(got), err, len(fx.inputs[name]))
		}
	}
	fi1, _ := os.Stat(k)
	k2, i2, err := img.BootFiles()
	if err != nil || k2 != k || i2 != i {
		t.Errorf("second BootFiles() = %s, %s, %v; want %s, %s, nil", k2, i2, err, k, i)
	}
	fi2, _ := os.Stat(k)
	if !os.SameFile(fi1, fi2) {
		t.Errorf("second BootFiles() re-extracted the kernel, want it reused")
	}
	ents, _ := os.ReadDir(wantDir)
	if len(ents) != 2 {
		t.Errorf("boot dir holds %d entries, want 2 (no temp files)", len(ents))
	}
}

func TestDecodeIndex(t *testing.T) {
	sha := strings.Repeat("a", 64)
	part := func(name string, off, size int64) string {
		return fmt.Sprintf(`{"name":%q,"offset":%d,"size":%d,"sha256":%q}`, name, off, size, sha)
	}
	all := func(extra ...string) string {
		ps := append([]string{part("manifest", 4096, 10), part("kernel", 8192, 4096), part("initramfs", 12288, 0), part("rootfs", 12288, 5)}, extra...)
		return `{"parts":[` + strings.Join(ps, ",") + `]}`
	}
	if parts, err := DecodeIndex([]byte(all())); err != nil || len(parts) != 4 {
		t.Fatalf("DecodeIndex(valid) = %v, %v; want 4 parts", parts, err)
	}
	tests := []struct{ name, doc, want string }{
		{"not json", `nope`, "decoding index"},
		{"unknown field", `{"parts":[],"x":1}`, "unknown field"},
		{"trailing", all() + `{}`, "trailing data"},
		{"missing rootfs", `{"parts":[` + part("manifest", 4096, 1) + `]}`, "no kernel part"},
		{"unknown part", all(part("extra", 65536, 1)), `unknown part "extra"`},
		{"duplicate", all(part("kernel", 65536, 1)), `part "kernel" twice`},
		{"unaligned", strings.Replace(all(), `"offset":8192`, `"offset":8193`, 1), "bad offset 8193"},
		{"in header", strings.Replace(all(), `"offset":4096`, `"offset":0`, 1), "bad offset 0"},
		{"negative size", strings.Replace(all(), `"size":4096`, `"size":-1`, 1), "bad size -1"},
		{"overlap", strings.Replace(all(), `"size":4096`, `"size":4097`, 1), "overlap"},
		{"bad sha", strings.Replace(all(), sha, "XYZ", 1), "malformed sha256"},
		{"huge", strings.Replace(all(), `"size":4096`, `"size":9223372036854775807`, 1), "bad size"},
	}
	for _, tt := range tests {
		_, err := DecodeIndex([]byte(tt.doc))
		if err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("DecodeIndex(%s) = %v, want ErrCorrupt containing %q", tt.name, err, tt.want)
		}
	}
}

func FuzzDecodeIndex(f *testing.F) {
	sha := strings.Repeat("0", 64)
	f.Add([]byte(`{"parts":[{"name":"manifest","offset":4096,"size":1,"sha256":"` + sha + `"},{"name":"kernel","offset":8192,"size":1,"sha256":"` + sha + `"},{"name":"initramfs","offset":12288,"size":1,"sha256":"` + sha + `"},{"name":"rootfs","offset":16384,"size":1,"sha256":"` + sha + `"}]}`))
	f.Add([]byte(`{"parts":[]}`))
	f.Add([]byte(`{"parts":[{"name":"kernel","offset":-4096,"size":9223372036854775807}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		parts, err := DecodeIndex(data)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("DecodeIndex(%q) error %v does not wrap ErrCorrupt", data, err)
			}
			return
		}
		for _, p := range parts {
			if p.Offset%Align != 0 || p.Size < 0 || p.Offset+p.Size < p.Offset {
				t.Errorf("DecodeIndex(%q) accepted bad part %+v", data, p)
			}
		}
	})
}

func FuzzOpen(f *testing.F) {
	dir := f.TempDir()
	in := filepath.Join(dir, "in")
	if err := os.WriteFile(in, []byte("x"), 0o644); err != nil {
		f.Fatal(err)
	}
	valid := filepath.Join(dir, "valid.kiln")
	if _, err := Create(valid, &Manifest{Name: "f"}, []PartSource{{PartKernel, in}, {PartInitramfs, in}, {PartRootfs, in}}); err != nil {
		f.Fatal(err)
	}
	b, err := os.ReadFile(valid)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add(b[:Align])
	f.Add(b[:headerFixed])
	f.Add([]byte(Magic))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(t.TempDir(), "f.kiln")
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := Open(p)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("Open(fuzz) error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		for _, part := range img.Parts {
			if part.Offset+part.Size > img.Size {
				t.Errorf("Open accepted part %+v beyond file size %d", part, img.Size)
			}
		}
	})
}

// TestBootFilesGzipKernel: a gzip-encoded kernel part (kiln's vmlinux) is
// decoded into the boot cache, and a damaged or mis-sized one is refused.
func TestBootFilesGzipKernel(t *testing.T) {
	t.Setenv("KILN_CACHE", filepath.Join(t.TempDir(), "cache"))
	dir := t.TempDir()
	vmlinux := append(pattern(7, 3000), make([]byte, 1<<20)...) // mostly zeros, like a PVH vmlinux
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(vmlinux)
	zw.Close()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	parts := []PartSource{
		{Name: PartKernel, Path: write("kernel.gz", gz.Bytes())},
		{Name: PartInitramfs, Path: write("initrd", pattern(2, 100))},
		{Name: PartRootfs, Path: write("rootfs", pattern(3, 4096))},
	}
	for _, tc := range []struct {
		name    string
		size    int64
		wantErr bool
	}{
		{"ok", int64(len(vmlinux)), false},
		{"wrong size", int64(len(vmlinux)) - 1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := testManifest()
			m.Kernel.Encoding, m.Kernel.Size = KernelGzip, tc.size
			path := filepath.Join(dir, tc.name+".kimg")
			if _, err := Create(path, m, parts); err != nil {
				t.Fatal(err)
			}
			img, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			k, _, err := img.BootFiles()
			if tc.wantErr {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("BootFiles() error = %v, want ErrCorrupt", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("BootFiles() error = %v", err)
			}
			if got, err := os.ReadFile(k); err != nil || !bytes.Equal(got, vmlinux) {
				t.Errorf("BootFiles() kernel = %d bytes (%v), want the %d decoded bytes", len(got), err, len(vmlinux))
			}
		})
	}
}
