package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/snapshot"
)

// runSnapshotCmd runs `kiln snapshot args...` and returns stdout and stderr.
func runSnapshotCmd(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := newSnapshotCmd(&app{stdout: &stdout, stderr: &stderr})
	cmd.SetArgs(args)
	cmd.SetOut(&stdout)
	cmd.SetErr(&stderr)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.ExecuteContext(context.Background())
	return stdout.String(), stderr.String(), err
}

func TestSnapshotCLI(t *testing.T) {
	dir := t.TempDir()
	s, err := snapshot.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, accel := range []string{"tcg", "kvm"} {
		k := snapshot.Key{ImageDigest: strings.Repeat("ab", 32), Kernel: "6.1.0", VMM: "QEMU emulator version 7.2.15",
			Accel: accel, MemoryMiB: 1, VCPUs: 1, Preload: []string{"numpy"}}
		e, err := s.Create(context.Background(), k, func(_ context.Context, ram, state string) error {
			if err := os.WriteFile(ram, make([]byte, 1<<20), 0o644); err != nil {
				return err
			}
			return os.WriteFile(state, []byte("device state"), 0o644)
		})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, e.ID)
	}

	out, _, err := runSnapshotCmd(t, "ls", "--dir", dir)
	if err != nil {
		t.Fatalf("ls: %v", err)
	}
	for _, want := range []string{ids[0], ids[1], "abababababab", "numpy", "2 snapshots"} {
		if !strings.Contains(out, want) {
			t.Errorf("ls output lacks %q:\n%s", want, out)
		}
	}

	out, _, err = runSnapshotCmd(t, "ls", "--json", "--dir", dir)
	if err != nil {
		t.Fatalf("ls --json: %v", err)
	}
	var listed []snapshot.Entry
	if err := json.Unmarshal([]byte(out), &listed); err != nil {
		t.Fatalf("ls --json output is not a JSON list of entries: %v\n%s", err, out)
	}
	var got []string
	for _, e := range listed {
		got = append(got, e.ID)
	}
	if !cmp.Equal(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(ids))) {
		t.Errorf("ls --json IDs = %q, want %q", got, ids)
	}

	if _, _, err := runSnapshotCmd(t, "rm", "--dir", dir, "zz"); err == nil || !strings.Contains(err.Error(), "no snapshot matches") {
		t.Errorf("rm zz = %v, want no snapshot matches", err)
	}
	out, _, err = runSnapshotCmd(t, "rm", "--dir", dir, ids[0][:8])
	if err != nil {
		t.Fatalf("rm prefix: %v", err)
	}
	if want := "removed " + ids[0]; !strings.Contains(out, want) {
		t.Errorf("rm output = %q, want %q", out, want)
	}
	if _, err := os.Stat(filepath.Join(dir, ids[0])); !os.IsNotExist(err) {
		t.Errorf("snapshot dir still there after rm: %v", err)
	}

	// gc keeps the valid one; gc --all removes it.
	if out, _, err := runSnapshotCmd(t, "gc", "--dir", dir); err != nil || strings.Contains(out, "removed") {
		t.Errorf("gc = %q, %v; want nothing removed", out, err)
	}
	out, _, err = runSnapshotCmd(t, "gc", "--all", "--dir", dir)
	if err != nil || !strings.Contains(out, "removed "+ids[1]) {
		t.Errorf("gc --all = %q, %v; want removed %s", out, err, ids[1])
	}
	out, stderr, err := runSnapshotCmd(t, "ls", "--dir", dir)
	if err != nil || out != "" || !strings.Contains(stderr, "no snapshots") {
		t.Errorf("ls of empty store = %q, %q, %v; want \"no snapshots\" on stderr", out, stderr, err)
	}
	if out, _, err := runSnapshotCmd(t, "ls", "--json", "--dir", dir); err != nil || strings.TrimSpace(out) != "[]" {
		t.Errorf("ls --json of empty store = %q, %v; want []", out, err)
	}
}
