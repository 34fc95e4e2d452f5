package endpoint

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
	"github.com/kiln-dev/kiln/internal/vm"
)

// The worker's side of the worker protocol (kiln worker, on a compute
// node): a local Server, with its own store in the node's cache directory
// and its own pools of VMs, fed with the tasks the worker leases from the
// endpoint. The local Server runs them exactly as kiln serve would
// (snapshot restore, batching, timeouts, retries of a VM that died); the
// worker reports their start and outcome back.

// WorkerConfig configures RunWorker.
type WorkerConfig struct {
	Endpoint string // the endpoint's URL
	Token    string
	// ImagesDir, when set, replaces the directory of every function's
	// image (the endpoint's path is used as it is otherwise: a shared
	// filesystem mounted at the same path on every node).
	ImagesDir string
	// StateDir holds the local store (a directory under it, removed at
	// exit): node-local scratch is best.
	StateDir string
	Slots    int // tasks run at once (VMs); 0: the CPUs
	CPUs     int // reported capacity
	// MemoryMiB caps the VMs' total memory; 0: 3/4 of the host's RAM.
	MemoryMiB int
	// Who the worker is: node name, Slurm job and block (from the
	// environment a pilot job sets).
	Node, SlurmJobID, BlockID string
	Version                   string
	// DrainGrace is how long a draining worker (SIGTERM, or the endpoint
	// cancelling its block) lets running tasks finish before it hands
	// them back; keep it under Slurm's KillWait (30 s by default).
	DrainGrace time.Duration
	VM         vm.Config
	Log        *slog.Logger
	// EndpointTimeout is how long the worker keeps trying an endpoint that
	// does not answer before it gives up and exits with an error;
	// 0: DefaultEndpointTimeout.
	EndpointTimeout time.Duration
	// Registered, when set, is called once the endpoint accepted the
	// worker, with its id.
	Registered func(id string)
}

// Worker defaults. DefaultDrainGrace fits in Slurm's default KillWait of
// 30 s; DefaultEndpointTimeout outlasts an endpoint's restart.
const (
	DefaultDrainGrace      = 20 * time.Second
	DefaultEndpointTimeout = 2 * time.Minute
)

// errWorkerLost is returned when the endpoint no longer knows the worker.
var errWorkerLost = errors.New("the endpoint no longer knows this worker")

// bridge carries tasks between the endpoint and the local Server.
type bridge struct {
	cfg    WorkerConfig
	c      *Client
	local  *Server
	id     string
	beat   time.Duration
	log    *slog.Logger
	kick   chan struct{}
	failed chan error // the reporter could not report

	mu        sync.Mutex
	held      map[string]string // remote task id -> local task id
	remote    map[string]string // local task id -> remote task id
	reported  map[string]bool   // remote ids reported started
	changed   []string          // local ids whose state changed
	fns       map[string]*Function
	lastReply time.Time // the endpoint's last answer
	seq       int
}

// RunWorker registers with the endpoint and runs its tasks until ctx is
// done (SIGTERM) or the endpoint asks the worker to stop; it then drains:
// it takes no more tasks, lets running ones finish for up to DrainGrace,
// hands back the rest, deregisters and returns nil.
func RunWorker(ctx context.Context, cfg WorkerConfig) (err error) {
	if cfg.Endpoint == "" {
		return errors.New("no endpoint: give --endpoint URL (what kiln serve printed)")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.DrainGrace <= 0 {
		cfg.DrainGrace = DefaultDrainGrace
	}
	if cfg.EndpointTimeout <= 0 {
		cfg.EndpointTimeout = DefaultEndpointTimeout
	}
	if cfg.StateDir == "" {
		return errors.New("worker: no state directory")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("creating the worker's state directory: %w", err)
	}
	removeStaleWorkerDirs(cfg.StateDir, cfg.Log)
	dir, err := os.MkdirTemp(cfg.StateDir, "worker-")
	if err != nil {
		return fmt.Errorf("creating the worker's state directory: %w", err)
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, workerPIDFile), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return fmt.Errorf("creating the worker's state directory: %w", err)
	}
	c, err := NewClient(cfg.Endpoint, cfg.Token, dir)
	if err != nil {
		return err
	}
	c.HTTP.Timeout = apitype.WorkerLostAfter + 30*time.Second
	b := &bridge{cfg: cfg, c: c, log: cfg.Log, kick: make(chan struct{}, 1), failed: make(chan error, 1),
		held: map[string]string{}, remote: map[string]string{}, reported: map[string]bool{}, fns: map[string]*Function{}}
	local, err := New(Config{
		StateDir: dir, NoAuth: true, MaxVMs: cfg.Slots, MaxMemoryMiB: cfg.MemoryMiB, ImagesDir: cfg.ImagesDir,
		ShutdownGrace: time.Millisecond, ResultTTL: 10 * time.Minute, MaxTimeout: 7 * 24 * time.Hour,
		MaxResultCap: 1 << 30, VM: cfg.VM, Log: cfg.Log, onChange: b.changedLocal,
	})
	if err != nil {
		return fmt.Errorf("starting the worker's local pools: %w", err)
	}
	b.local = local
	defer local.Close()
	slots := local.cfg.MaxVMs
	reg := apitype.WorkerRegister{Node: cfg.Node, SlurmJobID: cfg.SlurmJobID, BlockID: cfg.BlockID, CPUs: cfg.CPUs,
		MemoryMiB: local.cfg.MaxMemoryMiB, Accel: string(cfg.VM.Accel), Slots: slots, Version: cfg.Version}
	if reg.Accel == "" {
		reg.Accel = "auto"
	}
	if err := b.register(ctx, &reg); err != nil {
		return err
	}
	if cfg.Registered != nil {
		cfg.Registered(b.id)
	}
	rctx, stopReporter := context.WithCancel(context.Background())
	reporterDone := make(chan struct{})
	go func() {
		defer close(reporterDone)
		b.reporter(rctx)
	}()
	defer func() {
		stopReporter()
		<-reporterDone
	}()

	// Work until told to stop.
	stopped, err := b.pollLoop(ctx, 2*slots, nil)
	if err != nil {
		return err
	}
	why := "SIGTERM"
	if stopped {
		why = "the endpoint asked it to stop"
	}
	b.log.Info("worker draining", "why", why, "grace", cfg.DrainGrace, "tasks", b.heldCount())
	// Drain: keep beating (polls that take nothing) until the local
	// tasks are done and reported, or the grace ends.
	dctx, cancel := context.WithTimeout(context.Background(), cfg.DrainGrace)
	defer cancel()
	if _, err := b.pollLoop(dctx, 0, func() bool { return b.heldCount() == 0 }); err != nil {
		return err
	}
	stopReporter()
	<-reporterDone
	release := b.heldIDs()
	ectx, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	if err := c.Do(ectx, http.MethodDelete, "/v1/workers/"+b.id, apitype.WorkerRelease{Release: release}, nil); err != nil {
		b.log.Warn("deregistering from the endpoint (it will find this worker lost)", "error", err)
	}
	b.log.Info("worker stopped", "handed_back", len(release))
	return nil
}

// register registers, retrying for a while when the endpoint cannot be
// reached (it may be starting or restarting).
func (b *bridge) register(ctx context.Context, reg *apitype.WorkerRegister) error {
	deadline := time.Now().Add(b.cfg.EndpointTimeout)
	delay := 200 * time.Millisecond
	for {
		var ans apitype.WorkerRegistered
		err := b.c.Do(ctx, http.MethodPost, "/v1/workers", reg, &ans)
		if err == nil {
			b.id = ans.ID
			b.lastReply = time.Now()
			b.beat = time.Duration(ans.HeartbeatMS) * time.Millisecond
			if b.beat <= 0 {
				b.beat = apitype.WorkerHeartbeat
			}
			b.log.Info("registered with the endpoint", "worker", b.id, "endpoint", b.cfg.Endpoint, "slots", reg.Slots)
			return nil
		}
		var ae *APIError
		if errors.As(err, &ae) || time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("registering with the endpoint %s: %w", b.cfg.Endpoint, err)
		}
		b.log.Warn("the endpoint cannot be reached yet; retrying", "error", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("registering with the endpoint: %w", ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Second)
	}
}

// pollLoop polls until ctx is done (returning false), the endpoint says
// stop (true), or done reports true. want is the most tasks held at once
// (the poll's capacity); 0 drains.
func (b *bridge) pollLoop(ctx context.Context, want int, done func() bool) (stopped bool, err error) {
	delay := 200 * time.Millisecond
	for {
		if done != nil && done() {
			return false, nil
		}
		if ctx.Err() != nil {
			return false, nil
		}
		select {
		case err := <-b.failed:
			return false, err
		default:
		}
		req := apitype.WorkerPoll{Capacity: want, WaitMS: b.beat.Milliseconds(), Held: b.heldIDs(), Draining: want == 0}
		if done != nil {
			// Draining: beat often enough to notice the last result soon.
			req.WaitMS = min(req.WaitMS, 500)
		}
		var work apitype.WorkerWork
		err := b.c.Do(ctx, http.MethodPost, "/v1/workers/"+b.id+"/poll", req, &work)
		if err != nil {
			if ctx.Err() != nil {
				return false, nil
			}
			var ae *APIError
			if errors.As(err, &ae) && (ae.Status == http.StatusNotFound || ae.Status == http.StatusGone) {
				return false, fmt.Errorf("%w: %v", errWorkerLost, err)
			}
			b.mu.Lock()
			silent := time.Since(b.lastReply)
			b.mu.Unlock()
			if silent > b.cfg.EndpointTimeout {
				return false, fmt.Errorf("the endpoint %s has not answered for %s (last error: %v): stopping, so that this pilot job does not hold its node for nothing",
					b.cfg.Endpoint, silent.Round(time.Second), err)
			}
			b.log.Warn("polling the endpoint", "error", err)
			select {
			case <-ctx.Done():
				return false, nil
			case <-time.After(delay):
			}
			delay = min(2*delay, b.beat)
			continue
		}
		delay = 200 * time.Millisecond
		b.mu.Lock()
		b.lastReply = time.Now()
		b.mu.Unlock()
		if err := b.accept(&work); err != nil {
			return false, err
		}
		if work.Stop {
			return true, nil
		}
	}
}

// accept queues the tasks of a poll answer locally and applies cancels.
func (b *bridge) accept(work *apitype.WorkerWork) error {
	ctx := context.Background()
	for _, raw := range work.Functions {
		var fn Function
		if err := json.Unmarshal(raw, &fn); err != nil {
			return fmt.Errorf("decoding a function from the endpoint: %w", err)
		}
		if b.cfg.ImagesDir != "" {
			fn.ImagePath = filepath.Join(b.cfg.ImagesDir, filepath.Base(fn.ImagePath))
		}
		if err := b.local.store.PutFunction(ctx, &fn); err != nil {
			return err
		}
		b.mu.Lock()
		b.fns[fn.ID] = &fn
		b.mu.Unlock()
	}
	if len(work.Tasks) > 0 {
		nts := make([]NewTask, 0, len(work.Tasks))
		byFn := map[string][]qitem{}
		var order []string
		now := time.Now()
		b.mu.Lock()
		for _, t := range work.Tasks {
			if b.fns[t.FunctionID] == nil {
				b.mu.Unlock()
				return fmt.Errorf("the endpoint sent task %s of function %s without the function", t.ID, t.FunctionID)
			}
			if _, dup := b.held[t.ID]; dup {
				continue
			}
			b.seq++
			lid := fmt.Sprintf("%s~%d", t.ID, b.seq)
			b.held[t.ID] = lid
			b.remote[lid] = t.ID
			nts = append(nts, NewTask{ID: lid, FunctionID: t.FunctionID, Args: t.Args, Kwargs: t.Kwargs})
			if byFn[t.FunctionID] == nil {
				order = append(order, t.FunctionID)
			}
			byFn[t.FunctionID] = append(byFn[t.FunctionID], qitem{id: lid, enq: now})
		}
		fns := b.fns
		b.mu.Unlock()
		if _, err := b.local.store.InsertTasks(ctx, now, nts); err != nil {
			return err
		}
		for _, id := range order {
			b.local.sched.enqueue(fns[id], byFn[id]...)
		}
	}
	b.cancel(work.Cancel)
	return nil
}

// cancel stops tasks the endpoint cancelled: a queued one is dropped (the
// endpoint already cancelled it), a running one is stopped and reported.
func (b *bridge) cancel(ids []string) {
	ctx := context.Background()
	for _, rid := range ids {
		b.mu.Lock()
		lid, ok := b.held[rid]
		b.mu.Unlock()
		if !ok {
			continue
		}
		rec, err := b.local.store.Task(ctx, lid)
		if err != nil {
			continue
		}
		switch rec.State {
		case apitype.StateQueued:
			if ok, _ := b.local.store.CancelQueued(ctx, lid, time.Now(), time.Minute); ok {
				b.local.sched.removeQueued(rec.FunctionID, lid)
				b.forget(lid)
			}
		case apitype.StateRunning:
			b.local.sched.cancelRunning(lid)
		}
	}
}

func (b *bridge) forget(lid string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	rid := b.remote[lid]
	delete(b.remote, lid)
	delete(b.held, rid)
	delete(b.reported, rid)
}

func (b *bridge) heldIDs() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	ids := make([]string, 0, len(b.held))
	for id := range b.held {
		ids = append(ids, id)
	}
	return ids
}

func (b *bridge) heldCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.held)
}

// changedLocal is the local Server's notification of a task's change.
func (b *bridge) changedLocal(lid string) {
	b.mu.Lock()
	if _, ok := b.remote[lid]; ok {
		b.changed = append(b.changed, lid)
	}
	b.mu.Unlock()
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// reporter sends what changed, one report at a time: what changes while
// one is in flight goes in the next. (Polls are the heartbeat.)
func (b *bridge) reporter(ctx context.Context) {
	var pending apitype.WorkerReport
	var pendingLocal []string // local ids of pending.Results
	for {
		select {
		case <-ctx.Done():
			return
		case <-b.kick:
		}
		b.mu.Lock()
		changed := b.changed
		b.changed = nil
		b.mu.Unlock()
		recs, err := b.local.store.TasksByID(ctx, changed)
		if err != nil {
			if ctx.Err() == nil {
				b.log.Error("reading local tasks", "error", err)
			}
			continue
		}
		b.mu.Lock()
		for _, lid := range changed {
			rec := recs[lid]
			rid, ok := b.remote[lid]
			if rec == nil || !ok {
				continue
			}
			if (rec.State == apitype.StateRunning || apitype.Finished(rec.State)) && !b.reported[rid] {
				b.reported[rid] = true
				pending.Started = append(pending.Started, rid)
			}
			if apitype.Finished(rec.State) {
				delete(b.remote, lid) // later changes of lid are not ours to report
				pending.Results = append(pending.Results, apitype.WorkerResult{ID: rid, State: rec.State, Result: withID(rec.Result, rid), Error: rec.Error, ErrorCode: rec.ErrorCode})
				pendingLocal = append(pendingLocal, rid)
			}
		}
		b.mu.Unlock()
		if len(pending.Started)+len(pending.Results) == 0 {
			continue
		}
		var ans apitype.WorkerReportAnswer
		err = b.c.Do(ctx, http.MethodPost, "/v1/workers/"+b.id+"/report", pending, &ans)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			var ae *APIError
			if errors.As(err, &ae) && (ae.Status == http.StatusNotFound || ae.Status == http.StatusGone) {
				select {
				case b.failed <- fmt.Errorf("%w: %v", errWorkerLost, err):
				default:
				}
				return
			}
			b.log.Warn("reporting to the endpoint; retrying", "error", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			select {
			case b.kick <- struct{}{}:
			default:
			}
			continue // pending is sent again, with what changed meanwhile
		}
		b.mu.Lock()
		for _, rid := range pendingLocal {
			delete(b.held, rid)
			delete(b.reported, rid)
		}
		b.mu.Unlock()
		pending, pendingLocal = apitype.WorkerReport{}, nil
		b.cancel(ans.Cancel)
	}
}

// withID gives a local task's result the endpoint's task id.
func withID(raw json.RawMessage, id string) json.RawMessage {
	if len(raw) == 0 {
		return raw
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(raw, &m) != nil {
		return raw
	}
	if _, ok := m["id"]; !ok {
		return raw
	}
	m["id"], _ = json.Marshal(id)
	b, err := json.Marshal(m)
	if err != nil {
		return raw
	}
	return b
}

// workerPIDFile names the process that owns a worker's state directory.
const workerPIDFile = "pid"

// removeStaleWorkerDirs removes the state directories of workers on this
// node whose process is gone (killed before it could clean up).
func removeStaleWorkerDirs(parent string, log *slog.Logger) {
	dirs, _ := filepath.Glob(filepath.Join(parent, "worker-*"))
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, workerPIDFile))
		if err != nil {
			continue // being created, or not ours
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); err == nil || errors.Is(err, syscall.EPERM) {
			continue // still running
		}
		log.Info("removing a dead worker's state", "dir", d)
		os.RemoveAll(d)
	}
}
