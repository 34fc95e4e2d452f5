package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// lock is an exclusive flock on Dir/<id>.lock. The lock file exists only
// while it is held: unlock removes it before releasing, and acquire checks
// after locking that the path still names the locked file (otherwise it was
// removed by the previous holder and acquire starts over).
type lock struct {
	f    *os.File
	path string
}

// errBusy is returned by tryLock when another holder has the lock.
var errBusy = errors.New("lock held")

func (s *Store) lockPath(id string) string { return filepath.Join(s.Dir, id+".lock") }

// acquire waits for the lock on id, polling so that ctx can cancel the wait.
func (s *Store) acquire(ctx context.Context, id string) (*lock, error) {
	delay := 5 * time.Millisecond
	logged := false
	for {
		l, err := s.tryLock(id)
		if err == nil {
			return l, nil
		}
		if !errors.Is(err, errBusy) {
			return nil, err
		}
		if !logged {
			s.log().Info("waiting for another kiln process using snapshot", "id", id)
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for snapshot %s lock: %w", id, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 200*time.Millisecond)
	}
}

// tryLock takes the lock on id without waiting; errBusy when it is held.
func (s *Store) tryLock(id string) (*lock, error) {
	path := s.lockPath(id)
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("opening snapshot lock: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, errBusy
			}
			return nil, fmt.Errorf("locking snapshot %s: %w", id, err)
		}
		// The previous holder may have removed the file between our open
		// and our flock: then we hold a lock nobody else can see.
		fdInfo, err1 := f.Stat()
		pathInfo, err2 := os.Stat(path)
		if err1 == nil && err2 == nil && os.SameFile(fdInfo, pathInfo) {
			return &lock{f: f, path: path}, nil
		}
		f.Close()
		if err1 != nil {
			return nil, fmt.Errorf("locking snapshot %s: %w", id, err1)
		}
		if err2 != nil && !errors.Is(err2, syscall.ENOENT) {
			return nil, fmt.Errorf("locking snapshot %s: %w", id, err2)
		}
	}
}

// unlock removes the lock file and releases the lock.
func (l *lock) unlock() {
	os.Remove(l.path)
	l.f.Close() // closing the last fd releases the flock
}
