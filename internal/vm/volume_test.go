package vm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/vmm"
)

func TestParseVolume(t *testing.T) {
	dir := t.TempDir()
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("data", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	data := filepath.Join(real, "data")
	for _, tt := range []struct {
		in   string
		want Volume
	}{
		{"data:/data", Volume{Host: data, Guest: "/data", ReadOnly: true}},
		{"./data:/data:ro", Volume{Host: data, Guest: "/data", ReadOnly: true}},
		{data + ":/mnt/in:rw", Volume{Host: data, Guest: "/mnt/in"}},
		{"link:/tmp/x", Volume{Host: data, Guest: "/tmp/x", ReadOnly: true}}, // symlinks resolved once
		{".:/srv", Volume{Host: real, Guest: "/srv", ReadOnly: true}},
	} {
		got, err := ParseVolume(tt.in)
		if err != nil {
			t.Errorf("ParseVolume(%q) error = %v, want %+v", tt.in, err, tt.want)
			continue
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("ParseVolume(%q) mismatch (-want +got):\n%s", tt.in, diff)
		}
	}
	for _, tt := range []struct{ in, want string }{
		{"data", "want HOST:GUEST"},
		{"a:b:c:d", "want HOST:GUEST"},
		{"data:/data:rx", `mode "rx": want ro or rw`},
		{":/data", "empty host directory"},
		{"data:", "empty guest path"},
		{"data:data", "is not absolute"},
		{"data:/", "cannot replace the guest's root"},
		{"data:/usr/lib/x", "would shadow the system directory /usr"},
		{"data:/proc", "would shadow the system directory /proc"},
		{"data:/dev/x", "would shadow"},
		{"data:/etc", "would shadow"},
		{"data:/data/../x", "is not clean: write it as /x"},
		{"data:/data/", "is not clean"},
		{"missing:/data", "does not exist: create it or fix the path"},
		{"file:/data", "is not a directory"},
	} {
		if _, err := ParseVolume(tt.in); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseVolume(%q) error = %v, want one containing %q", tt.in, err, tt.want)
		}
	}
}

func FuzzParseVolume(f *testing.F) {
	for _, s := range []string{"data:/data", "./d:/mnt/x:rw", "/a:/b:ro", "a:b", ":", "a::ro", "a:/usr", "a:/x/../y", "a:/\x00", strings.Repeat("a:", 100)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := parseVolume(s)
		if err != nil {
			return
		}
		if err := proto.CheckGuestPath(v.Guest); err != nil {
			t.Fatalf("parseVolume(%q) = %+v, whose guest path fails CheckGuestPath: %v", s, v, err)
		}
		if v.Host == "" || strings.Contains(v.Host, ":") || strings.Contains(v.Guest, ":") {
			t.Fatalf("parseVolume(%q) = %+v: empty host or ':' in a path", s, v)
		}
		// The flag's own form parses back to the same volume.
		back, err := parseVolume(v.String())
		if err != nil || back != v {
			t.Fatalf("parseVolume(%q) = %+v, %v; want %+v", v.String(), back, err, v)
		}
	})
}

func minimalImage() *image.Image {
	img := testImage()
	img.Manifest.Name = "numpy-test"
	img.Manifest.Kernel = image.Kernel{Kind: "minimal"}
	return img
}

func TestConfigVolumes(t *testing.T) {
	vol := func(guest string) Volume { return Volume{Host: "/srv/data", Guest: guest, ReadOnly: true} }
	for _, tt := range []struct {
		name string
		img  *image.Image
		vols []Volume
		want string // "" = valid
	}{
		{"none on debian", testImage(), nil, ""},
		{"two", minimalImage(), []Volume{vol("/data"), vol("/out")}, ""},
		{"siblings", minimalImage(), []Volume{vol("/data"), vol("/data2")}, ""},
		{"debian kernel", testImage(), []Volume{vol("/data")}, `set kernel = "minimal" in kiln.toml`},
		{"too many", minimalImage(), []Volume{vol("/a"), vol("/b"), vol("/c"), vol("/d"), vol("/e")}, "at most 4"},
		{"nested", minimalImage(), []Volume{vol("/data"), vol("/data/sub")}, "one guest path is inside the other"},
		{"same", minimalImage(), []Volume{vol("/data"), vol("/data")}, "inside the other"},
		{"relative host", minimalImage(), []Volume{{Host: "data", Guest: "/data"}}, "not absolute"},
		{"system path", minimalImage(), []Volume{vol("/usr/local")}, "would shadow"},
	} {
		c := Config{Image: tt.img, Volumes: tt.vols}
		err := c.Validate()
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("Validate(%s) = %v, want nil", tt.name, err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("Validate(%s) = %v, want an error containing %q", tt.name, err, tt.want)
		}
	}
}

// TestShares: every VM of kiln's kernel has the same slots (so snapshots
// fit any volume set): volumes in the first ones, the rest an empty
// read-only directory, which Close removes; other kernels get none.
func TestShares(t *testing.T) {
	vols := []Volume{{Host: "/srv/in", Guest: "/in", ReadOnly: true}, {Host: "/srv/out", Guest: "/out"}}
	v := &VM{cfg: Config{Image: minimalImage(), Volumes: vols}, vols: vols, machine: closedMachine{}}
	got, err := v.shares()
	if err != nil {
		t.Fatal(err)
	}
	want := []vmm.Share{
		{Tag: "kiln0", Path: "/srv/in", ReadOnly: true}, {Tag: "kiln1", Path: "/srv/out"},
		{Tag: "kiln2", Path: v.emptyDir, ReadOnly: true}, {Tag: "kiln3", Path: v.emptyDir, ReadOnly: true},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("shares() mismatch (-want +got):\n%s", diff)
	}
	if ents, err := os.ReadDir(v.emptyDir); err != nil || len(ents) != 0 {
		t.Errorf("empty slot directory %s: %d entries, %v; want an empty directory", v.emptyDir, len(ents), err)
	}
	if diff := cmp.Diff([]proto.Volume{{Tag: "kiln0", Path: "/in", ReadOnly: true}, {Tag: "kiln1", Path: "/out"}}, v.protoVolumes()); diff != "" {
		t.Errorf("protoVolumes() mismatch (-want +got):\n%s", diff)
	}
	v.Close()
	if _, err := os.Stat(v.emptyDir); !os.IsNotExist(err) {
		t.Errorf("after Close, stat %s = %v; want it removed", v.emptyDir, err)
	}

	src := &VM{cfg: Config{Image: minimalImage(), Volumes: vols}, machine: closedMachine{}} // a snapshot source: no vols
	defer src.Close()
	got, err = src.shares()
	if err != nil {
		t.Fatal(err)
	}
	for i, sh := range got {
		if sh.Path != src.emptyDir || !sh.ReadOnly {
			t.Errorf("snapshot source slot %d = %+v, want the empty read-only directory", i, sh)
		}
	}
	deb := &VM{cfg: Config{Image: testImage()}, machine: closedMachine{}}
	if got, err := deb.shares(); err != nil || got != nil {
		t.Errorf("shares() of a Debian-kernel VM = %v, %v; want none", got, err)
	}
}

// closedMachine is a vmm.Machine that was never started.
type closedMachine struct{ vmm.Machine }

func (closedMachine) Close() error { return nil }
