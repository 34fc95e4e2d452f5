package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/testutil"
)

const (
	testMemMiB    = 4
	testStateSize = 334000
)

func testKey() Key {
	return Key{
		ImageDigest: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		Kernel:      "6.1.0-28-cloud-amd64",
		VMM:         "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)",
		Accel:       "tcg",
		MemoryMiB:   testMemMiB,
		VCPUs:       1,
		Devices:     "q35/virtio-blk/virtio-serial:2",
		Preload:     []string{"numpy"},
		Protocol:    FormatVersion,
	}
}

// writeSnapshotFiles writes a sparse RAM file with some data in it and a
// state file, like QEMU would.
func writeSnapshotFiles(ram, state string, memMiB int) error {
	f, err := os.Create(ram)
	if err != nil {
		return err
	}
	if err := f.Truncate(int64(memMiB) << 20); err != nil {
		f.Close()
		return err
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte("guest memory "), 1000), 1<<20); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	data := make([]byte, testStateSize)
	for i := range data {
		data[i] = byte(i * 7)
	}
	return os.WriteFile(state, data, 0o644)
}

func fillOK(_ context.Context, ram, state string) error {
	return writeSnapshotFiles(ram, state, testMemMiB)
}

// agePastRacyWindow waits until e's files changed longer ago than the racy
// window, so that verifying them leaves stamps.
func agePastRacyWindow(t *testing.T, e *Entry) {
	t.Helper()
	testutil.WaitFor(t, 10*time.Second, "snapshot files older than the racy window", func() bool {
		for _, p := range []string{e.RAM, e.State} {
			fi, err := os.Stat(p)
			if err != nil {
				return false
			}
			if ct, ok := ctime(fi); !ok || time.Since(ct) < 2*racyWindow {
				return false
			}
		}
		return true
	})
}

func newStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "snapshots"))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s
}

func mustCreate(t *testing.T, s *Store, k Key) *Entry {
	t.Helper()
	e, err := s.Create(context.Background(), k, fillOK)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	return e
}

// storeNames lists the names in the store directory except .verified.
func storeNames(t *testing.T, s *Store) []string {
	t.Helper()
	ds, err := os.ReadDir(s.Dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range ds {
		if d.Name() != stampDir {
			names = append(names, d.Name())
		}
	}
	return names
}

func TestCreateLookup(t *testing.T) {
	s := newStore(t)
	k := testKey()
	created := mustCreate(t, s, k)
	if created.ID != k.ID() || created.Dir != filepath.Join(s.Dir, k.ID()) ||
		created.RAM != filepath.Join(created.Dir, "ram") || created.State != filepath.Join(created.Dir, "state") {
		t.Errorf("Create returned %+v, want ID %s in %s", created, k.ID(), s.Dir)
	}
	m := created.Meta
	if m.Format != FormatVersion || m.RAMSize != testMemMiB<<20 || m.StateSize != testStateSize ||
		!validDigest(m.RAMSHA256) || !validDigest(m.StateSHA256) || m.Created.IsZero() {
		t.Errorf("Create meta = %+v, want format %d, sizes %d/%d, digests", m, FormatVersion, testMemMiB<<20, testStateSize)
	}
	if !created.Key.Equal(k) {
		t.Errorf("Create key = %+v, want %+v", created.Key, k)
	}
	if created.DiskUsage <= 0 || created.DiskUsage >= testMemMiB<<20 {
		t.Errorf("DiskUsage = %d, want 0 < usage < %d (sparse RAM file)", created.DiskUsage, testMemMiB<<20)
	}
	got, err := s.Lookup(k)
	if err != nil {
		t.Fatalf("Lookup: %v", err)
	}
	if diff := cmp.Diff(created, got); diff != "" {
		t.Errorf("Lookup differs from Create (-create +lookup):\n%s", diff)
	}
	// meta.json on disk decodes to the same Meta.
	data, err := os.ReadFile(filepath.Join(got.Dir, "meta.json"))
	if err != nil {
		t.Fatal(err)
	}
	dm, err := decodeMeta(data)
	if err != nil {
		t.Fatalf("decodeMeta(meta.json): %v", err)
	}
	if diff := cmp.Diff(created.Meta, dm); diff != "" {
		t.Errorf("meta.json differs (-want +got):\n%s", diff)
	}
	if names := storeNames(t, s); !cmp.Equal(names, []string{k.ID()}) {
		t.Errorf("store holds %q, want only %q (no lock or temp files)", names, k.ID())
	}
	// A key that differs only in defaults (Protocol 0, nil Preload) finds it too.
	k2 := k
	k2.Protocol = 0
	if _, err := s.Lookup(k2); err != nil {
		t.Errorf("Lookup(key with Protocol 0): %v", err)
	}
}

func TestLookupNotFound(t *testing.T) {
	s := newStore(t)
	mustCreate(t, s, testKey())
	k := testKey()
	k.VCPUs = 2
	if e, err := s.Lookup(k); !errors.Is(err, ErrNotFound) {
		t.Errorf("Lookup(absent) = %v, %v; want ErrNotFound", e, err)
	}
	if _, err := s.Lookup(Key{}); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("Lookup(Key{}) = %v, want an invalid key error", err)
	}
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x01
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func rewriteMeta(t *testing.T, e *Entry, edit func(string) string) {
	t.Helper()
	p := filepath.Join(e.Dir, "meta.json")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(edit(string(data))), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLookupCorrupt(t *testing.T) {
	tests := []struct {
		name    string
		corrupt func(t *testing.T, e *Entry)
		reason  string // exact, or a prefix when it ends in "…"
	}{
		{"empty state", func(t *testing.T, e *Entry) {
			if err := os.Truncate(e.State, 0); err != nil {
				t.Fatal(err)
			}
		}, "empty state file"},
		{"truncated state", func(t *testing.T, e *Entry) {
			if err := os.Truncate(e.State, 100); err != nil {
				t.Fatal(err)
			}
		}, "state file truncated: 100 of 334000 bytes"},
		{"long state", func(t *testing.T, e *Entry) {
			if err := os.Truncate(e.State, testStateSize+1); err != nil {
				t.Fatal(err)
			}
		}, "state file too long: 334001 bytes, want 334000"},
		{"bit-flipped state", func(t *testing.T, e *Entry) { flipByte(t, e.State, 1000) }, "state digest mismatch"},
		{"missing state", func(t *testing.T, e *Entry) {
			if err := os.Remove(e.State); err != nil {
				t.Fatal(err)
			}
		}, "state file missing"},
		{"bit-flipped ram, mtime restored", func(t *testing.T, e *Entry) {
			fi, err := os.Stat(e.RAM)
			if err != nil {
				t.Fatal(err)
			}
			flipByte(t, e.RAM, 1<<20+5)
			if err := os.Chtimes(e.RAM, fi.ModTime(), fi.ModTime()); err != nil {
				t.Fatal(err)
			}
			if after, err := os.Stat(e.RAM); err != nil || !after.ModTime().Equal(fi.ModTime()) || after.Size() != fi.Size() {
				t.Fatalf("restoring mtime: %v", err)
			}
		}, "ram digest mismatch"},
		{"bit-flipped ram in a hole", func(t *testing.T, e *Entry) { flipByte(t, e.RAM, 3<<20) }, "ram digest mismatch"},
		{"truncated ram", func(t *testing.T, e *Entry) {
			if err := os.Truncate(e.RAM, 1<<20); err != nil {
				t.Fatal(err)
			}
		}, "ram file truncated: 1048576 of 4194304 bytes"},
		{"wrong format version", func(t *testing.T, e *Entry) {
			rewriteMeta(t, e, func(s string) string { return strings.Replace(s, `"format": 1`, `"format": 0`, 1) })
		}, "format version 0, want 1"},
		{"future format version", func(t *testing.T, e *Entry) {
			rewriteMeta(t, e, func(s string) string {
				return strings.Replace(s, `"format": 1`, `"format": 2, "new_field": true`, 1)
			})
		}, "format version 2, want 1"},
		{"garbage meta.json", func(t *testing.T, e *Entry) {
			rewriteMeta(t, e, func(string) string { return "\x00\x01garbage" })
		}, "meta.json: …"},
		{"unknown field in meta.json", func(t *testing.T, e *Entry) {
			rewriteMeta(t, e, func(s string) string { return strings.Replace(s, `"format": 1`, `"format": 1, "x": 1`, 1) })
		}, `meta.json: json: unknown field "x"`},
		{"missing meta.json", func(t *testing.T, e *Entry) {
			if err := os.Remove(filepath.Join(e.Dir, "meta.json")); err != nil {
				t.Fatal(err)
			}
		}, "no meta.json"},
		{"meta.json of another key", func(t *testing.T, e *Entry) {
			rewriteMeta(t, e, func(s string) string { return strings.Replace(s, `"vcpus": 1`, `"vcpus": 3`, 1) })
		}, "meta.json: key does not match the snapshot id"},
		{"recorded state size changed", func(t *testing.T, e *Entry) {
			rewriteMeta(t, e, func(s string) string {
				return strings.Replace(s, `"state_size": 334000`, `"state_size": 334001`, 1)
			})
		}, "state file truncated: 334000 of 334001 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := newStore(t)
			k := testKey()
			e := mustCreate(t, s, k)
			// Let the files age past the racy window, then look up once so
			// that verification stamps exist: corruption must beat them.
			agePastRacyWindow(t, e)
			if _, err := s.Lookup(k); err != nil {
				t.Fatalf("Lookup before corruption: %v", err)
			}
			if n := stampCount(t, s, k.ID()); n != 2 {
				t.Fatalf("%d stamps after Lookup, want 2", n)
			}
			tt.corrupt(t, e)

			got, err := s.Lookup(k)
			var ie *InvalidError
			if !errors.As(err, &ie) {
				t.Fatalf("Lookup after corruption = %v, %v; want *InvalidError", got, err)
			}
			if want, ok := strings.CutSuffix(tt.reason, "…"); ok {
				if !strings.HasPrefix(ie.Reason, want) {
					t.Errorf("reason = %q, want prefix %q", ie.Reason, want)
				}
			} else if ie.Reason != tt.reason {
				t.Errorf("reason = %q, want %q", ie.Reason, tt.reason)
			}
			if ie.ID != k.ID() || ie.RemoveErr != nil {
				t.Errorf("InvalidError = %+v, want ID %s, removed", ie, k.ID())
			}
			if msg := ie.Error(); !strings.Contains(msg, ie.Reason) || !strings.Contains(msg, "removed and will be rebuilt") {
				t.Errorf("Error() = %q, want reason and removal", msg)
			}
			if names := storeNames(t, s); len(names) != 0 {
				t.Errorf("store holds %q after removing the invalid entry, want nothing", names)
			}
			if n := stampCount(t, s, k.ID()); n != 0 {
				t.Errorf("%d stamps left after removal, want 0", n)
			}
			if _, err := s.Lookup(k); !errors.Is(err, ErrNotFound) {
				t.Errorf("second Lookup = %v, want ErrNotFound", err)
			}
			// And Create rebuilds it.
			if _, err := s.Create(context.Background(), k, fillOK); err != nil {
				t.Errorf("Create after removal: %v", err)
			}
		})
	}
}

func stampCount(t *testing.T, s *Store, id string) int {
	t.Helper()
	ds, err := os.ReadDir(filepath.Join(s.Dir, stampDir))
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, d := range ds {
		if strings.HasPrefix(d.Name(), id+".") {
			n++
		}
	}
	return n
}

func TestVerificationStamp(t *testing.T) {
	s := newStore(t)
	k := testKey()
	e := mustCreate(t, s, k)
	agePastRacyWindow(t, e)
	if _, err := s.Lookup(k); err != nil {
		t.Fatalf("first Lookup: %v", err)
	}
	before := s.hashes.Load()
	if _, err := s.Lookup(k); err != nil {
		t.Fatalf("second Lookup: %v", err)
	}
	if n := s.hashes.Load() - before; n != 0 {
		t.Errorf("second Lookup of an unchanged entry hashed %d files, want 0", n)
	}
	// Touching the RAM file (same content) invalidates its stamp only.
	now := time.Now().Add(time.Second)
	if err := os.Chtimes(e.RAM, now, now); err != nil {
		t.Fatal(err)
	}
	before = s.hashes.Load()
	if _, err := s.Lookup(k); err != nil {
		t.Fatalf("Lookup after touching ram: %v", err)
	}
	if n := s.hashes.Load() - before; n != 1 {
		t.Errorf("Lookup after touching the RAM file hashed %d files, want 1", n)
	}
	if n := stampCount(t, s, k.ID()); n != 2 {
		t.Errorf("%d stamps, want 2 (old ram stamp replaced)", n)
	}
}

func TestKeyID(t *testing.T) {
	base := testKey()
	tests := []struct {
		field string
		edit  func(*Key)
	}{
		{"ImageDigest", func(k *Key) { k.ImageDigest = strings.Repeat("f", 64) }},
		{"Kernel", func(k *Key) { k.Kernel = "6.1.0-29-cloud-amd64" }},
		{"VMM", func(k *Key) { k.VMM = "QEMU emulator version 8.2.0" }},
		{"Accel", func(k *Key) { k.Accel = "kvm" }},
		{"MemoryMiB", func(k *Key) { k.MemoryMiB = 1024 }},
		{"VCPUs", func(k *Key) { k.VCPUs = 2 }},
		{"Devices", func(k *Key) { k.Devices = "microvm" }},
		{"Preload", func(k *Key) { k.Preload = []string{"numpy", "scipy"} }},
		{"Protocol", func(k *Key) { k.Protocol = FormatVersion + 1 }},
	}
	if n := reflect.TypeFor[Key]().NumField(); n != len(tests) {
		t.Fatalf("table covers %d fields, Key has %d: add the new field", len(tests), n)
	}
	seen := map[string]string{base.ID(): "base"}
	for _, tt := range tests {
		k := base
		k.Preload = append([]string(nil), base.Preload...)
		tt.edit(&k)
		id := k.ID()
		if len(id) != 32 || !validID(id) {
			t.Errorf("ID() = %q, want 32 hex digits", id)
		}
		if other, dup := seen[id]; dup {
			t.Errorf("changing %s gives ID %s, same as %s", tt.field, id, other)
		}
		seen[id] = tt.field
		if k.Equal(base) {
			t.Errorf("Key with other %s Equal(base) = true, want false", tt.field)
		}
	}
	// Same meaning, same ID.
	same := []struct {
		name string
		edit func(*Key)
	}{
		{"Protocol 0", func(k *Key) { k.Protocol = 0 }},
		{"copy", func(k *Key) { k.Preload = append([]string(nil), k.Preload...) }},
	}
	for _, tt := range same {
		k := base
		tt.edit(&k)
		if k.ID() != base.ID() {
			t.Errorf("%s: ID() = %s, want %s", tt.name, k.ID(), base.ID())
		}
	}
	nilPre, emptyPre := base, base
	nilPre.Preload, emptyPre.Preload = nil, []string{}
	if nilPre.ID() != emptyPre.ID() {
		t.Errorf("nil and empty Preload give IDs %s and %s, want equal", nilPre.ID(), emptyPre.ID())
	}
	swapped := base
	swapped.Preload = []string{"a", "b"}
	other := base
	other.Preload = []string{"b", "a"}
	if swapped.ID() == other.ID() {
		t.Errorf("Preload order ignored: both IDs %s, want different (import order changes memory)", swapped.ID())
	}
}

func TestCreateConcurrentGoroutines(t *testing.T) {
	s := newStore(t)
	k := testKey()
	const n = 4
	var logs testutil.LockedBuffer
	s.Log = slog.New(slog.NewTextHandler(&logs, nil))
	var fills atomic.Int32
	fill := func(ctx context.Context, ram, state string) error {
		fills.Add(1)
		// Hold the lock until every other creator is waiting for it (each
		// logs once that it waits).
		deadline := time.Now().Add(60 * time.Second)
		for strings.Count(logs.String(), waitingMsg) < n-1 {
			if time.Now().After(deadline) {
				return errors.New("the other creators did not reach the lock")
			}
			time.Sleep(5 * time.Millisecond)
		}
		return fillOK(ctx, ram, state)
	}
	ids := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			e, err := s.Create(context.Background(), k, fill)
			errs[i] = err
			if e != nil {
				ids[i] = e.ID
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Create #%d: %v", i, err)
		} else if ids[i] != k.ID() {
			t.Errorf("Create #%d returned ID %s, want %s", i, ids[i], k.ID())
		}
	}
	if got := fills.Load(); got != 1 {
		t.Errorf("fill ran %d times, want 1", got)
	}
	if names := storeNames(t, s); !cmp.Equal(names, []string{k.ID()}) {
		t.Errorf("store holds %q, want only %q", names, k.ID())
	}
}

const childEnv = "KILN_SNAPSHOT_TEST_CHILD"

// waitingMsg is what Store logs when it waits for another creator's lock.
const waitingMsg = "waiting for another kiln process using snapshot"

// otherWaits reports whether another child's log (sync/log-<pid>) says
// that it waits for the lock.
func otherWaits(sync string) bool {
	logs, _ := filepath.Glob(filepath.Join(sync, "log-*"))
	for _, l := range logs {
		if l == filepath.Join(sync, fmt.Sprintf("log-%d", os.Getpid())) {
			continue
		}
		if b, _ := os.ReadFile(l); strings.Contains(string(b), waitingMsg) {
			return true
		}
	}
	return false
}

// TestCreateChild is run by TestCreateConcurrentProcesses in child processes.
func TestCreateChild(t *testing.T) {
	dir := os.Getenv(childEnv)
	if dir == "" {
		t.Skip("helper for TestCreateConcurrentProcesses")
	}
	sync := filepath.Join(dir, "sync")
	if err := os.WriteFile(filepath.Join(sync, fmt.Sprintf("started-%d", os.Getpid())), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := Open(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	// This process's store logs into sync/log-<pid>, so that the other one
	// sees when this one waits for the lock.
	logf, err := os.Create(filepath.Join(sync, fmt.Sprintf("log-%d", os.Getpid())))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	s.Log = slog.New(slog.NewTextHandler(logf, nil))
	e, err := s.Create(context.Background(), testKey(), func(ctx context.Context, ram, state string) error {
		f, err := os.OpenFile(filepath.Join(sync, "fills"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		fmt.Fprintln(f, os.Getpid())
		f.Close()
		// Hold the lock until the other process waits for it.
		deadline := time.Now().Add(60 * time.Second)
		for !otherWaits(sync) {
			if time.Now().After(deadline) {
				return errors.New("the other process did not reach the lock")
			}
			time.Sleep(10 * time.Millisecond)
		}
		return fillOK(ctx, ram, state)
	})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("ID=%s\n", e.ID)
}

func TestCreateConcurrentProcesses(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		t.Skip("in a child")
	}
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "sync"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for range 2 {
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestCreateChild$", "-test.v")
		cmd.Env = append(os.Environ(), childEnv+"="+dir)
		out := new(bytes.Buffer)
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Errorf("child %d: %v\n%s", i, err, outs[i])
		} else if want := "ID=" + testKey().ID(); !strings.Contains(outs[i].String(), want) {
			t.Errorf("child %d output lacks %q:\n%s", i, want, outs[i])
		}
	}
	fills, err := os.ReadFile(filepath.Join(dir, "sync", "fills"))
	if err != nil {
		t.Fatalf("no fill ran: %v", err)
	}
	if lines := strings.Fields(string(fills)); len(lines) != 1 {
		t.Errorf("fill ran in %d processes (pids %q), want 1", len(lines), lines)
	}
	s, err := Open(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Lookup(testKey()); err != nil {
		t.Errorf("Lookup after concurrent creates: %v", err)
	}
}

func TestCreateFails(t *testing.T) {
	boom := errors.New("qemu exploded")
	tests := []struct {
		name string
		fill func(ctx context.Context, ram, state string) error
		want string
	}{
		{"fill error after writing", func(ctx context.Context, ram, state string) error {
			if err := fillOK(ctx, ram, state); err != nil {
				return err
			}
			return boom
		}, "qemu exploded"},
		{"no files", func(context.Context, string, string) error { return nil }, "no such file"},
		{"empty state", func(_ context.Context, ram, state string) error {
			if err := writeSnapshotFiles(ram, state, testMemMiB); err != nil {
				return err
			}
			return os.Truncate(state, 0)
		}, "empty state file"},
		{"wrong ram size", func(_ context.Context, ram, state string) error {
			return writeSnapshotFiles(ram, state, testMemMiB*2)
		}, "ram file has 8388608 bytes, want 4194304"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t)
			e, err := s.Create(context.Background(), testKey(), tt.fill)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Create = %v, %v; want error containing %q", e, err, tt.want)
			}
			if names := storeNames(t, s); len(names) != 0 {
				t.Errorf("store holds %q after a failed Create, want nothing", names)
			}
		})
	}
	s := newStore(t)
	if _, err := s.Create(context.Background(), testKey(), func(context.Context, string, string) error { return boom }); !errors.Is(err, boom) {
		t.Errorf("Create error = %v, want it to wrap the fill error", err)
	}
}

func TestCreateExisting(t *testing.T) {
	s := newStore(t)
	k := testKey()
	first := mustCreate(t, s, k)
	called := false
	second, err := s.Create(context.Background(), k, func(ctx context.Context, ram, state string) error {
		called = true
		return fillOK(ctx, ram, state)
	})
	if err != nil {
		t.Fatal(err)
	}
	if called {
		t.Error("Create of an existing valid snapshot called fill")
	}
	if !second.Meta.Created.Equal(first.Meta.Created) {
		t.Errorf("second Create made a new snapshot (created %v, first %v)", second.Meta.Created, first.Meta.Created)
	}
	// An invalid one is replaced.
	flipByte(t, first.State, 10)
	called = false
	if _, err := s.Create(context.Background(), k, func(ctx context.Context, ram, state string) error {
		called = true
		return fillOK(ctx, ram, state)
	}); err != nil {
		t.Fatal(err)
	}
	if !called {
		t.Error("Create over a corrupted snapshot did not call fill")
	}
	if _, err := s.Lookup(k); err != nil {
		t.Errorf("Lookup after re-create: %v", err)
	}
}

func TestCreateCanceledWhileWaiting(t *testing.T) {
	s := newStore(t)
	k := testKey()
	l, err := s.tryLock(k.ID())
	if err != nil {
		t.Fatal(err)
	}
	defer l.unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = s.Create(ctx, k, func(context.Context, string, string) error {
		t.Error("fill called while another holder has the lock")
		return nil
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Create while locked = %v, want context.DeadlineExceeded", err)
	}
}

func TestListRemoveTouch(t *testing.T) {
	s := newStore(t)
	k1, k2 := testKey(), testKey()
	k2.Accel = "kvm"
	e1 := mustCreate(t, s, k1)
	e2 := mustCreate(t, s, k2)
	// An unreadable entry is skipped.
	bad := filepath.Join(s.Dir, strings.Repeat("a", 32))
	if err := os.Mkdir(bad, 0o755); err != nil {
		t.Fatal(err)
	}
	list, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range list {
		ids = append(ids, e.ID)
	}
	want := []string{e1.ID, e2.ID}
	if e2.Meta.Created.Before(e1.Meta.Created) {
		want = []string{e2.ID, e1.ID}
	}
	if diff := cmp.Diff(want, ids); diff != "" {
		t.Errorf("List IDs (-want +got):\n%s", diff)
	}

	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(e1.Dir, later, later); err != nil { // so Touch is visibly different
		t.Fatal(err)
	}
	s.Touch(e1)
	if e1.LastUsed.Before(e1.Meta.Created) || e1.LastUsed.After(time.Now()) {
		t.Errorf("LastUsed after Touch = %v, want between created and now", e1.LastUsed)
	}
	got, err := s.Lookup(k1)
	if err != nil {
		t.Fatal(err)
	}
	if !got.LastUsed.Equal(e1.LastUsed) {
		t.Errorf("Lookup LastUsed = %v, want %v", got.LastUsed, e1.LastUsed)
	}

	if err := s.Remove(e1.ID); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if _, err := s.Lookup(k1); !errors.Is(err, ErrNotFound) {
		t.Errorf("Lookup after Remove = %v, want ErrNotFound", err)
	}
	if err := s.Remove(e1.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Remove = %v, want ErrNotFound", err)
	}
	if err := s.Remove("../../etc"); err == nil {
		t.Error("Remove(\"../../etc\") succeeded, want an error")
	}
	if _, err := s.Lookup(k2); err != nil {
		t.Errorf("Lookup of the other entry after Remove: %v", err)
	}
}

func TestGC(t *testing.T) {
	s := newStore(t)
	keepK, dropK, badK := testKey(), testKey(), testKey()
	dropK.VCPUs, badK.VCPUs = 2, 3
	keepE := mustCreate(t, s, keepK)
	dropE := mustCreate(t, s, dropK)
	badE := mustCreate(t, s, badK)
	flipByte(t, badE.State, 0)

	mkdir := func(name string, age time.Duration) string {
		p := filepath.Join(s.Dir, name)
		if err := os.MkdirAll(filepath.Join(p, "sub"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "ram"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(-age)
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
		return p
	}
	crashedID := strings.Repeat("c", 32)
	busyID := strings.Repeat("d", 32)
	crashed := mkdir(tmpPrefix+crashedID+"-123", 0)     // creator died: no lock holder
	busy := mkdir(tmpPrefix+busyID+"-456", 2*time.Hour) // creator alive
	oldJunk := mkdir(tmpPrefix+"junk", 2*time.Hour)     // no ID, old
	newJunk := mkdir(tmpPrefix+"junk2", 0)              // no ID, fresh
	l, err := s.tryLock(busyID)
	if err != nil {
		t.Fatal(err)
	}
	defer l.unlock()

	removed, err := s.GC(func(e Entry) bool { return e.ID != dropE.ID })
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	sort.Strings(removed)
	want := []string{dropE.ID, badE.ID}
	sort.Strings(want)
	if diff := cmp.Diff(want, removed); diff != "" {
		t.Errorf("GC removed (-want +got):\n%s", diff)
	}
	for _, p := range []string{crashed, oldJunk, dropE.Dir, badE.Dir} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after GC (%v)", p, err)
		}
	}
	for _, p := range []string{busy, newJunk, keepE.Dir} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s removed by GC: %v", p, err)
		}
	}
	if _, err := s.Lookup(keepK); err != nil {
		t.Errorf("Lookup of kept entry after GC: %v", err)
	}

	// keep nil keeps valid entries; a keep that rejects all empties the store.
	if removed, err := s.GC(nil); err != nil || len(removed) != 0 {
		t.Errorf("GC(nil) = %q, %v; want nothing removed", removed, err)
	}
	if removed, err := s.GC(func(Entry) bool { return false }); err != nil || !cmp.Equal(removed, []string{keepE.ID}) {
		t.Errorf("GC(none) = %q, %v; want [%s]", removed, err, keepE.ID)
	}
	if n := stampCount(t, s, keepE.ID); n != 0 {
		t.Errorf("%d stamps of removed entry left, want 0", n)
	}
}

func TestOpenEnv(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "from-env")
	t.Setenv(EnvVar, dir)
	s, err := Open("")
	if err != nil {
		t.Fatal(err)
	}
	if s.Dir != dir {
		t.Errorf("Open(\"\").Dir = %s, want %s", s.Dir, dir)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		t.Errorf("Open did not create %s: %v", dir, err)
	}
	t.Setenv(EnvVar, "")
	cacheDir := t.TempDir()
	t.Setenv("KILN_CACHE", cacheDir)
	s, err = Open("")
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(cacheDir, "snapshots"); s.Dir != want {
		t.Errorf("Open(\"\").Dir = %s, want %s", s.Dir, want)
	}
}

// TestPruneBudget: over the budget the least recently used snapshots go,
// never one in use nor one kept.
func TestPruneBudget(t *testing.T) {
	s := newStore(t)
	t.Setenv(BudgetEnv, "0")
	var es []*Entry
	for i := range 4 {
		k := testKey()
		k.Preload = []string{fmt.Sprintf("mod%d", i)}
		e := mustCreate(t, s, k)
		// Distinct last uses, oldest first.
		when := time.Now().Add(time.Duration(i-10) * time.Minute)
		if err := os.Chtimes(e.Dir, when, when); err != nil {
			t.Fatal(err)
		}
		es = append(es, e)
	}
	all, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	per := all[0].DiskUsage
	release, err := s.Use(es[0]) // the oldest is in use
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(BudgetEnv, strconv.FormatInt(2*per, 10))
	evicted, err := s.Prune(es[3].ID)
	if err != nil {
		t.Fatalf("Prune: %v", err)
	}
	if want := []string{es[1].ID, es[2].ID}; !cmp.Equal(evicted, want) {
		t.Errorf("Prune evicted %v, want %v (the least recently used that are not in use)", evicted, want)
	}
	release()
	evicted, err = s.Prune()
	if err != nil {
		t.Fatalf("Prune: %v", err)
	}
	if len(evicted) != 0 {
		t.Errorf("Prune within the budget evicted %v, want nothing", evicted)
	}
	t.Setenv(BudgetEnv, strconv.FormatInt(per, 10))
	evicted, err = s.Prune()
	if err != nil || !cmp.Equal(evicted, []string{es[0].ID}) {
		t.Errorf("Prune = %v, %v; want %s (no longer in use) evicted", evicted, err, es[0].ID)
	}
	if names := storeNames(t, s); !cmp.Equal(names, []string{es[3].ID}) {
		t.Errorf("store holds %q, want only %s", names, es[3].ID)
	}
	t.Setenv(BudgetEnv, "lots")
	if _, err := s.Prune(); err == nil || !strings.Contains(err.Error(), BudgetEnv) {
		t.Errorf("Prune with a bad budget = %v, want an error naming %s", err, BudgetEnv)
	}
}
