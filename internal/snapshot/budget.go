package snapshot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/kiln-dev/kiln/internal/size"
)

// BudgetEnv names the environment variable that sets the store's size
// budget ("20G"; "0" turns eviction off).
const BudgetEnv = "KILN_SNAPSHOT_BUDGET"

// DefaultBudgetShare is the part of the store's filesystem the default
// budget allows: 20 % of its free space plus what the store already uses.
const DefaultBudgetShare = 0.20

// Budget returns the store's size budget in bytes: $KILN_SNAPSHOT_BUDGET
// when set, else DefaultBudgetShare of the filesystem's free space plus the
// store's own usage (so the budget does not shrink as the store fills).
// 0 means no limit.
func (s *Store) Budget() (int64, error) {
	if v := os.Getenv(BudgetEnv); v != "" {
		n, err := size.Parse(v)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", BudgetEnv, err)
		}
		return n, nil
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(s.Dir, &fs); err != nil {
		return 0, fmt.Errorf("reading free space of %s: %w", s.Dir, err)
	}
	entries, err := s.List()
	if err != nil {
		return 0, err
	}
	var used int64
	for _, e := range entries {
		used += e.DiskUsage
	}
	free := int64(fs.Bavail) * int64(fs.Bsize)
	return int64(float64(free+used) * DefaultBudgetShare), nil
}

// Use marks e as in use until release is called: a VM restored from it
// runs. Prune never evicts an entry in use (by this or another process).
func (s *Store) Use(e *Entry) (release func(), err error) {
	f, err := os.OpenFile(s.usePath(e.ID), os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("marking snapshot %s in use: %w", e.ID, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH); err != nil {
		f.Close()
		return nil, fmt.Errorf("marking snapshot %s in use: %w", e.ID, err)
	}
	return func() { f.Close() }, nil
}

func (s *Store) usePath(id string) string { return filepath.Join(s.Dir, id+".use") }

// tryUnused takes id's use mark exclusively, which succeeds only when no
// VM restored from id runs; ok is false otherwise. release drops the mark,
// removing its file when the entry is gone (never before: a concurrent Use
// would lock an unlinked file).
func (s *Store) tryUnused(id string) (release func(removed bool), ok bool) {
	f, err := os.OpenFile(s.usePath(id), os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, false
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, false
	}
	return func(removed bool) {
		if removed {
			os.Remove(f.Name())
		}
		f.Close()
	}, true
}

// Prune evicts the least recently used snapshots until the store fits its
// budget (Budget), never one in use (Use) or busy in another process, nor
// the entries named in keep. It returns the evicted IDs.
func (s *Store) Prune(keep ...string) (evicted []string, err error) {
	budget, err := s.Budget()
	if err != nil || budget <= 0 {
		return nil, err
	}
	entries, err := s.List()
	if err != nil {
		return nil, err
	}
	var total int64
	for _, e := range entries {
		total += e.DiskUsage
	}
	sort.SliceStable(entries, func(i, j int) bool { return entries[i].LastUsed.Before(entries[j].LastUsed) })
	var errs []error
	for _, e := range entries {
		if total <= budget {
			break
		}
		if contains(keep, e.ID) {
			continue
		}
		release, ok := s.tryUnused(e.ID)
		if !ok {
			continue // a VM restored from it runs
		}
		l, err := s.tryLock(e.ID)
		if err != nil {
			release(false)
			if !errors.Is(err, errBusy) {
				errs = append(errs, err)
			}
			continue
		}
		err = s.removeLocked(e.ID)
		l.unlock()
		release(err == nil)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		total -= e.DiskUsage
		evicted = append(evicted, e.ID)
		s.log().Info("evicted a snapshot over the store's budget", "id", e.ID, "disk_usage", e.DiskUsage, "budget", budget, "last_used", e.LastUsed)
	}
	return evicted, errors.Join(errs...)
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if x == y {
			return true
		}
	}
	return false
}
