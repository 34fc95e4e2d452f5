package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/snapshot"
	"github.com/kiln-dev/kiln/internal/vm"
)

// SnapshotMode says whether a Sandbox restores VMs from snapshots.
type SnapshotMode int

// Snapshot modes.
const (
	// SnapshotAuto restores from a matching snapshot, creating it first
	// (one cold boot with file-backed RAM, then a save) when there is none.
	SnapshotAuto SnapshotMode = iota
	// SnapshotUse restores from a matching snapshot when one exists and
	// cold-boots otherwise, without creating one.
	SnapshotUse
	// SnapshotOff always cold-boots.
	SnapshotOff
)

// snapshotKey returns the key of the snapshot that fits this sandbox.
func (s *Sandbox) snapshotKey(ctx context.Context) (snapshot.Key, error) {
	return vm.SnapshotKey(ctx, s.opts.VM, s.preload())
}

// PreloadError reports preload modules that the guest cannot import: the
// snapshot (which would hold them imported) is not made.
type PreloadError struct {
	Errors map[string]string // module → the guest's ImportError text
}

func (e *PreloadError) Error() string {
	mods := slices.Sorted(maps.Keys(e.Errors))
	var b strings.Builder
	for i, m := range mods {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s: %s", m, e.Errors[m])
	}
	return fmt.Sprintf("the image's preload list names modules the guest cannot import (%s): fix preload in kiln.toml and rebuild the image", b.String())
}

// snapshotEntry finds (or, in SnapshotAuto mode, creates) the snapshot to
// restore. It returns nil when the sandbox should cold-boot; every reason is
// logged. The error is one that cold-booting would not mend (a preload
// module the guest cannot import).
func (s *Sandbox) snapshotEntry(ctx context.Context) (*snapshot.Entry, error) {
	if s.opts.Snapshots == SnapshotOff {
		return nil, nil
	}
	st := s.opts.Store
	if st == nil {
		var err error
		if st, err = snapshot.Open(""); err != nil {
			s.log.Warn("snapshots unavailable, cold-booting", "error", err)
			return nil, nil
		}
		st.Log = s.log
		s.opts.Store = st
	}
	key, err := s.snapshotKey(ctx)
	if err != nil {
		s.log.Warn("snapshots unavailable, cold-booting", "error", err)
		return nil, nil
	}
	e, err := st.Lookup(key)
	if err == nil {
		s.snapshotID.Store(&e.ID)
		st.Touch(e)
		return e, nil
	}
	var inv *snapshot.InvalidError
	switch {
	case errors.As(err, &inv):
		s.log.Warn("not restoring a damaged snapshot; cold-booting", "reason", err)
	case errors.Is(err, snapshot.ErrNotFound):
		s.log.Debug("no snapshot yet", "id", key.ID())
	default:
		s.log.Warn("snapshot lookup failed; cold-booting", "error", err)
		return nil, nil
	}
	if s.opts.Snapshots != SnapshotAuto {
		return nil, nil
	}
	e, err = st.Create(ctx, key, func(ctx context.Context, ram, state string) (err error) {
		if s.opts.SnapshotCreating != nil {
			done := s.opts.SnapshotCreating(s.preload())
			defer func() { done(err) }()
		}
		return s.createSnapshot(ctx, ram, state)
	})
	var pe *PreloadError
	if errors.As(err, &pe) {
		return nil, err
	}
	if err != nil {
		s.log.Warn("creating a snapshot failed; cold-booting", "error", err)
		return nil, nil
	}
	s.SnapshotsCreated.Add(1)
	s.created = time.Since(s.began)
	s.snapshotID.Store(&e.ID)
	return e, nil
}

// SnapshotID returns the ID of the snapshot the sandbox restored from last,
// or "" when it cold-booted.
func (s *Sandbox) SnapshotID() string {
	if p := s.snapshotID.Load(); p != nil {
		return *p
	}
	return ""
}

// createSnapshot cold-boots a VM whose RAM is the shared file ram, waits for
// the agent to be preloaded and idle, and saves the device state to state.
func (s *Sandbox) createSnapshot(ctx context.Context, ram, state string) error {
	g, err := s.bootAgent(ctx, vm.WithSnapshotSource(ram))
	if err != nil {
		return fmt.Errorf("booting the snapshot source: %w", err)
	}
	defer g.close()
	if len(g.ready.Errors) > 0 {
		return &PreloadError{Errors: g.ready.Errors}
	}
	return g.vm.SaveSnapshot(ctx, ram, state)
}

// restore starts a clone from the snapshot files ram and state and makes it
// unique: fresh entropy for the kernel pool and Python's random module, and
// the host's wall clock.
func (s *Sandbox) restore(ctx context.Context, ram, state string) (_ *guestVM, err error) {
	v, err := vm.New(s.opts.VM, vm.WithSnapshot(ram, state))
	if err != nil {
		return nil, err
	}
	if err := v.Start(ctx); err != nil {
		return nil, err
	}
	g := s.newGuestVM(v)
	defer func() {
		if err != nil {
			g.close()
		}
	}()
	if err := g.reseed(ctx); err != nil {
		return nil, err
	}
	g.timings.Reseeded = time.Since(s.began)
	return g, nil
}

// Checkpoint files in a directory written by Sandbox.Checkpoint.
const (
	CheckpointRAM   = "ram"
	CheckpointState = "state"
)

// Checkpoint saves the running VM, with everything it did since it was
// restored, into dir (created; files "ram" and "state"), so that a Sandbox
// started with Options.RestoreFrom = dir continues from this point. Only a
// VM restored from a snapshot can be checkpointed (its RAM is file-backed).
// The VM stops when its state is saved; the next Invoke starts a new one.
func (s *Sandbox) Checkpoint(ctx context.Context, dir string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		return ErrClosed
	}
	g := s.vm
	if g == nil || g.isDead() {
		return &Error{Kind: KindVMDied, Msg: "no running VM to checkpoint"}
	}
	if !g.vm.Restored() {
		return errors.New("checkpoint needs a VM restored from a snapshot (file-backed RAM); start the sandbox with snapshots enabled")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating checkpoint directory: %w", err)
	}
	err := g.vm.SaveSnapshot(ctx, filepath.Join(dir, CheckpointRAM), filepath.Join(dir, CheckpointState))
	g.close()
	s.setVM(nil)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

// reseed sends fresh entropy and the time to the agent and waits for its
// answer.
func (g *guestVM) reseed(ctx context.Context) error {
	msg := proto.ReseedMsg{Entropy: vm.Entropy(64), TimeNS: time.Now().UnixNano()}
	if err := proto.WriteJSON(g.agent, proto.Reseed, msg); err != nil {
		return fmt.Errorf("reseeding the clone: %w", err)
	}
	for {
		f, err := g.next(ctx, time.Now().Add(time.Minute), time.Minute)
		if err != nil {
			return fmt.Errorf("reseeding the clone: %w", err)
		}
		if f.Type != proto.Reseeded {
			continue
		}
		var r proto.ReseededMsg
		if err := json.Unmarshal(f.Payload, &r); err != nil {
			return fmt.Errorf("decoding the reseed answer: %w", err)
		}
		if !r.OK {
			return fmt.Errorf("the clone could not reseed: %s", r.Error)
		}
		g.ready.Batch = r.Batch
		return nil
	}
}
