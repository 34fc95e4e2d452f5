// Package sandbox runs Python functions in warm kiln VMs: Start boots (or restores) a VM, Invoke sends it tasks, Close stops it.
//
// Sandbox keeps the agent's side of a VM: whether to restore a snapshot or
// create one first, the Ready and Reseed exchanges, task dispatch, limits
// and failure kinds, and replacing a VM that died. The VM's own life (boot,
// restore, snapshot saving, timings, why it died) belongs to package vm.
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
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/snapshot"
	"github.com/kiln-dev/kiln/internal/vm"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// Defaults for Options.
const (
	DefaultTimeout     = 5 * time.Minute
	DefaultMaxResult   = task.DefaultMaxResult
	DefaultMaxOutput   = task.DefaultMaxOutput
	DefaultBootTimeout = 3 * time.Minute
)

// Options configure a Sandbox. The zero value is usable.
type Options struct {
	// VM sizes and places the sandbox's VMs; its Image is set by Start.
	// VM.Volumes (vm.ParseVolume) are mounted in every VM the sandbox
	// starts, replacements and restores included; the snapshot is taken
	// with none mounted, so one snapshot serves any volume set.
	VM          vm.Config
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
	// SnapshotCreating, when set, is called when this sandbox has to
	// create its image's snapshot before it can restore from it (the first
	// use of an image: seconds to minutes), with the modules the snapshot
	// will have imported; the func it returns is called when that is done.
	SnapshotCreating func(preload []string) (done func(err error))
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
	if o.VM.Log == nil {
		o.VM.Log = slog.New(slog.DiscardHandler)
	}
	if o.VM.Accel == "" {
		o.VM.Accel, _ = vmm.DetectAccel()
	}
}

// Timings are a sandbox's phases for its current VM: the VM's own (since
// the VM's start), and what the sandbox did around it (since Began).
type Timings struct {
	vm.Timings
	Began           time.Time     // the sandbox began getting this VM
	SnapshotCreated time.Duration // a snapshot had to be created first, and was
	Reseeded        time.Duration // restore: the clone has fresh entropy and the host's clock
	FirstResult     time.Duration // the first result arrived
}

// Phases lists the reached phases in time order, all since Began.
func (t Timings) Phases() []vm.Phase {
	off := time.Duration(0)
	if !t.Began.IsZero() && !t.Timings.Start.IsZero() {
		off = t.Timings.Start.Sub(t.Began)
	}
	var all []vm.Phase
	if t.SnapshotCreated > 0 {
		all = append(all, vm.Phase{Name: "snapshot_created", Since: t.SnapshotCreated})
	}
	for _, p := range t.Timings.Phases() {
		all = append(all, vm.Phase{Name: p.Name, Since: p.Since + off})
	}
	all = append(all, vm.Reached(vm.Phase{Name: "reseeded", Since: t.Reseeded}, vm.Phase{Name: "first_result", Since: t.FirstResult})...)
	slices.SortStableFunc(all, func(a, b vm.Phase) int { return cmp.Compare(a.Since, b.Since) })
	return all
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
	sent   atomic.Int64 // tasks written to the agent and not answered

	began   time.Time     // ensureVM began getting the current VM (guarded by mu)
	created time.Duration // ... and a snapshot had to be created first, done then

	// Boots counts VMs started by this sandbox (cold boots and restores,
	// replacements included); Restores counts the restores among them, and
	// SnapshotsCreated the snapshots this sandbox had to create first.
	snapshotID       atomic.Pointer[string]
	Boots            atomic.Int64
	Restores         atomic.Int64
	SnapshotsCreated atomic.Int64
}

// Start boots a VM of img (opened and verified by the caller, see
// image.OpenVerified) whose agent is ready to take tasks.
func Start(ctx context.Context, img *image.Image, opts Options) (*Sandbox, error) {
	opts.defaults()
	opts.VM.Image = img
	if err := opts.VM.Validate(); err != nil {
		return nil, &Error{Kind: KindStart, Msg: "starting a sandbox", Err: err}
	}
	s := &Sandbox{img: img, opts: opts, log: opts.VM.Log}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.ensureVM(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// VMPid returns the process ID of the current VMM, or 0 when no VM runs.
func (s *Sandbox) VMPid() int {
	if g := s.vmRef.Load(); g != nil {
		return g.vm.Pid()
	}
	return 0
}

// InFlight returns the number of tasks sent to the agent and not answered
// yet (0 or 1: a sandbox runs one task at a time).
func (s *Sandbox) InFlight() int { return int(s.sent.Load()) }

// Image returns the sandbox's image.
func (s *Sandbox) Image() *image.Image { return s.img }

// Timings returns the timings of the current VM, if any.
func (s *Sandbox) Timings() Timings {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vm == nil {
		return Timings{}
	}
	t := s.vm.timings
	t.Timings = s.vm.vm.Timings()
	return t
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
		s.vm.close()
		s.setVM(nil)
	}
	bctx, cancel := context.WithTimeout(ctx, s.opts.BootTimeout)
	defer cancel()
	s.began = time.Now()
	s.created = 0
	var g *guestVM
	var err error
	if dir := s.opts.RestoreFrom; dir != "" {
		g, err = s.restore(bctx, filepath.Join(dir, CheckpointRAM), filepath.Join(dir, CheckpointState))
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return &Error{Kind: KindStart, Msg: "restoring checkpoint " + dir, Err: err}
		}
		s.Restores.Add(1)
	} else if e, serr := s.snapshotEntry(bctx); serr != nil {
		return &Error{Kind: KindStart, Msg: "creating the image's snapshot", Err: serr}
	} else if e != nil {
		release, uerr := s.opts.Store.Use(e)
		if uerr != nil {
			s.log.Warn("marking the snapshot in use", "snapshot", e.ID, "error", uerr)
			release = func() {}
		}
		g, err = s.restore(bctx, e.RAM, e.State)
		switch {
		case err == nil:
			g.release = release
			s.Restores.Add(1)
		case bctx.Err() != nil || errors.Is(err, vm.ErrVolumes):
			release()
			// Cancelled, out of time or volumes that cannot be
			// mounted: the snapshot is not to blame.
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return &Error{Kind: KindStart, Msg: "restoring snapshot " + e.ID, Err: err}
		default:
			release()
			s.log.Warn("restoring the snapshot failed; removing it and cold-booting", "snapshot", e.ID, "error", err)
			if rerr := s.opts.Store.Remove(e.ID); rerr != nil {
				s.log.Warn("removing the snapshot", "snapshot", e.ID, "error", rerr)
			}
		}
	}
	if g == nil {
		g, err = s.bootAgent(bctx)
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return &Error{Kind: KindStart, Msg: "booting a VM", Err: err}
	}
	s.Boots.Add(1)
	if s.closed.Load() {
		g.close()
		return ErrClosed
	}
	g.timings.Began, g.timings.SnapshotCreated = s.began, s.created
	s.setVM(g)
	return nil
}

func (s *Sandbox) setVM(g *guestVM) {
	s.vm = g
	s.vmRef.Store(g)
}

// Invoke runs one task in the warm VM and returns its result. A function
// that raised is a successful Invoke whose Result has OK false. Failures of
// the sandbox itself are *Error values (ErrTimeout, ErrTooLarge, ErrOOM,
// ErrVMDied, ErrClosed, ErrStart).
func (s *Sandbox) Invoke(ctx context.Context, t *task.Task) (*task.Result, error) {
	return s.InvokeStreams(ctx, t, Streams{})
}

// Streams connect a task's fds to the caller, as vm.Stdio does a cold
// command's. Stdout and Stderr receive what the task writes to fd 1 and
// fd 2 as it is written (a function task's Result captures it all the
// same, up to MaxOutput); nil writers leave the output captured only.
// Stdin, when set, is the task's fd 0 until it ends; nil gives the task
// /dev/null.
type Streams = vm.Stdio

// InvokeStreams is Invoke with the task's fds connected to st.
func (s *Sandbox) InvokeStreams(ctx context.Context, t *task.Task, st Streams) (*task.Result, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	res, err := s.invokeLocked(ctx, t, s.opts.Timeout, st)
	if err != nil {
		return nil, err
	}
	return res, nil
}

// invokeLocked runs t on the sandbox's VM, started first if need be, with
// its fds connected to st. It returns what the call gave: the result even
// beside an error (a result over its limit), and the error as failed
// reports it. s.mu is held.
func (s *Sandbox) invokeLocked(ctx context.Context, t *task.Task, timeout time.Duration, st Streams) (*task.Result, error) {
	if err := s.ensureVM(ctx); err != nil {
		return nil, err
	}
	tk := s.prepare(t)
	tk.Stream = st.Stdout != nil || st.Stderr != nil
	tk.Stdin = st.Stdin != nil
	g := s.vm
	res, err := g.call(ctx, tk, timeout, &s.sent, st)
	if err != nil {
		err = s.failed(ctx, g, err)
	}
	return res, err
}

// prepare returns a copy of t with the sandbox's defaults filled in.
func (s *Sandbox) prepare(t *task.Task) *task.Task {
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
	return &tk
}

// failed handles a task's error on g: a VM in an unknown state (a
// timeout, a death, an abandoned call) is replaced on the next call. It
// returns the error to report. s.mu is held.
func (s *Sandbox) failed(ctx context.Context, g *guestVM, err error) error {
	if k := KindOf(err); k == KindTimeout || k == KindVMDied || k == KindOOM || ctx.Err() != nil {
		g.close()
		s.setVM(nil)
	}
	if s.closed.Load() {
		return ErrClosed
	}
	return err
}

// Replaced reports whether err, from Invoke or InvokeBatch, ended the VM
// it ran on: a timeout, the VM's death, or a call abandoned through its
// context. Tasks after it in a batch did not run.
func Replaced(ctx context.Context, err error) bool {
	if err == nil {
		return false
	}
	k := KindOf(err)
	return k == KindTimeout || k == KindVMDied || k == KindOOM || k == KindStart || ctx.Err() != nil || errors.Is(err, ErrClosed)
}

// ErrNotRun is InvokeEach's outcome for the tasks it had sent ahead when
// a failure ended the VM: they did not start, and may be run again.
var ErrNotRun = errors.New("the VM ended before the task started")

// Ahead is how many tasks InvokeEach keeps sent beyond the one running: a
// result's way to the host and the next task's way back take longer than
// a small task itself (under TCG most of all), so with one task ahead the
// VM would still wait. The window is refilled once half of it is free, in
// one write: every frame costs the VMM's I/O thread and the guest an
// interrupt's worth of work.
const Ahead = 7

// BatchAhead is Ahead for an agent that takes Tasks frames: the tasks
// sent in one refill that share a function go as one Batch, decoded at
// once by the agent, whose results come back several to a write. The
// window is wider so that a refill is a batch worth sending.
const BatchAhead = 63

// encodeTasks writes ts as frames to buf: each run of tasks that may
// share a Batch as one Tasks frame when batch is set, the others as Task
// frames. It returns how many of ts it wrote (fewer on an encoding error).
func encodeTasks(buf *bytes.Buffer, ts []*task.Task, batch bool) int {
	for i := 0; i < len(ts); {
		j := i + 1
		for batch && j < len(ts) && task.Batchable(ts[i], ts[j]) {
			j++
		}
		var err error
		if j-i > 1 {
			err = proto.WriteJSON(buf, proto.Tasks, task.NewBatch(ts[i:j]))
		} else {
			err = proto.WriteJSON(buf, proto.Task, ts[i])
		}
		if err != nil {
			return i // not encodable (cannot happen for decoded tasks)
		}
		i = j
	}
	return len(ts)
}

// InvokeEach runs a stream of tasks on the sandbox's VM, one after
// another, with the next ones (up to Ahead) sent while one runs, so that
// the agent starts each as soon as the one before ends: a warm VM's cost
// per task is then its own, not a round trip to the host. With an agent
// that takes Tasks frames, the window is BatchAhead, tasks of one function
// go as batches and their results come back several to a write; when such
// a VM dies or times out with several tasks unanswered, those run again
// one at a time (isolate), so that the failure is the failing task's
// alone, and a task whose result was lost with the VM runs again.
//
// next returns each task to send, or nil when there is none (InvokeEach
// then finishes what it sent and returns). done is called once for each
// task next returned, in order: with its outcome, or with ErrNotRun for
// the tasks sent ahead when a failure ended the VM (see Replaced; the call
// then returns, and the next one gets a new VM). When done is called for
// a task, the task sent after it, if any, is starting. Each task's
// timeout (0: Options.Timeout) runs from the end of the one before. next
// and done run on the calling goroutine, one at a time. Streams and stdin
// are Invoke's alone.
func (s *Sandbox) InvokeEach(ctx context.Context, timeout time.Duration, next func() *task.Task, done func(t *task.Task, res *task.Result, err error)) {
	first := next()
	if first == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.ensureVM(ctx); err != nil {
		done(first, nil, err)
		return
	}
	if timeout <= 0 {
		timeout = s.opts.Timeout
	}
	g := s.vm
	ahead := Ahead
	if g.ready.Batch {
		ahead = BatchAhead
	}
	type sentTask struct{ mine, theirs *task.Task }
	var inFlight []sentTask // oldest (running) first
	notRun := func() {
		for _, t := range inFlight {
			s.sent.Add(-1)
			done(t.theirs, nil, ErrNotRun)
		}
	}
	var buf bytes.Buffer
	var batch []sentTask
	var unsent []*task.Task // tasks not sent (the VM is going) or not encodable
	// send writes the tasks of batch in one write.
	send := func() error {
		defer func() { buf.Reset(); batch = batch[:0] }()
		mine := make([]*task.Task, len(batch))
		for i, b := range batch {
			mine[i] = b.mine
		}
		n := encodeTasks(&buf, mine, g.ready.Batch)
		if _, err := g.agent.Write(buf.Bytes()); err != nil {
			return s.failed(ctx, g, g.deathError())
		}
		s.sent.Add(int64(n))
		inFlight = append(inFlight, batch[:n]...)
		for _, b := range batch[n:] {
			unsent = append(unsent, b.theirs)
		}
		return nil
	}
	pending := first
	exhausted := false // next returned nil
	for {
		// Refill the window (the running task and ahead more) once half of
		// it is free, or when nothing runs.
		if len(unsent) == 0 && !exhausted && (len(inFlight) <= (ahead+1)/2 || len(inFlight) == 0) {
			for len(inFlight)+len(batch) <= ahead {
				t := pending
				if t == nil {
					t = next()
				}
				pending = nil
				if t == nil {
					exhausted = true
					break
				}
				tk := s.prepare(t)
				tk.Stream, tk.Stdin = false, false
				batch = append(batch, sentTask{tk, t})
			}
			if len(batch) > 0 {
				theirs := make([]*task.Task, len(batch))
				for i, b := range batch {
					theirs[i] = b.theirs
				}
				if err := send(); err != nil {
					if len(inFlight) == 0 {
						done(theirs[0], nil, err)
						for _, t := range append(theirs[1:], unsent...) {
							done(t, nil, ErrNotRun)
						}
						return
					}
					// The tasks sent before them may still be answered.
					unsent = append(theirs, unsent...)
				}
			}
		}
		if len(inFlight) == 0 {
			for _, t := range unsent {
				done(t, nil, ErrNotRun)
			}
			return
		}
		cur := inFlight[0]
		res, err := g.await(ctx, cur.mine, time.Now().Add(timeout), timeout, Streams{})
		inFlight = inFlight[1:]
		s.sent.Add(-1)
		if err != nil {
			err = s.failed(ctx, g, err)
		}
		if g.ready.Batch && res == nil && len(inFlight) > 0 && ctx.Err() == nil && isolates(err) {
			// The agent writes a batch's results several at a time, so a
			// later task of the batch may have ended the VM (or held it
			// past cur's deadline) after cur's result was ready but before
			// it was written: who failed is not known. The unanswered
			// tasks run again, one at a time, each with its own outcome.
			rest := []*task.Task{cur.theirs}
			for _, t := range inFlight {
				s.sent.Add(-1)
				rest = append(rest, t.theirs)
			}
			s.isolate(ctx, timeout, append(rest, unsent...), done)
			return
		}
		done(cur.theirs, res, err)
		if Replaced(ctx, err) {
			notRun()
			for _, t := range unsent {
				done(t, nil, ErrNotRun)
			}
			return
		}
	}
}

// isolates reports whether err, from a VM running a batch that sent no
// result for the task, leaves unknown which of the batch's unanswered
// tasks caused it (see InvokeEach).
func isolates(err error) bool {
	switch KindOf(err) {
	case KindVMDied, KindOOM, KindTimeout:
		return true
	}
	return false
}

// isolate runs ts one after another, one Task frame each (whose result
// the agent writes at once), on the sandbox's VM or a new one, and calls
// done for each in order; after a failure that ends the VM, the rest are
// ErrNotRun. A task in ts may have run before, its result lost with the
// VM: it runs again, as a retry would. s.mu is held.
func (s *Sandbox) isolate(ctx context.Context, timeout time.Duration, ts []*task.Task, done func(t *task.Task, res *task.Result, err error)) {
	for i, t := range ts {
		res, err := s.invokeLocked(ctx, t, timeout, Streams{})
		done(t, res, err)
		if err != nil && Replaced(ctx, err) {
			for _, t := range ts[i+1:] {
				done(t, nil, ErrNotRun)
			}
			return
		}
	}
}

// Close kills the VM and releases its resources. It is idempotent and may be
// called while an Invoke is in flight.
func (s *Sandbox) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	// Kill the VM without waiting for s.mu: an Invoke in flight returns.
	if g := s.vmRef.Load(); g != nil {
		g.close()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vm != nil {
		s.vm.close()
		s.setVM(nil)
	}
	return nil
}

// guestVM is a VM whose agent serves tasks, with a reader goroutine on the
// agent port.
type guestVM struct {
	vm      *vm.VM
	log     *slog.Logger
	agent   net.Conn
	frames  chan proto.Frame // agent frames (Result, Reseeded)
	dead    chan struct{}    // closed when the agent channel ends
	errMu   sync.Mutex
	err     error // why the agent channel ended
	ready   proto.ReadyMsg
	maxLen  uint32
	timings Timings // the sandbox's phases; the VM's are read from vm
	release func()  // drops the snapshot's use mark (restored VMs), or nil
	closed  sync.Once
}

// bootAgent cold-boots a VM running the agent and waits for it to be ready.
func (s *Sandbox) bootAgent(ctx context.Context, opts ...vm.Option) (*guestVM, error) {
	v, err := vm.New(s.opts.VM, append([]vm.Option{vm.WithAgent(s.preload())}, opts...)...)
	if err != nil {
		return nil, err
	}
	if err := v.Start(ctx); err != nil {
		return nil, err
	}
	g := s.newGuestVM(v)
	if err := g.waitReady(ctx); err != nil {
		g.close()
		return nil, err
	}
	return g, nil
}

func (s *Sandbox) newGuestVM(v *vm.VM) *guestVM {
	g := &guestVM{
		vm:     v,
		log:    s.log,
		agent:  v.Agent(),
		frames: make(chan proto.Frame),
		dead:   make(chan struct{}),
		maxLen: uint32(s.opts.MaxResult + 2*s.opts.MaxOutput + 1<<20),
	}
	go g.readAgent()
	return g
}

// close kills the VM and drops its snapshot's use mark; it may be called
// from any goroutine, more than once.
func (g *guestVM) close() {
	g.vm.Close()
	g.closed.Do(func() {
		if g.release != nil {
			g.release()
		}
	})
}

// waitReady waits for the agent's Ready frame.
func (g *guestVM) waitReady(ctx context.Context) error {
	f, err := g.next(ctx, time.Time{}, 0)
	if err != nil {
		return fmt.Errorf("waiting for the agent: %w", err)
	}
	if f.Type != proto.Ready {
		return fmt.Errorf("waiting for the agent: got a %s frame, want ready", f.Type)
	}
	if err := json.Unmarshal(f.Payload, &g.ready); err != nil {
		return fmt.Errorf("decoding the agent's ready message: %w", err)
	}
	for mod, e := range g.ready.Errors {
		g.log.Warn("preload failed in the guest", "module", mod, "error", e)
	}
	return nil
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
				case <-g.vm.Done():
				}
			}
			g.setErr(err)
			return
		}
		select {
		case g.frames <- f:
		case <-g.vm.Done():
			g.setErr(errors.New("the VM exited"))
			return
		}
	}
}

func (g *guestVM) setErr(err error) {
	g.errMu.Lock()
	g.err = err
	g.errMu.Unlock()
	close(g.dead)
}

func (g *guestVM) isDead() bool {
	select {
	case <-g.dead:
		return true
	case <-g.vm.Done():
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
	case <-g.vm.Done():
		return proto.Frame{}, g.deathError()
	case <-tc:
		return proto.Frame{}, &Error{Kind: KindTimeout, Msg: fmt.Sprintf("timeout after %s", fmtSeconds(timeout))}
	case <-ctx.Done():
		return proto.Frame{}, ctx.Err()
	}
}

// stdinPump sends a task's input to the agent as Stdin frames and ends it
// with exactly one empty frame, also when the task finishes first (the
// agent relies on that; see agent.py's Router).
type stdinPump struct {
	conn net.Conn
	mu   sync.Mutex
	done bool // the end of input was sent
}

func newStdinPump(conn net.Conn, r io.Reader) *stdinPump {
	p := &stdinPump{conn: conn}
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Read(buf)
			if n > 0 && !p.send(buf[:n]) {
				return
			}
			if err != nil {
				p.finish()
				return
			}
		}
	}()
	return p
}

// send writes one chunk unless the input has ended; false when it has.
func (p *stdinPump) send(b []byte) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		return false
	}
	if err := proto.Write(p.conn, proto.Stdin, b); err != nil {
		p.done = true
		return false
	}
	return true
}

// finish sends the end of input once.
func (p *stdinPump) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.done {
		p.done = true
		_ = proto.Write(p.conn, proto.Stdin, nil)
	}
}

func fmtSeconds(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', -1, 64) + " s"
}

// deathError turns the VM's account of the agent's end into a sandbox
// error: out of memory when the guest kernel's OOM killer struck, else a
// dead VM.
func (g *guestVM) deathError() error {
	g.errMu.Lock()
	cause := g.err
	g.errMu.Unlock()
	d := g.vm.Death("the agent", cause)
	if d.OOM() {
		return &Error{Kind: KindOOM, Msg: "out of memory: the guest kernel killed the agent; give the VM more memory (--memory)"}
	}
	return &Error{Kind: KindVMDied, Msg: d.Error()}
}

func (g *guestVM) call(ctx context.Context, t *task.Task, timeout time.Duration, inFlight *atomic.Int64, st Streams) (*task.Result, error) {
	deadline := time.Now().Add(timeout)
	if err := proto.WriteJSON(g.agent, proto.Task, t); err != nil {
		return nil, g.deathError()
	}
	inFlight.Add(1)
	defer inFlight.Add(-1)
	if st.Stdin != nil {
		in := newStdinPump(g.agent, st.Stdin)
		defer in.finish()
	}
	return g.await(ctx, t, deadline, timeout, st)
}

// await reads the agent's frames until t's result, relaying its streamed
// output to st.
func (g *guestVM) await(ctx context.Context, t *task.Task, deadline time.Time, timeout time.Duration, st Streams) (*task.Result, error) {
	for {
		f, err := g.next(ctx, deadline, timeout)
		if err != nil {
			return nil, err
		}
		switch f.Type {
		case proto.Stdout:
			if st.Stdout != nil {
				_, _ = st.Stdout.Write(f.Payload)
			}
			continue
		case proto.Stderr:
			if st.Stderr != nil {
				_, _ = st.Stderr.Write(f.Payload)
			}
			continue
		case proto.Result:
		default:
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
		if g.timings.FirstResult == 0 {
			g.timings.FirstResult = time.Since(g.timings.Began)
		}
		if res.ErrorKind == task.ErrorTooLarge {
			msg := "result too large"
			if res.Error != nil {
				msg = res.Error.Message
			}
			return res, &Error{Kind: KindTooLarge, Msg: msg}
		}
		if !res.OK && res.Error != nil && res.Error.Type == "MemoryError" {
			return res, &Error{Kind: KindOOM, Msg: "out of memory: the function raised MemoryError in a VM of " + strconv.Itoa(g.vm.MemoryMiB()) + " MiB; give it more memory (--memory)"}
		}
		return res, nil
	}
}
