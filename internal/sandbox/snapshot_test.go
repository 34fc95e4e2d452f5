package sandbox_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/sandbox"
	"github.com/kiln-dev/kiln/internal/snapshot"
	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
)

// store returns a private snapshot store for one test.
func store(t *testing.T) *snapshot.Store {
	t.Helper()
	st, err := snapshot.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestRestoredClonesAreUnique restores one snapshot 20 times and checks that
// every clone has its own randomness and the host's time.
func TestRestoredClonesAreUnique(t *testing.T) {
	img := testutil.OpenImage(t, testimage.Numpy(t))
	st := store(t)
	probe := source("def f():\n    import os, random, uuid, time\n    return [os.urandom(16).hex(), random.random(), str(uuid.uuid4()), time.time()]\n", "f")
	seen := map[string]map[string]bool{"urandom": {}, "random": {}, "uuid4": {}}
	for i := 0; i < 20; i++ {
		sb, err := sandbox.Start(context.Background(), img, sandbox.Options{Store: st})
		if err != nil {
			t.Fatalf("restore %d: Start() error = %v", i, err)
		}
		r, err := invoke(t, sb, probe)
		host := float64(time.Now().UnixNano()) / 1e9
		restores, created := sb.Restores.Load(), sb.SnapshotsCreated.Load()
		sb.Close()
		if err != nil || !r.OK {
			t.Fatalf("restore %d: Invoke() = %+v, %v", i, r, err)
		}
		if restores != 1 {
			t.Fatalf("restore %d: Restores = %d, want 1 (the VM must come from the snapshot)", i, restores)
		}
		if want := int64(0); i > 0 && created != want {
			t.Errorf("restore %d: SnapshotsCreated = %d, want 0 (the snapshot exists)", i, created)
		}
		var v []any
		if err := json.Unmarshal(r.Value.Data, &v); err != nil || len(v) != 4 {
			t.Fatalf("restore %d: value %s, want 4 items", i, r.Value.Data)
		}
		for j, k := range []string{"urandom", "random", "uuid4"} {
			key, _ := json.Marshal(v[j])
			if seen[k][string(key)] {
				t.Errorf("restore %d: %s = %s repeats an earlier clone's", i, k, key)
			}
			seen[k][string(key)] = true
		}
		if guest := v[3].(float64); guest < host-1 || guest > host+1 {
			t.Errorf("restore %d: guest time %.3f, host time %.3f: want within 1 s", i, guest, host)
		}
	}
}

// TestDamagedSnapshotFallsBack damages the stored snapshot in each way and
// checks that it is never restored: the sandbox logs why, cold-boots a
// snapshot source again and answers.
func TestDamagedSnapshotFallsBack(t *testing.T) {
	img := testutil.OpenImage(t, testimage.Numpy(t))
	st := store(t)
	sb, err := sandbox.Start(context.Background(), img, sandbox.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	sb.Close()
	damage := []struct {
		name   string
		file   string
		mutate func([]byte) []byte
		reason string
	}{
		{"empty state", "state", func([]byte) []byte { return nil }, "empty state"},
		{"truncated state", "state", func(b []byte) []byte { return b[:len(b)/2] }, "truncated"},
		{"bit-flipped state", "state", func(b []byte) []byte { b[len(b)/2] ^= 1; return b }, "digest mismatch"},
		{"wrong version", "meta.json", func(b []byte) []byte {
			return regexp.MustCompile(`"format": *1`).ReplaceAll(b, []byte(`"format": 99`))
		}, "format"},
	}
	for _, d := range damage {
		t.Run(d.name, func(t *testing.T) {
			entries, err := st.List()
			if err != nil || len(entries) != 1 {
				t.Fatalf("store has %d entries (%v), want 1", len(entries), err)
			}
			p := filepath.Join(entries[0].Dir, d.file)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			nb := d.mutate(bytes.Clone(b))
			if bytes.Equal(nb, b) {
				t.Fatalf("damage %s changed nothing in %s", d.name, d.file)
			}
			if err := os.WriteFile(p, nb, 0o644); err != nil {
				t.Fatal(err)
			}
			var logs testutil.LockedBuffer
			log := slog.New(slog.NewTextHandler(&logs, nil))
			o := sandbox.Options{Store: st}
			o.VM.Log = log
			sb, err := sandbox.Start(context.Background(), img, o)
			if err != nil {
				t.Fatalf("Start() with a damaged snapshot error = %v, want a cold-boot fallback", err)
			}
			defer sb.Close()
			if got := sb.SnapshotsCreated.Load(); got != 1 {
				t.Errorf("SnapshotsCreated = %d, want 1 (the damaged snapshot rebuilt)", got)
			}
			if !strings.Contains(logs.String(), d.reason) {
				t.Errorf("logs = %q, want the reason %q", logs.String(), d.reason)
			}
			r, err := invoke(t, sb, source("def f():\n    return 3\n", "f"))
			if err != nil || !r.OK {
				t.Fatalf("Invoke() after fallback = %+v, %v", r, err)
			}
		})
	}
}

// TestCheckpointChain restores, checkpoints and restores again three times;
// state set in one generation is seen by the next.
func TestCheckpointChain(t *testing.T) {
	img := testutil.OpenImage(t, testimage.Numpy(t))
	st := store(t)
	o := sandbox.Options{Store: st}
	bump := source("def bump():\n    import builtins\n    builtins.kiln_gen = getattr(builtins, 'kiln_gen', 0) + 1\n    return builtins.kiln_gen\n", "bump")
	for gen := 1; gen <= 3; gen++ {
		sb, err := sandbox.Start(context.Background(), img, o)
		if err != nil {
			t.Fatalf("generation %d: Start() error = %v", gen, err)
		}
		r, err := invoke(t, sb, bump)
		if err != nil || !r.OK {
			sb.Close()
			t.Fatalf("generation %d: Invoke() = %+v, %v", gen, r, err)
		}
		var got int
		if err := r.Value.Decode(&got); err != nil || got != gen {
			t.Errorf("generation %d: counter = %d (%v), want %d", gen, got, err, gen)
		}
		dir := filepath.Join(t.TempDir(), "ckpt")
		if err := sb.Checkpoint(context.Background(), dir); err != nil {
			sb.Close()
			t.Fatalf("generation %d: Checkpoint() error = %v", gen, err)
		}
		sb.Close()
		o = sandbox.Options{RestoreFrom: dir}
	}
	sb, err := sandbox.Start(context.Background(), img, o)
	if err != nil {
		t.Fatalf("last restore: Start() error = %v", err)
	}
	defer sb.Close()
	r, err := invoke(t, sb, &task.Task{Kind: task.KindSource, Source: "def f(n):\n    import numpy as np, builtins\n    return [builtins.kiln_gen, int(np.arange(n).sum())]\n", Name: "f", Args: mustJSON([]any{10})})
	if err != nil || !r.OK {
		t.Fatalf("last restore: Invoke() = %+v, %v", r, err)
	}
	if string(r.Value.Data) != "[3, 45]" && string(r.Value.Data) != "[3,45]" {
		t.Errorf("last restore: value = %s, want [3, 45]", r.Value.Data)
	}
}
