package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/kiln-dev/kiln/internal/cache"
)

// EnvVar names the environment variable that overrides the store location.
const EnvVar = "KILN_SNAPSHOTS"

// Names inside an entry directory.
const (
	metaName  = "meta.json"
	ramName   = "ram"
	stateName = "state"
)

// tmpPrefix starts the names of entry directories being created or removed.
const tmpPrefix = ".tmp-"

// staleAge is how old a temporary directory whose snapshot ID cannot be
// parsed must be before GC removes it. Temporary directories that carry an
// ID are removed as soon as nobody holds that ID's lock.
const staleAge = time.Hour

// ErrNotFound is returned by Lookup and Remove when there is no snapshot.
var ErrNotFound = errors.New("no snapshot")

// InvalidError reports a snapshot that failed validation. Lookup removes
// such a snapshot before returning the error.
type InvalidError struct {
	ID     string
	Reason string
	// RemoveErr is set when removing the unusable snapshot failed.
	RemoveErr error
}

func (e *InvalidError) Error() string {
	if e.RemoveErr != nil {
		return fmt.Sprintf("snapshot %s is unusable (%s); removing it failed: %v (remove %s by hand or run kiln snapshot gc)",
			e.ID, e.Reason, e.RemoveErr, e.ID)
	}
	return fmt.Sprintf("snapshot %s is unusable (%s); it was removed and will be rebuilt", e.ID, e.Reason)
}

func (e *InvalidError) Unwrap() error { return e.RemoveErr }

// Store is a directory of snapshots:
//
//	<Dir>/<id>/meta.json   Meta
//	<Dir>/<id>/ram         guest RAM (sparse, Key.MemoryMiB MiB)
//	<Dir>/<id>/state       device state (QEMU migration stream)
//	<Dir>/<id>.lock        flock, exists while held
//	<Dir>/<id>.use         shared flock of every VM restored from <id> (Use)
//	<Dir>/.tmp-<id>-*      entries being created or removed
//	<Dir>/.verified/       verification stamps
type Store struct {
	Dir string
	Log *slog.Logger // nil discards

	hashes atomic.Int64 // files hashed, for tests
}

// Entry is one snapshot in the store.
type Entry struct {
	ID    string `json:"id"`
	Key   Key    `json:"key"`
	Dir   string `json:"dir"`
	RAM   string `json:"ram"`   // Dir/ram
	State string `json:"state"` // Dir/state
	Meta  Meta   `json:"meta"`
	// DiskUsage is the space the entry's files occupy (the RAM file is sparse).
	DiskUsage int64 `json:"disk_usage"`
	// LastUsed is when Touch was last called for the entry (Created if never).
	LastUsed time.Time `json:"last_used"`
}

// Open returns the store in dir, creating the directory. An empty dir means
// $KILN_SNAPSHOTS, else the "snapshots" directory of the kiln cache.
func Open(dir string) (*Store, error) {
	if dir == "" {
		dir = os.Getenv(EnvVar)
	}
	if dir == "" {
		d, err := cache.Sub("snapshots")
		if err != nil {
			return nil, err
		}
		dir = d
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("resolving snapshot directory: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating snapshot directory (set %s to choose another): %w", EnvVar, err)
	}
	return &Store{Dir: dir}, nil
}

func (s *Store) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

func (s *Store) entry(id string) *Entry {
	dir := filepath.Join(s.Dir, id)
	return &Entry{ID: id, Dir: dir, RAM: filepath.Join(dir, ramName), State: filepath.Join(dir, stateName)}
}

// Lookup returns the valid snapshot for k. It returns ErrNotFound when there
// is none, and an *InvalidError when there is one that must not be restored
// (missing or damaged files, another format version, …): that snapshot has
// been removed by then, so the caller cold-boots and may create it again.
func (s *Store) Lookup(k Key) (*Entry, error) {
	if err := k.check(); err != nil {
		return nil, err
	}
	id := k.ID()
	e, reason, err := s.validate(id, &k)
	if err != nil || reason == "" {
		return e, err
	}
	// Re-check under the lock: another process may have replaced the entry.
	l, err := s.acquire(context.Background(), id)
	if err != nil {
		return nil, err
	}
	defer l.unlock()
	e, reason, err = s.validate(id, &k)
	if err != nil || reason == "" {
		return e, err
	}
	return nil, s.discard(id, reason)
}

// discard removes an invalid entry (the caller holds its lock).
func (s *Store) discard(id, reason string) *InvalidError {
	ie := &InvalidError{ID: id, Reason: reason}
	s.log().Warn("removing unusable snapshot", "id", id, "reason", reason)
	if err := s.removeLocked(id); err != nil && !errors.Is(err, ErrNotFound) {
		ie.RemoveErr = err
	}
	return ie
}

// validate checks the entry id. It returns the entry when it is valid, a
// reason when it is not, ErrNotFound when it does not exist, and other
// errors for problems that say nothing about the entry (permissions, I/O).
// When want is nil, the key recorded in meta.json is used.
func (s *Store) validate(id string, want *Key) (*Entry, string, error) {
	e := s.entry(id)
	fi, err := os.Lstat(e.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, "", ErrNotFound
	}
	if err != nil {
		return nil, "", fmt.Errorf("reading snapshot %s: %w", id, err)
	}
	if !fi.IsDir() {
		return nil, "not a directory", nil
	}
	data, err := os.ReadFile(filepath.Join(e.Dir, metaName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, "no meta.json", nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("reading snapshot %s: %w", id, err)
	}
	m, err := decodeMeta(data)
	if err != nil {
		return nil, err.Error(), nil
	}
	if m.Key.ID() != id {
		return nil, "meta.json: key does not match the snapshot id", nil
	}
	if want != nil && !m.Key.Equal(*want) {
		return nil, "meta.json: key does not match", nil
	}
	e.Key, e.Meta = m.Key, m
	if want := int64(m.Key.MemoryMiB) << 20; m.RAMSize != want {
		return nil, fmt.Sprintf("ram size %d, want %d for %d MiB", m.RAMSize, want, m.Key.MemoryMiB), nil
	}
	files := []struct {
		kind, path, digest string
		size               int64
	}{
		{"state", e.State, m.StateSHA256, m.StateSize},
		{"ram", e.RAM, m.RAMSHA256, m.RAMSize},
	}
	for _, f := range files {
		fi, err := os.Lstat(f.path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return nil, f.kind + " file missing", nil
		case err != nil:
			return nil, "", fmt.Errorf("reading snapshot %s: %w", id, err)
		case !fi.Mode().IsRegular():
			return nil, f.kind + " file is not a regular file", nil
		case fi.Size() == 0:
			return nil, "empty " + f.kind + " file", nil
		case fi.Size() < f.size:
			return nil, fmt.Sprintf("%s file truncated: %d of %d bytes", f.kind, fi.Size(), f.size), nil
		case fi.Size() > f.size:
			return nil, fmt.Sprintf("%s file too long: %d bytes, want %d", f.kind, fi.Size(), f.size), nil
		}
		e.DiskUsage += diskUsage(fi)
	}
	for _, f := range files {
		reason, err := s.verifyFile(id, f.kind, f.path, f.digest)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, f.kind + " file missing", nil
		}
		if err != nil {
			return nil, "", fmt.Errorf("verifying snapshot %s: %w", id, err)
		}
		if reason != "" {
			return nil, reason, nil
		}
	}
	e.LastUsed = lastUsed(e.Dir, m.Created)
	return e, "", nil
}

func diskUsage(fi fs.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// lastUsed is the entry directory's mtime, which Touch sets.
func lastUsed(dir string, created time.Time) time.Time {
	fi, err := os.Stat(dir)
	if err != nil || fi.ModTime().Before(created) {
		return created
	}
	return fi.ModTime()
}

// Create returns the valid snapshot for k, making it when there is none.
// Creators of one key are serialised across processes: a second Create
// waits for the first and then returns its snapshot without calling fill.
//
// fill receives two paths in a fresh temporary directory of the store and
// must write the guest RAM file (exactly Key.MemoryMiB MiB, sparse) and the
// device-state file there, and must not touch them after returning (the VM
// has exited). Create then records sizes and digests in meta.json and moves
// the directory into place atomically. On any failure nothing is left behind.
func (s *Store) Create(ctx context.Context, k Key, fill func(ctx context.Context, ram, state string) error) (_ *Entry, err error) {
	if err := k.check(); err != nil {
		return nil, err
	}
	k = k.normalize()
	id := k.ID()
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating snapshot directory: %w", err)
	}
	l, err := s.acquire(ctx, id)
	if err != nil {
		return nil, err
	}
	defer l.unlock()

	e, reason, err := s.validate(id, &k)
	switch {
	case err == nil && reason == "":
		s.log().Debug("snapshot already exists", "id", id)
		return e, nil
	case err == nil:
		s.discard(id, reason)
	case !errors.Is(err, ErrNotFound):
		return nil, err
	}

	tmp, err := os.MkdirTemp(s.Dir, tmpPrefix+id+"-")
	if err != nil {
		return nil, fmt.Errorf("creating snapshot: %w", err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	ram, state := filepath.Join(tmp, ramName), filepath.Join(tmp, stateName)
	start := time.Now()
	if err := fill(ctx, ram, state); err != nil {
		return nil, fmt.Errorf("creating snapshot %s: %w", id, err)
	}
	s.log().Debug("snapshot filled", "id", id, "duration", time.Since(start))

	m := Meta{Format: FormatVersion, Key: k, Created: time.Now().UTC().Round(time.Microsecond)}
	type hashed struct {
		before, after fs.FileInfo
		start         time.Time
	}
	var hs [2]hashed
	for i, f := range []struct {
		kind, path string
		size       *int64
		digest     *string
	}{
		{"ram", ram, &m.RAMSize, &m.RAMSHA256},
		{"state", state, &m.StateSize, &m.StateSHA256},
	} {
		if err := syncFile(f.path); err != nil {
			return nil, fmt.Errorf("creating snapshot %s: %s file: %w", id, f.kind, err)
		}
		hs[i].start = time.Now()
		digest, before, after, err := s.hashFile(f.path)
		if err != nil {
			return nil, fmt.Errorf("creating snapshot %s: %s file: %w", id, f.kind, err)
		}
		if !sameFile(before, after) {
			return nil, fmt.Errorf("creating snapshot %s: %s file changed while it was hashed (the VM must have exited when fill returns)", id, f.kind)
		}
		if after.Size() == 0 {
			return nil, fmt.Errorf("creating snapshot %s: empty %s file", id, f.kind)
		}
		*f.size, *f.digest = after.Size(), digest
		hs[i].before, hs[i].after = before, after
	}
	if want := int64(k.MemoryMiB) << 20; m.RAMSize != want {
		return nil, fmt.Errorf("creating snapshot %s: ram file has %d bytes, want %d (%d MiB)", id, m.RAMSize, want, k.MemoryMiB)
	}
	data, err := encodeMeta(m)
	if err != nil {
		return nil, fmt.Errorf("creating snapshot %s: %w", id, err)
	}
	if err := writeFileSync(filepath.Join(tmp, metaName), data); err != nil {
		return nil, fmt.Errorf("creating snapshot %s: %w", id, err)
	}
	// The directory's mtime is the entry's LastUsed time (see Touch).
	if err := os.Chtimes(tmp, m.Created, m.Created); err != nil {
		return nil, fmt.Errorf("creating snapshot %s: %w", id, err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("creating snapshot %s: %w", id, err)
	}
	if err := syncDir(tmp); err != nil {
		return nil, fmt.Errorf("creating snapshot %s: %w", id, err)
	}
	e = s.entry(id)
	if err := os.Rename(tmp, e.Dir); err != nil {
		return nil, fmt.Errorf("creating snapshot %s: %w", id, err)
	}
	if err := syncDir(s.Dir); err != nil {
		s.log().Warn("syncing snapshot directory", "err", err)
	}
	// The files keep inode, size and times across the directory rename, so
	// the hashes just taken stand for the final paths.
	for i, f := range []struct{ kind, path, digest string }{{"ram", e.RAM, m.RAMSHA256}, {"state", e.State, m.StateSHA256}} {
		if fi, err := os.Stat(f.path); err == nil && sameFile(fi, hs[i].after) {
			s.stamp(id, f.kind, f.path, hs[i].before, fi, f.digest, hs[i].start)
		}
	}
	e.Key, e.Meta = k, m
	e.LastUsed = m.Created
	if fi, err := os.Stat(e.RAM); err == nil {
		e.DiskUsage += diskUsage(fi)
	}
	if fi, err := os.Stat(e.State); err == nil {
		e.DiskUsage += diskUsage(fi)
	}
	s.log().Info("snapshot created", "id", id, "ram", m.RAMSize, "state", m.StateSize, "duration", time.Since(start))
	if _, err := s.Prune(id); err != nil {
		s.log().Warn("evicting snapshots over the store's budget", "err", err)
	}
	return e, nil
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func syncDir(path string) error { return syncFile(path) }

func writeFileSync(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// List returns the store's entries, oldest first. It reads meta.json and
// file sizes only (no hashing); Lookup does the full validation. Entries
// that cannot be read are skipped and logged; GC removes them.
func (s *Store) List() ([]Entry, error) {
	ds, err := os.ReadDir(s.Dir)
	if err != nil {
		return nil, fmt.Errorf("listing snapshots: %w", err)
	}
	var out []Entry
	for _, d := range ds {
		if !d.IsDir() || !validID(d.Name()) {
			continue
		}
		e, err := s.read(d.Name())
		if err != nil {
			s.log().Warn("skipping unreadable snapshot", "id", d.Name(), "err", err)
			continue
		}
		out = append(out, *e)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Meta.Created.Equal(out[j].Meta.Created) {
			return out[i].Meta.Created.Before(out[j].Meta.Created)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

// read decodes an entry's meta.json without verifying its files.
func (s *Store) read(id string) (*Entry, error) {
	e := s.entry(id)
	data, err := os.ReadFile(filepath.Join(e.Dir, metaName))
	if err != nil {
		return nil, err
	}
	m, err := decodeMeta(data)
	if err != nil {
		return nil, err
	}
	if m.Key.ID() != id {
		return nil, errors.New("meta.json: key does not match the snapshot id")
	}
	e.Key, e.Meta = m.Key, m
	for _, p := range []string{e.RAM, e.State} {
		if fi, err := os.Stat(p); err == nil {
			e.DiskUsage += diskUsage(fi)
		}
	}
	e.LastUsed = lastUsed(e.Dir, m.Created)
	return e, nil
}

// Remove removes the snapshot id, waiting for whoever holds its lock.
// A VM already restored from it keeps running: files are unlinked, never
// modified in place.
func (s *Store) Remove(id string) error {
	if !validID(id) {
		return fmt.Errorf("removing snapshot %q: not a snapshot id (32 hex digits, see kiln snapshot ls)", id)
	}
	l, err := s.acquire(context.Background(), id)
	if err != nil {
		return err
	}
	defer l.unlock()
	return s.removeLocked(id)
}

// removeLocked moves the entry out of the way atomically, then deletes it
// and its stamps. The caller holds the entry's lock.
func (s *Store) removeLocked(id string) error {
	dir := filepath.Join(s.Dir, id)
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing snapshot %s: %w", id, ErrNotFound)
	}
	trash, err := os.MkdirTemp(s.Dir, tmpPrefix+id+"-rm-")
	if err != nil {
		return fmt.Errorf("removing snapshot %s: %w", id, err)
	}
	gone := filepath.Join(trash, "entry")
	if err := os.Rename(dir, gone); err != nil {
		os.Remove(trash)
		return fmt.Errorf("removing snapshot %s: %w", id, err)
	}
	s.removeStamps(id + ".")
	if err := os.RemoveAll(trash); err != nil {
		return fmt.Errorf("removing snapshot %s: %w", id, err)
	}
	return nil
}

// Touch records that e was just used (its LastUsed time), for GC policies.
func (s *Store) Touch(e *Entry) {
	now := time.Now()
	if err := os.Chtimes(e.Dir, now, now); err != nil {
		s.log().Debug("touching snapshot", "id", e.ID, "err", err)
		return
	}
	e.LastUsed = now
}

// GC removes temporary directories left by crashed creators, entries that
// fail validation, and valid entries for which keep returns false (keep nil
// keeps every valid entry). It returns the IDs of the removed entries.
// Entries busy in another process are skipped.
func (s *Store) GC(keep func(Entry) bool) (removed []string, err error) {
	ds, err := os.ReadDir(s.Dir)
	if err != nil {
		return nil, fmt.Errorf("collecting snapshots: %w", err)
	}
	var errs []error
	live := map[string]bool{}
	for _, d := range ds {
		name := d.Name()
		switch {
		case strings.HasPrefix(name, tmpPrefix):
			if err := s.gcTemp(name); err != nil {
				errs = append(errs, err)
			}
		case d.IsDir() && validID(name):
			gone, err := s.gcEntry(name, keep)
			if err != nil {
				errs = append(errs, err)
			}
			if gone {
				removed = append(removed, name)
			} else {
				live[name] = true
			}
		}
	}
	// Stamps of entries that no longer exist.
	if stamps, err := os.ReadDir(filepath.Join(s.Dir, stampDir)); err == nil {
		for _, d := range stamps {
			id, _, _ := strings.Cut(d.Name(), ".")
			if !live[id] {
				os.Remove(filepath.Join(s.Dir, stampDir, d.Name()))
			}
		}
	}
	return removed, errors.Join(errs...)
}

// gcTemp removes the temporary directory name if no creator owns it.
func (s *Store) gcTemp(name string) error {
	path := filepath.Join(s.Dir, name)
	id, _, _ := strings.Cut(strings.TrimPrefix(name, tmpPrefix), "-")
	if !validID(id) {
		fi, err := os.Lstat(path)
		if err != nil || time.Since(fi.ModTime()) < staleAge {
			return nil
		}
		s.log().Info("removing stale temporary snapshot directory", "path", path)
		return os.RemoveAll(path)
	}
	l, err := s.tryLock(id)
	if errors.Is(err, errBusy) {
		return nil // being created or removed right now
	}
	if err != nil {
		return err
	}
	defer l.unlock()
	s.log().Info("removing stale temporary snapshot directory", "path", path)
	if err := os.RemoveAll(path); err != nil {
		return fmt.Errorf("removing %s: %w", path, err)
	}
	return nil
}

// gcEntry validates the entry id and removes it when it is invalid or keep
// rejects it. It reports whether the entry is gone.
func (s *Store) gcEntry(id string, keep func(Entry) bool) (bool, error) {
	l, err := s.tryLock(id)
	if errors.Is(err, errBusy) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer l.unlock()
	e, reason, err := s.validate(id, nil)
	switch {
	case errors.Is(err, ErrNotFound): // removed meanwhile by someone else
		return false, nil
	case err != nil:
		return false, err
	case reason != "":
		if ie := s.discard(id, reason); ie.RemoveErr != nil {
			return false, ie
		}
		return true, nil
	case keep != nil && !keep(*e):
		s.log().Info("removing snapshot", "id", id)
		if err := s.removeLocked(id); err != nil {
			return false, err
		}
		return true, nil
	}
	return false, nil
}

// ResolveID maps a full snapshot ID or a unique prefix of one to an ID. A
// full ID is taken as is, so that an entry too damaged to list can still be
// removed.
func (s *Store) ResolveID(arg string) (string, error) {
	arg = strings.ToLower(arg)
	if len(arg) == 32 {
		return arg, nil
	}
	if arg == "" {
		return "", errors.New("empty snapshot id")
	}
	entries, err := s.List()
	if err != nil {
		return "", err
	}
	var matches []string
	for _, e := range entries {
		if strings.HasPrefix(e.ID, arg) {
			matches = append(matches, e.ID)
		}
	}
	switch len(matches) {
	case 0:
		return "", fmt.Errorf("no snapshot matches %q (see kiln snapshot ls)", arg)
	case 1:
		return matches[0], nil
	}
	sort.Strings(matches)
	return "", fmt.Errorf("%q matches %d snapshots (%s); give more digits", arg, len(matches), strings.Join(matches, ", "))
}
