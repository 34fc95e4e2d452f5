package cache

import (
	"os"
	"path/filepath"
	"testing"
)

func TestDirFromEnv(t *testing.T) {
	want := filepath.Join(t.TempDir(), "a", "b")
	t.Setenv(EnvVar, want)
	got, err := Dir()
	if err != nil {
		t.Fatalf("Dir() error: %v", err)
	}
	if got != want {
		t.Errorf("Dir() = %q, want %q", got, want)
	}
	if fi, err := os.Stat(got); err != nil || !fi.IsDir() {
		t.Errorf("Dir() did not create %s: %v", got, err)
	}
}

func TestDirDefault(t *testing.T) {
	home := t.TempDir()
	t.Setenv(EnvVar, "")
	t.Setenv("XDG_CACHE_HOME", filepath.Join(home, "xdg"))
	got, err := Dir()
	if err != nil {
		t.Fatalf("Dir() error: %v", err)
	}
	if want := filepath.Join(home, "xdg", "kiln"); got != want {
		t.Errorf("Dir() = %q, want %q", got, want)
	}
}

func TestSub(t *testing.T) {
	root := t.TempDir()
	t.Setenv(EnvVar, root)
	got, err := Sub("boot")
	if err != nil {
		t.Fatalf("Sub(boot) error: %v", err)
	}
	if want := filepath.Join(root, "boot"); got != want {
		t.Errorf("Sub(boot) = %q, want %q", got, want)
	}
	if fi, err := os.Stat(got); err != nil || !fi.IsDir() {
		t.Errorf("Sub(boot) did not create %s: %v", got, err)
	}
	for _, bad := range []string{"", "/abs", "../up", "a/../../b"} {
		if _, err := Sub(bad); err == nil {
			t.Errorf("Sub(%q) = nil error, want error", bad)
		}
	}
}
