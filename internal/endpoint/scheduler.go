package endpoint

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/sandbox"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
)

// poolKey identifies a pool: VMs of one image with one memory size.
type poolKey struct {
	digest string
	memMiB int
}

// pool holds the VMs of one image and memory size.
type pool struct {
	key      poolKey
	path     string
	idle     []*warmVM // most recently used last
	busy     int
	starting int
	queued   int // tasks in the queues whose function uses this pool
}

func (p *pool) total() int { return len(p.idle) + p.busy + p.starting }

// warmVM is one warm sandbox of a pool.
type warmVM struct {
	sb       *sandbox.Sandbox
	pool     *pool
	lastUsed time.Time
	fresh    bool          // not used yet: its first task pays its start
	kind     string        // AcquireCold or AcquireRestore
	startDur time.Duration // how long sandbox.Start took
}

type qitem struct {
	id  string
	enq time.Time
}

type fnQueue struct {
	fn     *Function
	items  []qitem
	inRing bool
}

type running struct {
	cancel    context.CancelFunc
	cancelled bool // by the user
}

// scheduler owns the queues and the pools. Dispatch runs in one goroutine;
// tasks run in their own goroutines, one per busy VM.
type scheduler struct {
	cfg    *Config
	store  *Store
	images *images
	m      *metrics
	log    *slog.Logger
	notify func(id string)
	ctx    context.Context
	stop   context.CancelFunc

	mu       sync.Mutex
	queues   map[string]*fnQueue // by function id
	ring     []string            // function ids with queued tasks, round robin
	next     int                 // ring position to serve first
	pools    map[poolKey]*pool
	nVMs     int // running or starting
	memMiB   int // their guest memory
	queued   int
	running  map[string]*running
	draining bool
	// remote, when set, is called instead of dispatching to local VMs
	// while tasks are queued: a provider's workers lease them (lease).
	remote   func()
	wake     chan struct{}
	loopDone chan struct{}
	wg       sync.WaitGroup // task and VM-start goroutines
}

func newScheduler(cfg *Config, st *Store, im *images, m *metrics, notify func(string)) *scheduler {
	ctx, cancel := context.WithCancel(context.Background())
	return &scheduler{
		cfg: cfg, store: st, images: im, m: m, log: cfg.Log, notify: notify, ctx: ctx, stop: cancel,
		queues: map[string]*fnQueue{}, pools: map[poolKey]*pool{}, running: map[string]*running{},
		wake: make(chan struct{}, 1), loopDone: make(chan struct{}),
	}
}

func (s *scheduler) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *scheduler) start() { go s.loop() }

func (s *scheduler) loop() {
	defer close(s.loopDone)
	tick := s.cfg.IdleTimeout / 4
	tick = min(max(tick, 50*time.Millisecond), 5*time.Second)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.wake:
		case <-t.C:
			s.scaleIn(time.Now())
		}
		s.dispatch()
	}
}

// queuedCount returns the number of tasks waiting in the queues.
func (s *scheduler) queuedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queued
}

func (s *scheduler) poolFor(fn *Function) *pool {
	k := poolKey{fn.ImageDigest, fn.MemoryMiB}
	p := s.pools[k]
	if p == nil {
		p = &pool{key: k, path: fn.ImagePath}
		s.pools[k] = p
	}
	return p
}

// enqueue appends tasks of fn to its queue. s.mu must not be held.
func (s *scheduler) enqueue(fn *Function, items ...qitem) {
	s.mu.Lock()
	s.enqueueLocked(fn, items...)
	s.mu.Unlock()
	s.poke()
}

func (s *scheduler) enqueueLocked(fn *Function, items ...qitem) {
	q := s.queues[fn.ID]
	if q == nil {
		q = &fnQueue{fn: fn}
		s.queues[fn.ID] = q
	}
	q.items = append(q.items, items...)
	if !q.inRing && len(q.items) > 0 {
		q.inRing = true
		s.ring = append(s.ring, fn.ID)
	}
	s.poolFor(fn).queued += len(items)
	s.queued += len(items)
}

// ringIndex returns the ring position of function id (which has queued tasks).
func (s *scheduler) ringIndex(id string) int {
	for i, f := range s.ring {
		if f == id {
			return i
		}
	}
	return -1
}

// enqueueFrontLocked puts tasks of fn back at the head of its queue, in
// order (tasks a VM took and did not run).
func (s *scheduler) enqueueFrontLocked(fn *Function, items []qitem) {
	q := s.queues[fn.ID]
	if q == nil {
		s.enqueueLocked(fn, items...)
		return
	}
	q.items = append(slices.Clone(items), q.items...)
	s.poolFor(fn).queued += len(items)
	s.queued += len(items)
}

// popLocked removes the head task of the function at ring index i.
func (s *scheduler) popLocked(i int) (*Function, qitem) {
	id := s.ring[i]
	q := s.queues[id]
	it := q.items[0]
	q.items[0] = qitem{}
	q.items = q.items[1:]
	s.poolFor(q.fn).queued--
	s.queued--
	if len(q.items) == 0 {
		q.inRing = false
		q.items = nil
		s.ring = append(s.ring[:i], s.ring[i+1:]...)
		delete(s.queues, id)
		s.next = i
	} else {
		s.next = i + 1
	}
	if len(s.ring) > 0 {
		s.next %= len(s.ring)
	} else {
		s.next = 0
	}
	return q.fn, it
}

// removeQueued drops a (cancelled) task from its function's queue.
func (s *scheduler) removeQueued(fnID, id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.queues[fnID]
	if q == nil {
		return
	}
	for i, it := range q.items {
		if it.id != id {
			continue
		}
		q.items = append(q.items[:i], q.items[i+1:]...)
		s.poolFor(q.fn).queued--
		s.queued--
		if len(q.items) == 0 {
			for j, f := range s.ring {
				if f == fnID {
					s.ring = append(s.ring[:j], s.ring[j+1:]...)
					if s.next > j {
						s.next--
					}
					break
				}
			}
			if len(s.ring) > 0 {
				s.next %= len(s.ring)
			} else {
				s.next = 0
			}
			delete(s.queues, fnID)
		}
		return
	}
}

func (s *scheduler) fits(memMiB int) bool {
	return s.nVMs < s.cfg.MaxVMs && s.memMiB+memMiB <= s.cfg.MaxMemoryMiB
}

// dispatch hands queued tasks to idle VMs, round robin across functions,
// and starts VMs for pools whose queued tasks outnumber their idle and
// starting VMs.
func (s *scheduler) dispatch() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cfg.Paused || s.draining || s.ctx.Err() != nil {
		return
	}
	if s.remote != nil {
		if len(s.ring) > 0 {
			s.remote()
		}
		return
	}
	// Assign: one task per function per turn of the ring.
	for progress := true; progress && len(s.ring) > 0; {
		progress = false
		n := len(s.ring)
		for k := 0; k < n; k++ {
			i := (s.next + k) % len(s.ring)
			q := s.queues[s.ring[i]]
			p := s.poolFor(q.fn)
			if len(p.idle) == 0 {
				continue
			}
			v := p.idle[len(p.idle)-1]
			p.idle = p.idle[:len(p.idle)-1]
			p.busy++
			n := s.batchSizeLocked(len(q.items), p)
			fn, it := s.popLocked(i)
			items := []qitem{it}
			for len(items) < n && s.queues[fn.ID] == q {
				_, it := s.popLocked(s.ringIndex(fn.ID))
				items = append(items, it)
			}
			s.wg.Add(1)
			go s.run(v, fn, items, time.Now())
			progress = true
			break
		}
	}
	// Scale out, in ring order so no function's pool starves.
	seen := map[*pool]bool{}
	for k := 0; k < len(s.ring); k++ {
		q := s.queues[s.ring[(s.next+k)%len(s.ring)]]
		p := s.poolFor(q.fn)
		if seen[p] {
			continue
		}
		seen[p] = true
		for p.queued > len(p.idle)+p.starting && p.total() < s.cfg.PoolMax {
			if !s.fits(p.key.memMiB) && !s.evictIdleLocked(p) {
				break
			}
			if !s.fits(p.key.memMiB) {
				break
			}
			p.starting++
			s.nVMs++
			s.memMiB += p.key.memMiB
			s.wg.Add(1)
			go s.startVM(p)
		}
	}
}

// lease pops up to n queued tasks for a worker, round robin across
// functions. They stay queued in the store.
func (s *scheduler) lease(n int) []*remoteLease {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cfg.Paused || s.draining || s.ctx.Err() != nil {
		return nil
	}
	var out []*remoteLease
	for len(out) < n && len(s.ring) > 0 {
		fn, it := s.popLocked(s.next % len(s.ring))
		out = append(out, &remoteLease{fn: fn, it: it})
	}
	return out
}

// evictIdleLocked closes the least recently used idle VM of another pool
// that has no queued tasks, to make room for pool want.
func (s *scheduler) evictIdleLocked(want *pool) bool {
	var victim *warmVM
	for _, p := range s.pools {
		if p == want || p.queued > 0 || len(p.idle) == 0 {
			continue
		}
		if v := p.idle[0]; victim == nil || v.lastUsed.Before(victim.lastUsed) {
			victim = v
		}
	}
	if victim == nil {
		return false
	}
	p := victim.pool
	p.idle = p.idle[1:]
	s.dropLocked(victim)
	return true
}

// dropLocked forgets v and closes it in the background.
func (s *scheduler) dropLocked(v *warmVM) {
	s.nVMs--
	s.memMiB -= v.pool.key.memMiB
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		v.sb.Close()
	}()
}

func (s *scheduler) scaleIn(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.pools {
		keep := p.idle[:0]
		for i, v := range p.idle {
			// idle is ordered by last use: the oldest come first.
			if now.Sub(v.lastUsed) >= s.cfg.IdleTimeout && len(p.idle)-i > s.cfg.MinIdle {
				s.log.Debug("scaling in", "image", p.key.digest[:12], "idle", now.Sub(v.lastUsed).Round(time.Second))
				s.dropLocked(v)
				continue
			}
			keep = append(keep, v)
		}
		clear(p.idle[len(keep):])
		p.idle = keep
	}
}

func (s *scheduler) sandboxOptions(p *pool) sandbox.Options {
	vc := s.cfg.VM
	vc.MemoryMiB = p.key.memMiB
	if vc.Log == nil {
		vc.Log = s.log
	}
	return sandbox.Options{
		VM:        vc,
		Timeout:   s.cfg.MaxTimeout + time.Minute, // each task's own timeout is its context's deadline
		MaxResult: s.cfg.MaxResultCap,
	}
}

func (s *scheduler) startVM(p *pool) {
	defer s.wg.Done()
	t0 := time.Now()
	img, err := s.images.verified(p.path)
	if err == nil && img.Digest != p.key.digest {
		err = fmt.Errorf("%w: %s now has digest %s, not %s; register the function again", errImageChanged, p.path, img.Digest, p.key.digest)
	}
	var sb *sandbox.Sandbox
	if err == nil {
		sb, err = sandbox.Start(s.ctx, img, s.sandboxOptions(p))
	}
	dur := time.Since(t0)
	s.mu.Lock()
	p.starting--
	if err != nil {
		s.nVMs--
		s.memMiB -= p.key.memMiB
		s.m.bootFails.Inc()
		var failed []failure
		if s.ctx.Err() == nil {
			s.log.Warn("starting a VM failed", "image", p.path, "error", err)
			failed = s.failOneLocked(p, err)
		}
		s.mu.Unlock()
		for _, f := range failed {
			s.failQueued(f)
		}
		s.poke()
		return
	}
	kind := AcquireCold
	if sb.Timings().StateLoaded > 0 {
		kind = AcquireRestore
	}
	s.m.boots.WithLabelValues(kind).Inc()
	v := &warmVM{sb: sb, pool: p, lastUsed: time.Now(), fresh: true, kind: kind, startDur: dur}
	if s.ctx.Err() != nil {
		s.dropLocked(v)
	} else {
		p.idle = append(p.idle, v)
	}
	s.mu.Unlock()
	s.log.Debug("VM started", "image", p.path, "kind", kind, "took", dur.Round(time.Millisecond))
	s.poke()
}

var errImageChanged = errors.New("the image file changed since the function was registered")

type failure struct {
	fn  *Function
	it  qitem
	err error
}

// failOneLocked pops the oldest queued task that needed pool p, so that a
// VM that cannot start fails tasks one at a time instead of looping.
func (s *scheduler) failOneLocked(p *pool, err error) []failure {
	for i, id := range s.ring {
		if s.poolFor(s.queues[id].fn) != p {
			continue
		}
		fn, it := s.popLocked(i)
		return []failure{{fn, it, err}}
	}
	return nil
}

func (s *scheduler) failQueued(f failure) {
	now := time.Now()
	ok, err := s.store.MarkRunning(s.ctx, f.it.id, now)
	if err != nil || !ok {
		return
	}
	code := task.ErrorStart
	if errors.Is(f.err, errImageChanged) {
		code = apitype.CodeImageChanged
	}
	s.complete(f.it.id, Completion{State: apitype.StateFailed, Error: "starting a VM: " + f.err.Error(), ErrorCode: code})
}

func (s *scheduler) complete(id string, c Completion) {
	ok, err := s.store.Complete(context.Background(), id, c, time.Now(), s.cfg.ResultTTL)
	if err != nil {
		s.log.Error("writing a task's result", "task", id, "error", err)
		return
	}
	if !ok {
		s.log.Warn("task was already complete; result dropped", "task", id)
		return
	}
	s.m.completed.WithLabelValues(c.State).Inc()
	s.notify(id)
}

// batchMax caps the tasks of one function a VM takes per turn: enough to
// keep a VM busy between dispatch rounds, few enough that the functions
// sharing a pool take turns.
const batchMax = 64

// batchSizeLocked is how many of a function's n queued tasks one of pool
// p's VMs takes: an even share of the VMs the pool has or may start, at
// most batchMax, so that batching never keeps a task from a VM that could
// run it at once.
func (s *scheduler) batchSizeLocked(n int, p *pool) int {
	vms := max(p.total(), min(s.cfg.PoolMax, s.cfg.MaxVMs), 1)
	return min(max(n/vms, 1), batchMax)
}

// issued is a task of a batch that was sent to its VM.
type issued struct {
	it      qitem
	rec     *TaskRecord
	started time.Time // zero until it starts
}

// run executes a batch of fn's tasks on v, one after another, each sent
// while the one before runs (sandbox.InvokeEach), and gives v back to its
// pool (or drops it). A task is marked running when it starts, in the
// same transaction that completes the one before.
func (s *scheduler) run(v *warmVM, fn *Function, items []qitem, picked time.Time) {
	defer s.wg.Done()
	keep := true
	var giveBack []qitem // not run: back to the head of the queue
	defer func() {
		s.mu.Lock()
		v.pool.busy--
		if keep && s.ctx.Err() == nil {
			v.fresh = false
			v.lastUsed = time.Now()
			v.pool.idle = append(v.pool.idle, v)
		} else {
			s.dropLocked(v)
		}
		if len(giveBack) > 0 && s.ctx.Err() == nil {
			s.enqueueFrontLocked(fn, giveBack)
		}
		s.mu.Unlock()
		s.poke()
	}()
	rctx, rcancel := context.WithCancel(s.ctx)
	defer rcancel()
	pending := items
	var sent []*issued // sent and not done, oldest first
	// One read for the batch; a task cancelled after it is caught by the
	// guarded state change that starts it.
	ids := make([]string, len(items))
	for i, it := range items {
		ids[i] = it.id
	}
	recs, err := s.store.TasksByID(s.ctx, ids)
	if err != nil {
		s.log.Error("reading tasks", "error", err)
		giveBack = items // still queued in the store
		return
	}

	// begin registers e as running (a cancel of it stops the VM) and
	// records its start; s.notify is the caller's.
	begin := func(e *issued, now time.Time) {
		e.started = now
		s.mu.Lock()
		s.running[e.it.id] = &running{cancel: rcancel}
		s.mu.Unlock()
		s.m.observeQueueWait(now.Sub(e.it.enq))
		if v.fresh && e == sent[0] && len(pending) == len(items)-1 {
			s.m.observeAcquire(v.kind, v.startDur)
		} else {
			s.m.observeAcquire(AcquireWarm, now.Sub(picked))
		}
		picked = now
	}
	next := func() *task.Task {
		for keep && len(pending) > 0 && rctx.Err() == nil {
			it := pending[0]
			pending = pending[1:]
			rec := recs[it.id]
			if rec == nil {
				continue // expired
			}
			if rec.State != apitype.StateQueued {
				continue // cancelled while it waited in the batch
			}
			e := &issued{it: it, rec: rec}
			if len(sent) == 0 {
				// Nothing runs before it: it starts now.
				now := time.Now()
				ok, err := s.store.MarkRunning(s.ctx, it.id, now)
				if err != nil {
					s.log.Error("starting a task", "task", it.id, "error", err)
					giveBack = append(giveBack, it) // still queued in the store
					continue
				}
				if !ok {
					continue
				}
				sent = append(sent, e)
				begin(e, now)
				s.notify(it.id)
			} else {
				sent = append(sent, e)
			}
			t := buildTask(fn, rec)
			t.CacheKey = fn.ID
			return t
		}
		return nil
	}
	done := func(_ *task.Task, res *task.Result, err error) {
		e := sent[0]
		sent = sent[1:]
		if errors.Is(err, sandbox.ErrNotRun) {
			giveBack = append(giveBack, e.it) // sent ahead, never started: still queued
			return
		}
		now := time.Now()
		s.m.observeExec(now.Sub(e.started))
		s.mu.Lock()
		r := s.running[e.it.id]
		delete(s.running, e.it.id)
		s.mu.Unlock()
		userCancelled := r != nil && r.cancelled
		c, keepVM, retry := s.classify(fn, e.rec.Attempts+1, res, err, rctx, userCancelled)
		if !keepVM {
			keep = false
		}
		// The task sent after e starts now, unless e's failure ended the VM.
		var after *issued
		if len(sent) > 0 && !sandbox.Replaced(rctx, err) {
			after = sent[0]
			begin(after, now)
		}
		st := Step{Done: e.it.id, C: c, Now: now, TTL: s.cfg.ResultTTL}
		// Shutting down (it runs again after the restart), or a retry.
		shutdown := s.ctx.Err() != nil && err != nil
		st.Requeue = shutdown || retry
		if after != nil {
			st.Next = after.it.id
		}
		id, attempt := e.it.id, e.rec.Attempts+1
		st.Then = func(sr StepResult) {
			if sr.Err != nil {
				s.log.Error("writing a task's outcome", "task", id, "error", sr.Err)
				return
			}
			switch {
			case sr.Requeued:
				s.notify(id) // long polls watching it as running see it queued again
				if !shutdown {
					s.log.Info("retrying a task", "task", id, "attempt", attempt, "error", c.Error)
					s.enqueue(fn, qitem{id: id, enq: now})
				}
			case sr.Completed:
				s.m.completed.WithLabelValues(c.State).Inc()
				s.notify(id)
			default:
				// Cancelled while it waited in the batch: it ran for nothing.
				s.log.Debug("task was not running; its outcome was dropped", "task", id, "state", c.State)
			}
			if st.Next != "" {
				if sr.Started {
					s.notify(st.Next)
				} else {
					// Cancelled while it waited: it runs, for nothing.
					s.mu.Lock()
					delete(s.running, st.Next)
					s.mu.Unlock()
				}
			}
		}
		s.store.Step(st)
	}
	v.sb.InvokeEach(rctx, fn.Timeout(), next, done)
	giveBack = append(giveBack, pending...)
}

// classify turns an Invoke outcome into a completion; keepVM says whether
// the VM is still good, retry whether the task should be queued again.
func (s *scheduler) classify(fn *Function, attempt int, res *task.Result, err error, ctx context.Context, userCancelled bool) (c Completion, keepVM, retry bool) {
	var resJSON json.RawMessage
	if res != nil {
		resJSON, _ = json.Marshal(res)
	}
	switch {
	case err == nil && res.OK:
		return Completion{State: apitype.StateSucceeded, Result: resJSON}, true, false
	case err == nil:
		msg := res.ErrorKind
		if res.Error != nil {
			msg = res.Error.Type + ": " + res.Error.Message
		}
		return Completion{State: apitype.StateFailed, Result: resJSON, Error: msg, ErrorCode: res.ErrorKind}, true, false
	case userCancelled:
		return Completion{State: apitype.StateCancelled, Error: "cancelled while running; its VM was replaced", ErrorCode: apitype.CodeCancelled}, false, false
	case sandbox.KindOf(err) == sandbox.KindTimeout || errors.Is(ctx.Err(), context.DeadlineExceeded):
		return Completion{State: apitype.StateFailed, Error: fmt.Sprintf("the task ran past its timeout of %s and was stopped; its VM was replaced (register the function with a larger timeout)", fn.Timeout()), ErrorCode: task.ErrorTimeout}, false, false
	case sandbox.KindOf(err) == sandbox.KindTooLarge:
		return Completion{State: apitype.StateFailed, Result: resJSON, Error: err.Error() + " (register the function with a larger max_result)", ErrorCode: task.ErrorTooLarge}, true, false
	case sandbox.KindOf(err) == sandbox.KindOOM:
		return Completion{State: apitype.StateFailed, Result: resJSON, Error: err.Error(), ErrorCode: task.ErrorOOM}, res != nil, res == nil && attempt <= fn.MaxRetries
	case sandbox.KindOf(err) == sandbox.KindVMDied:
		return Completion{State: apitype.StateFailed, Error: "the VM died while running the task: " + err.Error(), ErrorCode: task.ErrorVMDied}, false, attempt <= fn.MaxRetries
	case sandbox.KindOf(err) == sandbox.KindStart:
		return Completion{State: apitype.StateFailed, Error: err.Error(), ErrorCode: task.ErrorStart}, false, attempt <= fn.MaxRetries
	default:
		return Completion{State: apitype.StateFailed, Error: err.Error(), ErrorCode: apitype.CodeInternal}, false, false
	}
}

// buildTask makes the agent task for a stored task of fn.
func buildTask(fn *Function, rec *TaskRecord) *task.Task {
	t := &task.Task{ID: rec.ID, Kind: fn.Kind, Ref: fn.Ref, Source: fn.Source, Name: fn.Entry, Pickle: fn.Pickle, Pickler: fn.Pickler, MaxResult: fn.MaxResult,
		Module: fn.Module, Filename: fn.Filename, Lineno: fn.Lineno, Namespace: fn.Namespace, ExactTypes: fn.ExactTypes,
		Command: fn.Command, Walltime: fn.Walltime}
	if len(rec.Args) > 0 {
		var v task.Value
		if json.Unmarshal(rec.Args, &v) == nil {
			t.Args = &v
		}
	}
	if len(rec.Kwargs) > 0 {
		var v task.Value
		if json.Unmarshal(rec.Kwargs, &v) == nil {
			t.Kwargs = &v
		}
	}
	return t
}

// cancelRunning stops a running task; it reports false when id is not running here.
func (s *scheduler) cancelRunning(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.running[id]
	if r == nil {
		return false
	}
	r.cancelled = true
	r.cancel()
	return true
}

// snapshot reports the VM gauges.
func (s *scheduler) snapshot() (vms map[string]int, memMiB, queued int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	vms = map[string]int{"idle": 0, "busy": 0, "starting": 0}
	for _, p := range s.pools {
		vms["idle"] += len(p.idle)
		vms["busy"] += p.busy
		vms["starting"] += p.starting
	}
	return vms, s.memMiB, s.queued
}

// close stops dispatching, lets running tasks finish for up to grace, then
// stops the rest (they are requeued in the store) and closes every VM.
func (s *scheduler) close(grace time.Duration) {
	s.mu.Lock()
	s.draining = true
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		for {
			s.mu.Lock()
			n := len(s.running)
			s.mu.Unlock()
			if n == 0 {
				close(done)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	select {
	case <-done:
	case <-time.After(grace):
	}
	s.stop()
	<-s.loopDone
	s.wg.Wait()
	s.mu.Lock()
	var all []*warmVM
	for _, p := range s.pools {
		all = append(all, p.idle...)
		p.idle = nil
	}
	s.mu.Unlock()
	for _, v := range all {
		v.sb.Close()
	}
}
