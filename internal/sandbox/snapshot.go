package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/launch"
	"github.com/kiln-dev/kiln/internal/snapshot"
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

// devices fingerprints the machine configuration a snapshot depends on
// beyond the key's other fields: a change here must change the key.
const devices = "q35;virtio-blk:rootfs;virtio-serial:" + launch.CtlPort + "," + launch.AgentPort + ";cmdline:" + launch.Cmdline

// snapshotKey returns the key of the snapshot that fits this sandbox.
func (s *Sandbox) snapshotKey(ctx context.Context) (snapshot.Key, error) {
	bin := s.opts.Launch.QEMU
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	qv, err := snapshot.QEMUVersion(ctx, bin)
	if err != nil {
		return snapshot.Key{}, err
	}
	mem, cpus := s.img.Manifest.MemoryMiB, s.img.Manifest.VCPUs
	if s.opts.Launch.MemoryMiB > 0 {
		mem = s.opts.Launch.MemoryMiB
	}
	if s.opts.Launch.VCPUs > 0 {
		cpus = s.opts.Launch.VCPUs
	}
	return snapshot.Key{
		ImageDigest: s.img.Digest,
		Kernel:      s.img.Manifest.Kernel.Version,
		QEMU:        qv,
		Accel:       string(s.opts.Launch.Accel),
		MemoryMiB:   mem,
		VCPUs:       cpus,
		Devices:     devices,
		Preload:     s.preload(),
	}, nil
}

// snapshotEntry finds (or, in SnapshotAuto mode, creates) the snapshot to
// restore. It returns nil when the sandbox should cold-boot; every reason is
// logged.
func (s *Sandbox) snapshotEntry(ctx context.Context) *snapshot.Entry {
	if s.opts.Snapshots == SnapshotOff {
		return nil
	}
	st := s.opts.Store
	if st == nil {
		var err error
		if st, err = snapshot.Open(""); err != nil {
			s.log.Warn("snapshots unavailable, cold-booting", "error", err)
			return nil
		}
		st.Log = s.log
		s.opts.Store = st
	}
	key, err := s.snapshotKey(ctx)
	if err != nil {
		s.log.Warn("snapshots unavailable, cold-booting", "error", err)
		return nil
	}
	e, err := st.Lookup(key)
	if err == nil {
		s.snapshotID.Store(&e.ID)
		st.Touch(e)
		return e
	}
	var inv *snapshot.InvalidError
	switch {
	case errors.As(err, &inv):
		s.log.Warn("not restoring a damaged snapshot; cold-booting", "reason", err)
	case errors.Is(err, snapshot.ErrNotFound):
		s.log.Debug("no snapshot yet", "id", key.ID())
	default:
		s.log.Warn("snapshot lookup failed; cold-booting", "error", err)
		return nil
	}
	if s.opts.Snapshots != SnapshotAuto {
		return nil
	}
	e, err = st.Create(ctx, key, func(ctx context.Context, ram, state string) error {
		return s.createSnapshot(ctx, ram, state)
	})
	if err != nil {
		s.log.Warn("creating a snapshot failed; cold-booting", "error", err)
		return nil
	}
	s.SnapshotsCreated.Add(1)
	s.snapshotID.Store(&e.ID)
	return e
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
	o := s.opts
	o.Launch.RAMFile, o.Launch.RAMShared, o.Launch.Incoming = ram, true, false
	vm, err := bootAgent(ctx, s.img, s.preload(), o, s.log)
	if err != nil {
		return fmt.Errorf("booting the snapshot source: %w", err)
	}
	defer vm.Close()
	if err := vm.Machine.SaveState(ctx, state); err != nil {
		return fmt.Errorf("saving the VM state: %w", err)
	}
	return nil
}

// restore starts a clone from the snapshot files ram and state and makes it
// unique: fresh entropy for the kernel pool and Python's random module, and
// the host's wall clock.
func restore(ctx context.Context, s *Sandbox, ram, state string) (_ *guestVM, err error) {
	o := s.opts
	o.Launch.RAMFile, o.Launch.RAMShared, o.Launch.Incoming = ram, false, true
	vm, err := launch.Start(ctx, s.img, o.Launch)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			vm.Close()
		}
	}()
	if err := vm.Machine.LoadState(ctx, state); err != nil {
		return nil, fmt.Errorf("loading the VM state: %w", err)
	}
	vm.Timings.StateLoaded = time.Since(vm.Timings.Start)
	g := newGuestVM(vm, o, s.log)
	g.ramFile = ram
	defer func() {
		if err != nil {
			g.Close()
		}
	}()
	if err := g.reseed(ctx); err != nil {
		return nil, err
	}
	g.Timings.Reseeded = time.Since(g.Timings.Start)
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
	vm := s.vm
	if vm == nil || vm.isDead() {
		return &Error{Kind: KindVMDied, Msg: "no running VM to checkpoint"}
	}
	if vm.ramFile == "" {
		return errors.New("checkpoint needs a VM restored from a snapshot (file-backed RAM); start the sandbox with snapshots enabled")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating checkpoint directory: %w", err)
	}
	// The clone's RAM is a private copy-on-write mapping, so QEMU streams
	// all of it into the state file; the RAM file is then all zeros.
	ram := filepath.Join(dir, CheckpointRAM)
	fi, err := os.Stat(vm.ramFile)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if err := makeSparse(ram, fi.Size()); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	err = vm.Machine.SaveState(ctx, filepath.Join(dir, CheckpointState))
	vm.Close()
	s.setVM(nil)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

func makeSparse(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// reseed sends fresh entropy and the time to the agent and waits for its
// answer.
func (g *guestVM) reseed(ctx context.Context) error {
	msg := proto.ReseedMsg{Entropy: launch.Entropy(64), TimeNS: time.Now().UnixNano()}
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
		return nil
	}
}
