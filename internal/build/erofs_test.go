package build

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-dev/kiln/internal/testutil"
)

func TestMkErofsCompressions(t *testing.T) {
	testutil.NeedTool(t, "mkfs.erofs", "erofs-utils")
	tree := t.TempDir()
	if err := os.WriteFile(filepath.Join(tree, "a.txt"), []byte(strings.Repeat("kiln ", 10000)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("a.txt", filepath.Join(tree, "b")); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	sizes := map[string]int64{}
	for _, c := range []string{"none", "lz4", "lz4hc", ""} {
		img := filepath.Join(out, "img-"+c)
		if err := MkErofs(context.Background(), tree, img, c); err != nil {
			t.Fatalf("MkErofs(%q): %v", c, err)
		}
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		// erofs superblock magic 0xE0F5E1E2 at offset 1024, little-endian.
		if len(b) < 1028 || b[1024] != 0xe2 || b[1025] != 0xe1 || b[1026] != 0xf5 || b[1027] != 0xe0 {
			t.Fatalf("MkErofs(%q) wrote no erofs superblock", c)
		}
		sizes[c] = int64(len(b))
	}
	if sizes["lz4hc"] >= sizes["none"] {
		t.Errorf("lz4hc image %d bytes, none %d bytes: want compression", sizes["lz4hc"], sizes["none"])
	}
	if left, _ := filepath.Glob(filepath.Join(out, ".*")); len(left) != 0 {
		t.Errorf("MkErofs left temp files %v", left)
	}
}

func TestMkErofsErrors(t *testing.T) {
	testutil.NeedTool(t, "mkfs.erofs", "erofs-utils")
	out := filepath.Join(t.TempDir(), "img")
	if err := MkErofs(context.Background(), t.TempDir(), out, "zstd"); err == nil || !strings.Contains(err.Error(), "unknown compression") {
		t.Errorf("MkErofs(zstd) error = %v, want unknown compression", err)
	}
	if err := MkErofs(context.Background(), filepath.Join(t.TempDir(), "missing"), out, ""); err == nil {
		t.Errorf("MkErofs(missing dir) succeeded, want error")
	}
	t.Setenv("PATH", t.TempDir())
	want := "mkfs.erofs not found: install erofs-utils (apt-get install erofs-utils)"
	if err := MkErofs(context.Background(), t.TempDir(), out, ""); err == nil || err.Error() != want {
		t.Errorf("MkErofs without mkfs.erofs error = %v, want %q", err, want)
	}
}
