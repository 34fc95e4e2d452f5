package initramfs

import (
	"bytes"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/u-root/u-root/pkg/cpio"

	"github.com/kiln-dev/kiln/internal/build/kernel"
)

type entry struct {
	Name  string
	Mode  uint64
	Data  string
	UID   uint64
	MTime uint64
}

func readArchive(t *testing.T, b []byte) []entry {
	t.Helper()
	recs, err := cpio.ReadAllRecords(cpio.Newc.Reader(bytes.NewReader(b)))
	if err != nil {
		t.Fatalf("reading archive: %v", err)
	}
	var out []entry
	for _, r := range recs {
		var data []byte
		if r.ReaderAt != nil {
			data, err = io.ReadAll(io.NewSectionReader(r.ReaderAt, 0, int64(r.FileSize)))
			if err != nil {
				t.Fatalf("reading %s: %v", r.Name, err)
			}
		}
		out = append(out, entry{Name: r.Name, Mode: r.Mode, Data: string(data), UID: r.UID, MTime: r.MTime})
	}
	return out
}

func testFiles(t *testing.T) []File {
	src := filepath.Join(t.TempDir(), "src")
	if err := os.WriteFile(src, []byte("from host"), 0o600); err != nil {
		t.Fatal(err)
	}
	return []File{
		{Name: "usr/bin/tool", Mode: 0o755, Data: []byte("#!/bin/sh\n")},
		{Name: "/init", Mode: 0o755, Source: src},
		{Name: "bin", Mode: fs.ModeSymlink | 0o777, Link: "usr/bin"},
		{Name: "etc/empty", Mode: 0o644},
		{Name: "var/tmp", Mode: fs.ModeDir | fs.ModeSticky | 0o777},
	}
}

func TestWriteRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	if err := Write(&buf, testFiles(t)); err != nil {
		t.Fatalf("Write: %v", err)
	}
	got := readArchive(t, buf.Bytes())
	want := []entry{
		{Name: "bin", Mode: cpio.S_IFLNK | 0o777, Data: "usr/bin"},
		{Name: "etc", Mode: cpio.S_IFDIR | 0o755},
		{Name: "etc/empty", Mode: cpio.S_IFREG | 0o644},
		{Name: "init", Mode: cpio.S_IFREG | 0o755, Data: "from host"},
		{Name: "usr", Mode: cpio.S_IFDIR | 0o755},
		{Name: "usr/bin", Mode: cpio.S_IFDIR | 0o755},
		{Name: "usr/bin/tool", Mode: cpio.S_IFREG | 0o755, Data: "#!/bin/sh\n"},
		{Name: "var", Mode: cpio.S_IFDIR | 0o755},
		{Name: "var/tmp", Mode: cpio.S_IFDIR | 0o1777},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("archive mismatch (-want +got):\n%s", diff)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d, want a multiple of 4", buf.Len())
	}
}

func TestWriteDeterministic(t *testing.T) {
	files := testFiles(t)
	var a, b bytes.Buffer
	if err := Write(&a, files); err != nil {
		t.Fatal(err)
	}
	// Same entries in another order, file contents touched again.
	rev := make([]File, len(files))
	for i, f := range files {
		rev[len(files)-1-i] = f
	}
	if err := os.Chtimes(files[1].Source, time0, time0); err != nil {
		t.Fatal(err)
	}
	if err := Write(&b, rev); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Errorf("Write is not deterministic: %d bytes vs %d bytes", a.Len(), b.Len())
	}
}

func TestWriteErrors(t *testing.T) {
	tests := []struct {
		name  string
		files []File
		want  string
	}{
		{"duplicate", []File{{Name: "a", Mode: 0o644}, {Name: "/a", Mode: 0o644}}, "duplicate"},
		{"file as dir", []File{{Name: "a", Mode: 0o644}, {Name: "a/b", Mode: 0o644}}, "not a directory"},
		{"empty name", []File{{Name: "", Mode: 0o644}}, "invalid"},
		{"dotdot", []File{{Name: "../x", Mode: 0o644}}, "invalid"},
		{"symlink without target", []File{{Name: "l", Mode: fs.ModeSymlink}}, "no target"},
		{"missing source", []File{{Name: "x", Mode: 0o644, Source: "/nonexistent/kiln"}}, "/nonexistent/kiln"},
		{"device", []File{{Name: "dev/null", Mode: fs.ModeDevice | 0o666}}, "unsupported"},
	}
	for _, tt := range tests {
		err := Write(io.Discard, tt.files)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Write(%s) error = %v, want containing %q", tt.name, err, tt.want)
		}
	}
}

// TestCpioList checks that GNU cpio reads the archive.
func TestCpioList(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Fatalf("cpio not found (apt-get install cpio): %v", err)
	}
	var buf bytes.Buffer
	if err := Write(&buf, testFiles(t)); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cpio", "-t", "--quiet")
	cmd.Stdin = &buf
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -t: %v\n%s", err, out)
	}
	got := strings.Fields(string(out))
	want := []string{"bin", "etc", "etc/empty", "init", "usr", "usr/bin", "usr/bin/tool", "var", "var/tmp"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("cpio -t mismatch (-want +got):\n%s", diff)
	}
}

func TestForInit(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	initBin := write("kiln-init", "ELF init")
	mods := []kernel.Module{
		{Name: "virtio_ring", Path: write("virtio_ring.ko", "ring")},
		{Name: "virtio", Path: write("virtio.ko", "virtio")},
		{Name: "erofs", Path: write("erofs.ko", "erofs")},
	}
	var buf bytes.Buffer
	if err := Write(&buf, ForInit(initBin, mods)); err != nil {
		t.Fatalf("Write(ForInit): %v", err)
	}
	got := map[string]entry{}
	for _, e := range readArchive(t, buf.Bytes()) {
		got[e.Name] = e
	}
	for name, want := range map[string]entry{
		"init":                          {Name: "init", Mode: cpio.S_IFREG | 0o755, Data: "ELF init"},
		"lib/modules/00-virtio_ring.ko": {Name: "lib/modules/00-virtio_ring.ko", Mode: cpio.S_IFREG | 0o644, Data: "ring"},
		"lib/modules/01-virtio.ko":      {Name: "lib/modules/01-virtio.ko", Mode: cpio.S_IFREG | 0o644, Data: "virtio"},
		"lib/modules/02-erofs.ko":       {Name: "lib/modules/02-erofs.ko", Mode: cpio.S_IFREG | 0o644, Data: "erofs"},
		"etc/kiln/modules": {Name: "etc/kiln/modules", Mode: cpio.S_IFREG | 0o644,
			Data: "/lib/modules/00-virtio_ring.ko\n/lib/modules/01-virtio.ko\n/lib/modules/02-erofs.ko\n"},
	} {
		if diff := cmp.Diff(want, got[name]); diff != "" {
			t.Errorf("entry %s mismatch (-want +got):\n%s", name, diff)
		}
	}
	if len(got) != 9 { // 5 files + etc, etc/kiln, lib, lib/modules
		t.Errorf("ForInit archive has %d entries, want 9: %v", len(got), got)
	}
}

var time0 = time.Unix(1e9, 0)

// TestForInitNoModules: the initramfs of a module-less kernel holds
// kiln-init and nothing else (no module list, so kiln-init loads none).
func TestForInitNoModules(t *testing.T) {
	initBin := filepath.Join(t.TempDir(), "kiln-init")
	if err := os.WriteFile(initBin, []byte("ELF init"), 0o755); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := Write(&buf, ForInit(initBin, nil)); err != nil {
		t.Fatalf("Write(ForInit(nil)): %v", err)
	}
	got := readArchive(t, buf.Bytes())
	want := []entry{{Name: "init", Mode: cpio.S_IFREG | 0o755, Data: "ELF init"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("ForInit(init, no modules) archive mismatch (-want +got):\n%s", diff)
	}
}
