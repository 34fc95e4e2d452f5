// Package sandbox runs Python functions in warm kiln VMs: Start boots (or restores) a VM, Invoke sends it tasks, Close stops it.
//
// Lifecycle and concurrency rules:
//   - Start returns a Sandbox whose VM is booted and whose agent is ready.
//   - Invoke may be called from several goroutines, but calls are served one
//     at a time, in turn, by the one VM (warm reuse); a busy caller waits.
//   - A task that times out, or a VM that dies, is reported as a *Error of a
//     distinct Kind; the dead VM is released and the next Invoke boots a
//     replacement, so a Sandbox stays usable after any task failure.
//   - Close kills the VM and releases every resource (QEMU process, fds,
//     goroutines, temp files). It may be called at any time, more than once;
//     an Invoke in flight returns ErrClosed, and later calls do too.
package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/launch"
	"github.com/kiln-dev/kiln/internal/snapshot"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// Defaults for Options.
const (
	DefaultTimeout     = 5 * time.Minute
	DefaultMaxResult   = 10 << 20
	DefaultMaxOutput   = 1 << 20
	DefaultBootTimeout = 3 * time.Minute
)

// Options configure a Sandbox. The zero value is usable.
type Options struct {
	Launch      launch.Options
	Timeout     time.Duration   // per-task wall-clock limit; 0: DefaultTimeout
	MaxResult   int             // cap on a result's serialized value in bytes; 0: DefaultMaxResult
	MaxOutput   int             // cap on captured stdout and on stderr; 0: DefaultMaxOutput
	BootTimeout time.Duration   // limit on boot until the agent is ready; 0: DefaultBootTimeout
	Preload     []string        // modules the agent imports before it is ready; nil: the image's preload list
	Snapshots   SnapshotMode    // restore from snapshots (default SnapshotAuto)
	Store       *snapshot.Store // nil: snapshot.Open("")
	// RestoreFrom, when set, is a directory written by Checkpoint: every VM
	// of the sandbox is restored from it (no snapshot store involved).
	RestoreFrom string
}

func (o *Options) defaults() {
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.MaxResult <= 0 {
		o.MaxResult = DefaultMaxResult
	}
	if o.MaxOutput <= 0 {
		o.MaxOutput = DefaultMaxOutput
	}
	if o.BootTimeout <= 0 {
		o.BootTimeout = DefaultBootTimeout
	}
	if o.Launch.Log == nil {
		o.Launch.Log = slog.New(slog.DiscardHandler)
	}
	if o.Launch.Accel == "" {
		o.Launch.Accel, _ = vmm.DetectAccel()
	}
}

// Sandbox is a warm VM serving tasks; see the package comment for its rules.
type Sandbox struct {
	img  *image.Image
	opts Options
	log  *slog.Logger

	mu     sync.Mutex              // serializes Invoke and VM replacement
	vm     *guestVM                // guarded by mu
	vmRef  atomic.Pointer[guestVM] // mirrors vm for Close without mu
	closed atomic.Bool
	seq    atomic.Uint64

	// Boots counts VMs started by this sandbox (cold boots and restores,
	// replacements included); Restores counts the restores among them, and
	// SnapshotsCreated the snapshots this sandbox had to create first.
	snapshotID       atomic.Pointer[string]
	Boots            atomic.Int64
	Restores         atomic.Int64
	SnapshotsCreated atomic.Int64
}

// Start opens and verifies the image at path and boots a VM whose agent is
// ready to take tasks.
func Start(ctx context.Context, path string, opts Options) (*Sandbox, error) {
	opts.defaults()
	img, err := launch.Open(path)
	if err != nil {
		return nil, &Error{Kind: KindStart, Msg: "opening image", Err: err}
	}
	s := &Sandbox{img: img, opts: opts, log: opts.Launch.Log}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.ensureVM(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// VMPid returns the process ID of the current VMM, or 0 when no VM runs.
func (s *Sandbox) VMPid() int {
	if vm := s.vmRef.Load(); vm != nil {
		return vm.Machine.Pid()
	}
	return 0
}

// Image returns the sandbox's image.
func (s *Sandbox) Image() *image.Image { return s.img }

// Timings returns the boot timings of the current VM, if any.
func (s *Sandbox) Timings() launch.Timings {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vm == nil {
		return launch.Timings{}
	}
	return s.vm.Timings
}

func (s *Sandbox) preload() []string {
	if s.opts.Preload != nil {
		return s.opts.Preload
	}
	return s.img.Manifest.Preload
}

// ensureVM boots a VM when there is none. s.mu must be held.
func (s *Sandbox) ensureVM(ctx context.Context) error {
	if s.closed.Load() {
		return ErrClosed
	}
	if s.vm != nil && !s.vm.isDead() {
		return nil
	}
	if s.vm != nil {
		s.vm.Close()
		s.setVM(nil)
	}
	bctx, cancel := context.WithTimeout(ctx, s.opts.BootTimeout)
	defer cancel()
	var vm *guestVM
	var err error
	if dir := s.opts.RestoreFrom; dir != "" {
		vm, err = restore(bctx, s, filepath.Join(dir, CheckpointRAM), filepath.Join(dir, CheckpointState))
		if err != nil {
			return &Error{Kind: KindStart, Msg: "restoring checkpoint " + dir, Err: err}
		}
		s.Restores.Add(1)
	} else if e := s.snapshotEntry(bctx); e != nil {
		vm, err = restore(bctx, s, e.RAM, e.State)
		switch {
		case err == nil:
			s.Restores.Add(1)
		case bctx.Err() != nil:
			// Cancelled or out of time: the snapshot is not to blame.
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return &Error{Kind: KindStart, Msg: "restoring snapshot " + e.ID, Err: err}
		default:
			s.log.Warn("restoring the snapshot failed; removing it and cold-booting", "snapshot", e.ID, "error", err)
			if rerr := s.opts.Store.Remove(e.ID); rerr != nil {
				s.log.Warn("removing the snapshot", "snapshot", e.ID, "error", rerr)
			}
		}
	}
	if vm == nil {
		vm, err = bootAgent(bctx, s.img, s.preload(), s.opts, s.log)
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return &Error{Kind: KindStart, Msg: "booting a VM", Err: err}
	}
	s.Boots.Add(1)
	if s.closed.Load() {
		vm.Close()
		return ErrClosed
	}
	s.setVM(vm)
	return nil
}

func (s *Sandbox) setVM(vm *guestVM) {
	s.vm = vm
	s.vmRef.Store(vm)
}

// Invoke runs one task in the warm VM and returns its result. A function
// that raised is a successful Invoke whose Result has OK false. Failures of
// the sandbox itself are *Error values (ErrTimeout, ErrTooLarge, ErrOOM,
// ErrVMDied, ErrClosed, ErrStart).
func (s *Sandbox) Invoke(ctx context.Context, t *task.Task) (*task.Result, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.ensureVM(ctx); err != nil {
		return nil, err
	}
	tk := *t
	if tk.ID == "" {
		tk.ID = strconv.FormatUint(s.seq.Add(1), 10)
	}
	if tk.MaxResult <= 0 {
		tk.MaxResult = s.opts.MaxResult
	}
	if tk.MaxOutput <= 0 {
		tk.MaxOutput = s.opts.MaxOutput
	}
	vm := s.vm
	res, err := vm.call(ctx, &tk, s.opts.Timeout)
	if err != nil {
		if KindOf(err) == KindTimeout || KindOf(err) == KindVMDied || KindOf(err) == KindOOM || ctx.Err() != nil {
			// The VM is in an unknown state: replace it on the next call.
			vm.Close()
			s.setVM(nil)
		}
		if s.closed.Load() {
			return nil, ErrClosed
		}
		return nil, err
	}
	return res, nil
}

// Close kills the VM and releases its resources. It is idempotent and may be
// called while an Invoke is in flight.
func (s *Sandbox) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	// Kill the VM without waiting for s.mu: an Invoke in flight returns.
	if vm := s.vmRef.Load(); vm != nil {
		vm.Close()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vm != nil {
		s.vm.Close()
		s.setVM(nil)
	}
	return nil
}

// guestVM is a VM in serve mode with reader goroutines on both ports.
type guestVM struct {
	*launch.VM
	agent   net.Conn
	frames  chan proto.Frame // agent frames (Result, Reseeded)
	dead    chan struct{}    // closed when the agent channel ends
	errMu   sync.Mutex
	err     error // why the agent channel ended
	exit    chan proto.ExitMsg
	ready   proto.ReadyMsg
	maxLen  uint32
	memMiB  int
	ramFile string // the snapshot RAM file this clone maps privately, if restored
}

func bootAgent(ctx context.Context, img *image.Image, preload []string, o Options, log *slog.Logger) (_ *guestVM, err error) {
	cfg := proto.RunConfig{
		Mode:      proto.ModeServe,
		Env:       img.Manifest.Env,
		Hostname:  "kiln",
		AgentArgv: img.Manifest.Agent,
		Preload:   preload,
	}
	vm, err := launch.Boot(ctx, img, cfg, o.Launch)
	if err != nil {
		return nil, err
	}
	g := newGuestVM(vm, o, log)
	defer func() {
		if err != nil {
			g.Close()
		}
	}()
	f, err := g.next(ctx, time.Time{}, 0)
	if err != nil {
		return nil, fmt.Errorf("waiting for the agent: %w", err)
	}
	if f.Type != proto.Ready {
		return nil, fmt.Errorf("waiting for the agent: got a %s frame, want ready", f.Type)
	}
	if err := json.Unmarshal(f.Payload, &g.ready); err != nil {
		return nil, fmt.Errorf("decoding the agent's ready message: %w", err)
	}
	for mod, e := range g.ready.Errors {
		log.Warn("preload failed in the guest", "module", mod, "error", e)
	}
	return g, nil
}

func newGuestVM(vm *launch.VM, o Options, log *slog.Logger) *guestVM {
	g := &guestVM{
		VM:     vm,
		agent:  vm.Machine.Port(launch.AgentPort),
		frames: make(chan proto.Frame),
		dead:   make(chan struct{}),
		exit:   make(chan proto.ExitMsg, 1),
		maxLen: uint32(o.MaxResult + 2*o.MaxOutput + 1<<20),
		memMiB: vm.Image.Manifest.MemoryMiB,
	}
	if o.Launch.MemoryMiB > 0 {
		g.memMiB = o.Launch.MemoryMiB
	}
	go g.readAgent()
	go g.readCtl(log)
	return g
}

func (g *guestVM) readAgent() {
	r := proto.NewReader(g.agent, g.maxLen)
	for {
		f, err := r.Next()
		if err != nil {
			var tl *proto.TooLargeError
			if errors.As(err, &tl) {
				// The stream is still in sync: report the oversized frame.
				f = proto.Frame{Type: proto.Result, Payload: nil}
				select {
				case g.frames <- f:
					continue
				case <-g.Machine.Done():
				}
			}
			g.errMu.Lock()
			g.err = err
			g.errMu.Unlock()
			close(g.dead)
			return
		}
		select {
		case g.frames <- f:
		case <-g.Machine.Done():
			g.errMu.Lock()
			g.err = errors.New("the VM exited")
			g.errMu.Unlock()
			close(g.dead)
			return
		}
	}
}

func (g *guestVM) readCtl(log *slog.Logger) {
	r, _ := g.Ctl()
	for {
		f, err := r.Next()
		if err != nil {
			return
		}
		switch f.Type {
		case proto.Log:
			log.Debug("guest", "line", string(f.Payload))
		case proto.Event:
			// Boot phases of serve-mode VMs are not recorded: Timings
			// belongs to the goroutine that holds the sandbox.
		case proto.Exit:
			var e proto.ExitMsg
			if json.Unmarshal(f.Payload, &e) == nil {
				select {
				case g.exit <- e:
				default:
				}
			}
		}
	}
}

func (g *guestVM) isDead() bool {
	select {
	case <-g.dead:
		return true
	case <-g.Machine.Done():
		return true
	default:
		return false
	}
}

// next waits for the next agent frame until deadline (zero: only ctx
// bounds it); timeout is the limit the deadline came from, for the error.
func (g *guestVM) next(ctx context.Context, deadline time.Time, timeout time.Duration) (proto.Frame, error) {
	var tc <-chan time.Time
	if !deadline.IsZero() {
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		tc = t.C
	}
	select {
	case f := <-g.frames:
		return f, nil
	case <-g.dead:
		return proto.Frame{}, g.deathError()
	case <-g.Machine.Done():
		return proto.Frame{}, g.deathError()
	case <-tc:
		return proto.Frame{}, &Error{Kind: KindTimeout, Msg: fmt.Sprintf("timeout after %s", fmtSeconds(timeout))}
	case <-ctx.Done():
		return proto.Frame{}, ctx.Err()
	}
}

func fmtSeconds(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', -1, 64) + " s"
}

// deathError explains a dead guest, waiting briefly for init's Exit frame
// (which says whether the kernel's OOM killer struck).
func (g *guestVM) deathError() error {
	var e proto.ExitMsg
	var got bool
	select {
	case e = <-g.exit:
		got = true
	case <-time.After(3 * time.Second):
	}
	if got && e.OOM {
		return &Error{Kind: KindOOM, Msg: "out of memory: the guest kernel killed the agent; give the VM more memory (--memory)"}
	}
	g.errMu.Lock()
	cause := g.err
	g.errMu.Unlock()
	msg := "the VM died"
	switch {
	case got && e.Error != "":
		msg = "the agent exited: " + e.Error
	case got:
		msg = fmt.Sprintf("the agent exited with status %d%s", e.Code, sig(e.Signal))
	}
	select {
	case <-g.Machine.Done():
		if werr := g.Machine.Wait(); werr != nil {
			msg += fmt.Sprintf(" (VMM: %v)", werr)
		}
	default:
	}
	if cause != nil && !got {
		msg += " (" + cause.Error() + ")"
	}
	return &Error{Kind: KindVMDied, Msg: msg + launch.ConsoleTail(g.Machine.Console())}
}

func sig(s string) string {
	if s == "" {
		return ""
	}
	return " (signal " + s + ")"
}

func (g *guestVM) call(ctx context.Context, t *task.Task, timeout time.Duration) (*task.Result, error) {
	deadline := time.Now().Add(timeout)
	if err := proto.WriteJSON(g.agent, proto.Task, t); err != nil {
		return nil, g.deathError()
	}
	for {
		f, err := g.next(ctx, deadline, timeout)
		if err != nil {
			return nil, err
		}
		if f.Type != proto.Result {
			continue
		}
		if f.Payload == nil {
			return nil, &Error{Kind: KindTooLarge, Msg: fmt.Sprintf("the result frame exceeded the host's limit of %d bytes", g.maxLen)}
		}
		res, err := task.DecodeResult(f.Payload)
		if err != nil {
			return nil, &Error{Kind: KindVMDied, Msg: "decoding the agent's result", Err: err}
		}
		if res.ID != t.ID {
			continue // a late result of an earlier, abandoned task
		}
		if g.Timings.FirstResult == 0 {
			g.Timings.FirstResult = time.Since(g.Timings.Start)
		}
		if res.ErrorKind == "too_large" {
			msg := "result too large"
			if res.Error != nil {
				msg = res.Error.Message
			}
			return res, &Error{Kind: KindTooLarge, Msg: msg}
		}
		if !res.OK && res.Error != nil && res.Error.Type == "MemoryError" {
			return res, &Error{Kind: KindOOM, Msg: "out of memory: the function raised MemoryError in a VM of " + strconv.Itoa(g.memMiB) + " MiB; give it more memory (--memory)"}
		}
		return res, nil
	}
}
