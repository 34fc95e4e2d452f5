package endpoint

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
)

// The endpoint's side of the worker protocol (apitype.Worker*): a registry
// of the workers that provider blocks started, the tasks leased to each,
// heartbeats, and what happens to a lost worker's tasks.
//
// A task handed to a worker stays queued in the store (a lease, kept in
// memory) until the worker reports it started; it is then running, with the
// worker's name in its record, until the worker reports its outcome. A
// lease the worker no longer holds (a poll answer it never got) is given
// back at its next poll; the leases of a worker that drains are given back
// when it deregisters, and those of a lost worker when it is declared lost.

// remoteLease is one task handed to a worker.
type remoteLease struct {
	fn      *Function
	it      qitem
	started bool
}

// remoteWorker is one registered worker. Its fields are guarded by
// workers.mu.
type remoteWorker struct {
	view    apitype.WorkerView
	label   string // "node (Slurm job 12, block b1)"
	tasks   map[string]*remoteLease
	sentFns map[string]bool
	cancel  []string
	stop    bool          // the endpoint asked it to drain (its block is being cancelled)
	wake    chan struct{} // cap 1: a cancel or stop for its poll
}

func (w *remoteWorker) poke() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *remoteWorker) counts() (leased, running int) {
	for _, l := range w.tasks {
		if l.started {
			running++
		} else {
			leased++
		}
	}
	return leased, running
}

// workers is the registry. Lock order: workers.mu before scheduler.mu.
type workers struct {
	s    *Server
	mu   sync.Mutex
	byID map[string]*remoteWorker
	// byTask maps a leased or running task to its worker.
	byTask map[string]*remoteWorker
	// queued is closed (and replaced) when tasks are queued: polls wait on it.
	queued chan struct{}
	// scaleKick asks the block manager to scale now (tasks were queued).
	scaleKick chan struct{}
	// heartbeat and lostAfter are the protocol's timing (tests shorten them).
	heartbeat, lostAfter time.Duration
}

func newWorkers(s *Server) *workers {
	return &workers{
		s: s, byID: map[string]*remoteWorker{}, byTask: map[string]*remoteWorker{}, queued: make(chan struct{}), scaleKick: make(chan struct{}, 1),
		heartbeat: s.cfg.WorkerHeartbeat, lostAfter: s.cfg.WorkerLostAfter,
	}
}

// signal wakes the polls waiting for tasks.
func (ws *workers) signal() {
	ws.mu.Lock()
	close(ws.queued)
	ws.queued = make(chan struct{})
	ws.mu.Unlock()
	select {
	case ws.scaleKick <- struct{}{}:
	default:
	}
}

// workerLabel says where a task ran, for its record and for error messages.
func workerLabel(r *apitype.WorkerRegister) string {
	var parts []string
	if r.SlurmJobID != "" {
		parts = append(parts, "Slurm job "+r.SlurmJobID)
	}
	if r.BlockID != "" {
		parts = append(parts, "block "+r.BlockID)
	}
	if len(parts) == 0 {
		return r.Node
	}
	return r.Node + " (" + strings.Join(parts, ", ") + ")"
}

// DecodeWorkerRegister reads and checks a worker's registration.
func DecodeWorkerRegister(r io.Reader) (*apitype.WorkerRegister, error) {
	var req apitype.WorkerRegister
	if err := decodeStrict(r, &req); err != nil {
		return nil, badRequest(err)
	}
	switch {
	case req.Node == "":
		return nil, errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "node: required (the compute node's host name)")
	case req.Slots < 1:
		return nil, errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "slots = %d: want at least 1", req.Slots)
	case req.CPUs < 0 || req.MemoryMiB < 0:
		return nil, errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "cpus and memory_mib must not be negative")
	}
	return &req, nil
}

func (s *Server) registerWorker(w http.ResponseWriter, r *http.Request) error {
	req, err := DecodeWorkerRegister(r.Body)
	if err != nil {
		return err
	}
	now := time.Now()
	rw := &remoteWorker{
		label: workerLabel(req), tasks: map[string]*remoteLease{}, sentFns: map[string]bool{}, wake: make(chan struct{}, 1),
		view: apitype.WorkerView{
			ID: randomID("w-"), Node: req.Node, SlurmJobID: req.SlurmJobID, BlockID: req.BlockID, CPUs: req.CPUs, MemoryMiB: req.MemoryMiB,
			Accel: req.Accel, Slots: req.Slots, State: apitype.WorkerActive, Registered: now, LastSeen: now, Version: req.Version,
		},
	}
	ws := s.workers
	ws.mu.Lock()
	ws.byID[rw.view.ID] = rw
	ws.mu.Unlock()
	s.cfg.Log.Info("worker registered", "worker", rw.view.ID, "where", rw.label, "slots", req.Slots, "cpus", req.CPUs, "accel", req.Accel)
	if s.provider != nil {
		s.provider.workerSeen(req.BlockID)
	}
	writeJSON(w, http.StatusCreated, apitype.WorkerRegistered{ID: rw.view.ID, HeartbeatMS: ws.heartbeat.Milliseconds(), LostAfterMS: ws.lostAfter.Milliseconds()})
	return nil
}

// worker finds a live worker and records that it was heard from.
func (ws *workers) worker(id string) (*remoteWorker, error) {
	rw := ws.byID[id]
	if rw == nil {
		return nil, errorf(http.StatusNotFound, apitype.ErrCodeNotFound, "unknown worker %s: the endpoint restarted or never saw it; register again", id)
	}
	switch rw.view.State {
	case apitype.WorkerLost:
		return nil, errorf(http.StatusGone, apitype.ErrCodeNotFound, "worker %s was declared lost at %s (no request for %s): its tasks went to other workers; stop and register again",
			id, rw.view.LostAt.Format(time.RFC3339), ws.lostAfter)
	case apitype.WorkerGone:
		return nil, errorf(http.StatusGone, apitype.ErrCodeNotFound, "worker %s has deregistered", id)
	}
	rw.view.LastSeen = time.Now()
	return rw, nil
}

// lockWorker locks ws and finds worker id (see worker); on error ws is
// not locked.
func (ws *workers) lockWorker(id string) (*remoteWorker, error) {
	ws.mu.Lock()
	rw, err := ws.worker(id)
	if err != nil {
		ws.mu.Unlock()
	}
	return rw, err
}

// DecodeWorkerPoll reads a poll request.
func DecodeWorkerPoll(r io.Reader) (*apitype.WorkerPoll, error) {
	var req apitype.WorkerPoll
	if err := decodeStrict(r, &req); err != nil {
		return nil, badRequest(err)
	}
	if req.Capacity < 0 || req.WaitMS < 0 {
		return nil, errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "capacity and wait_ms must not be negative")
	}
	if slices.Contains(req.Held, "") {
		return nil, errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "held: empty task id")
	}
	return &req, nil
}

// pollWorker long-polls for tasks, cancels and stop requests.
func (s *Server) pollWorker(w http.ResponseWriter, r *http.Request) error {
	req, err := DecodeWorkerPoll(r.Body)
	if err != nil {
		return err
	}
	ws := s.workers
	rw, err := ws.lockWorker(r.PathValue("id"))
	if err != nil {
		return err
	}
	if req.Draining && rw.view.State == apitype.WorkerActive {
		rw.view.State = apitype.WorkerDraining
	}
	// Leases the worker no longer holds never reached it: give them back.
	held := map[string]bool{}
	for _, id := range req.Held {
		held[id] = true
	}
	var lostLeases []*remoteLease
	for id, l := range rw.tasks {
		if !l.started && !held[id] {
			lostLeases = append(lostLeases, l)
			delete(rw.tasks, id)
			delete(ws.byTask, id)
		}
	}
	ws.mu.Unlock()
	s.giveBack(lostLeases)

	wait := min(time.Duration(req.WaitMS)*time.Millisecond, ws.heartbeat)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		ws.mu.Lock()
		var work apitype.WorkerWork
		work.Cancel, rw.cancel = rw.cancel, nil
		work.Stop = rw.stop
		queued := ws.queued
		if want := req.Capacity - len(rw.tasks); !work.Stop && !req.Draining && want > 0 {
			for _, l := range s.sched.lease(want) {
				rw.tasks[l.it.id] = l
				ws.byTask[l.it.id] = rw
				work.Tasks = append(work.Tasks, apitype.WorkerTask{ID: l.it.id, FunctionID: l.fn.ID})
				if !rw.sentFns[l.fn.ID] {
					rw.sentFns[l.fn.ID] = true
					b, err := json.Marshal(l.fn)
					if err != nil {
						ws.mu.Unlock()
						return err
					}
					work.Functions = append(work.Functions, b)
				}
			}
		}
		rw.view.LastSeen = time.Now()
		ws.mu.Unlock()
		if len(work.Tasks) > 0 {
			if err := s.fillWorkerTasks(r.Context(), &work); err != nil {
				return err
			}
		}
		if len(work.Tasks) > 0 || len(work.Cancel) > 0 || work.Stop {
			writeJSON(w, http.StatusOK, work)
			return nil
		}
		select {
		case <-queued:
		case <-rw.wake:
		case <-timer.C:
			writeJSON(w, http.StatusOK, work)
			return nil
		case <-r.Context().Done():
			return nil
		case <-s.stop:
			writeJSON(w, http.StatusOK, work)
			return nil
		}
	}
}

// fillWorkerTasks adds the tasks' arguments from the store.
func (s *Server) fillWorkerTasks(ctx context.Context, work *apitype.WorkerWork) error {
	ids := make([]string, len(work.Tasks))
	for i, t := range work.Tasks {
		ids[i] = t.ID
	}
	recs, err := s.store.TasksByID(ctx, ids)
	if err != nil {
		return err
	}
	for i := range work.Tasks {
		if rec := recs[work.Tasks[i].ID]; rec != nil {
			work.Tasks[i].Args, work.Tasks[i].Kwargs = rec.Args, rec.Kwargs
		}
	}
	return nil
}

// giveBack returns leased tasks that never started to the head of their
// queues: they are still queued in the store.
func (s *Server) giveBack(ls []*remoteLease) {
	if len(ls) == 0 {
		return
	}
	s.sched.mu.Lock()
	for _, l := range ls {
		s.sched.enqueueFrontLocked(l.fn, []qitem{l.it})
	}
	s.sched.mu.Unlock()
	s.sched.poke()
}

// DecodeWorkerReport reads a report.
func DecodeWorkerReport(r io.Reader) (*apitype.WorkerReport, error) {
	var req apitype.WorkerReport
	if err := decodeStrict(r, &req); err != nil {
		return nil, badRequest(err)
	}
	if slices.Contains(req.Started, "") {
		return nil, errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "started: empty task id")
	}
	for _, res := range req.Results {
		if res.ID == "" || !apitype.Finished(res.State) {
			return nil, errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "result %q: state %q is not a final state (succeeded, failed, cancelled)", res.ID, res.State)
		}
	}
	return &req, nil
}

// reportWorker records tasks that started on a worker and outcomes.
func (s *Server) reportWorker(w http.ResponseWriter, r *http.Request) error {
	req, err := DecodeWorkerReport(r.Body)
	if err != nil {
		return err
	}
	ws := s.workers
	rw, err := ws.lockWorker(r.PathValue("id"))
	if err != nil {
		return err
	}
	var ans apitype.WorkerReportAnswer
	now := time.Now()
	var steps []Step
	for _, id := range req.Started {
		l := rw.tasks[id]
		if l == nil || l.started {
			if l == nil {
				ans.Cancel = append(ans.Cancel, id) // cancelled, or given back meanwhile
			}
			continue
		}
		l.started = true
		s.m.observeQueueWait(now.Sub(l.it.enq))
		tid := id
		steps = append(steps, Step{Next: id, Worker: rw.label, Now: now, Then: func(sr StepResult) {
			if sr.Err != nil {
				s.cfg.Log.Error("starting a task", "task", tid, "error", sr.Err)
			}
			if sr.Started {
				s.w.notify(tid)
				return
			}
			// Cancelled while it was leased: the worker stops it.
			ws.mu.Lock()
			if rw.tasks[tid] != nil {
				delete(rw.tasks, tid)
				delete(ws.byTask, tid)
				rw.cancel = append(rw.cancel, tid)
				rw.poke()
			}
			ws.mu.Unlock()
		}})
	}
	for _, res := range req.Results {
		l := rw.tasks[res.ID]
		if l == nil || !l.started {
			continue // cancelled or given back: its outcome is dropped
		}
		delete(rw.tasks, res.ID)
		delete(ws.byTask, res.ID)
		rw.view.Done++
		c := Completion{State: res.State, Result: res.Result, Error: res.Error, ErrorCode: res.ErrorCode}
		tid := res.ID
		steps = append(steps, Step{Done: res.ID, C: c, Now: now, TTL: s.cfg.ResultTTL, Then: func(sr StepResult) {
			switch {
			case sr.Err != nil:
				s.cfg.Log.Error("writing a task's outcome", "task", tid, "error", sr.Err)
			case sr.Completed:
				s.m.completed.WithLabelValues(c.State).Inc()
				s.w.notify(tid)
			}
		}})
	}
	if len(req.Results) > 0 {
		rw.poke() // places freed: its poll may hand out more
	}
	ws.mu.Unlock()
	for _, st := range steps {
		s.store.Step(st)
	}
	writeJSON(w, http.StatusOK, ans)
	return nil
}

// deregisterWorker ends a draining worker: the tasks it hands back (and any
// it still had) run again elsewhere.
func (s *Server) deregisterWorker(w http.ResponseWriter, r *http.Request) error {
	var req apitype.WorkerRelease
	if err := decodeStrict(r.Body, &req); err != nil {
		return badRequest(err)
	}
	ws := s.workers
	rw, err := ws.lockWorker(r.PathValue("id"))
	if err != nil {
		return err
	}
	rw.view.State = apitype.WorkerGone
	ls := ws.takeTasksLocked(rw)
	ws.mu.Unlock()
	s.cfg.Log.Info("worker deregistered", "worker", rw.view.ID, "where", rw.label, "handed_back", len(ls))
	s.rerun(ls, rw, "")
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// takeTasksLocked removes and returns every task of rw.
func (ws *workers) takeTasksLocked(rw *remoteWorker) []*remoteLease {
	ls := make([]*remoteLease, 0, len(rw.tasks))
	for id, l := range rw.tasks {
		ls = append(ls, l)
		delete(ws.byTask, id)
	}
	clear(rw.tasks)
	sort.Slice(ls, func(i, j int) bool { return ls[i].it.enq.Before(ls[j].it.enq) })
	return ls
}

// rerun handles the tasks a worker will not finish. Leased ones go back to
// their queues. Running ones are queued again: a handed-back task always
// (lostMsg == ""), a lost worker's task under its function's max_retries,
// else it fails with worker_lost and lostMsg.
func (s *Server) rerun(ls []*remoteLease, rw *remoteWorker, lostMsg string) {
	var back []*remoteLease
	var started []*remoteLease
	for _, l := range ls {
		if l.started {
			started = append(started, l)
		} else {
			back = append(back, l)
		}
	}
	s.giveBack(back)
	if len(started) == 0 {
		return
	}
	ids := make([]string, len(started))
	for i, l := range started {
		ids[i] = l.it.id
	}
	recs, err := s.store.TasksByID(context.Background(), ids)
	if err != nil {
		s.cfg.Log.Error("reading a worker's tasks", "worker", rw.view.ID, "error", err)
		return
	}
	now := time.Now()
	for _, l := range started {
		rec := recs[l.it.id]
		if rec == nil {
			continue
		}
		fn, id := l.fn, l.it.id
		requeue := lostMsg == "" || rec.Attempts <= fn.MaxRetries
		st := Step{Done: id, Requeue: requeue, Now: now, TTL: s.cfg.ResultTTL,
			C: Completion{State: apitype.StateFailed, Error: lostMsg, ErrorCode: apitype.CodeWorkerLost}}
		st.Then = func(sr StepResult) {
			switch {
			case sr.Err != nil:
				s.cfg.Log.Error("writing a task's outcome", "task", id, "error", sr.Err)
			case sr.Requeued:
				s.w.notify(id)
				s.sched.enqueue(fn, qitem{id: id, enq: now})
			case sr.Completed:
				s.m.completed.WithLabelValues(apitype.StateFailed).Inc()
				s.w.notify(id)
			}
		}
		s.store.Step(st)
	}
}

// checkLost declares lost the workers not heard from for lostAfter.
func (s *Server) checkLost(now time.Time) {
	ws := s.workers
	type lost struct {
		rw *remoteWorker
		ls []*remoteLease
	}
	var found []lost
	ws.mu.Lock()
	for _, rw := range ws.byID {
		if rw.view.State == apitype.WorkerActive || rw.view.State == apitype.WorkerDraining {
			if now.Sub(rw.view.LastSeen) >= ws.lostAfter {
				rw.view.State = apitype.WorkerLost
				rw.view.LostAt = now
				found = append(found, lost{rw, ws.takeTasksLocked(rw)})
			}
		}
	}
	ws.mu.Unlock()
	for _, f := range found {
		msg := fmt.Sprintf("the worker on %s was lost (no heartbeat for %s) while running the task, and the function allows no more retries (max_retries)",
			f.rw.label, now.Sub(f.rw.view.LastSeen).Round(time.Second))
		s.cfg.Log.Warn("worker lost", "worker", f.rw.view.ID, "where", f.rw.label, "tasks", len(f.ls))
		s.rerun(f.ls, f.rw, msg)
	}
}

// cancelRemote asks the worker running (or holding) task id to stop it; it
// reports false when no worker has it.
func (ws *workers) cancelRemote(id string) bool {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	rw := ws.byTask[id]
	if rw == nil {
		return false
	}
	if l := rw.tasks[id]; l != nil && !l.started {
		delete(rw.tasks, id)
		delete(ws.byTask, id)
	}
	rw.cancel = append(rw.cancel, id)
	rw.poke()
	return true
}

// stopBlock asks the workers of a block to drain (before it is cancelled).
func (ws *workers) stopBlock(blockID string) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	for _, rw := range ws.byID {
		if rw.view.BlockID == blockID && rw.view.State == apitype.WorkerActive {
			rw.stop = true
			rw.view.State = apitype.WorkerDraining
			rw.poke()
		}
	}
}

// load sums what the live workers hold, by block.
func (ws *workers) load() (leased, running int, busy map[string]bool, slots int) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	busy = map[string]bool{}
	for _, rw := range ws.byID {
		if rw.view.State != apitype.WorkerActive && rw.view.State != apitype.WorkerDraining {
			continue
		}
		l, r := rw.counts()
		leased += l
		running += r
		if l+r > 0 {
			busy[rw.view.BlockID] = true
		}
		slots = max(slots, rw.view.Slots)
	}
	return leased, running, busy, slots
}

// views lists the workers, live ones first, newest first; workers that left
// more than keepGone ago are forgotten.
func (ws *workers) views(now time.Time) []apitype.WorkerView {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	out := make([]apitype.WorkerView, 0, len(ws.byID))
	for id, rw := range ws.byID {
		v := rw.view
		if v.State == apitype.WorkerGone || v.State == apitype.WorkerLost {
			if now.Sub(v.LastSeen) > keepGone {
				delete(ws.byID, id)
				continue
			}
		}
		v.Leased, v.Running = rw.counts()
		out = append(out, v)
	}
	live := func(v apitype.WorkerView) bool {
		return v.State == apitype.WorkerActive || v.State == apitype.WorkerDraining
	}
	sort.Slice(out, func(i, j int) bool {
		if live(out[i]) != live(out[j]) {
			return live(out[i])
		}
		return out[i].Registered.After(out[j].Registered)
	})
	return out
}

// keepGone is how long GET /v1/workers keeps listing workers that left.
const keepGone = time.Hour

func (s *Server) listWorkers(w http.ResponseWriter, r *http.Request) error {
	list := apitype.WorkerList{Workers: s.workers.views(time.Now())}
	if s.provider != nil {
		list.Blocks = s.provider.views()
		states := map[string]string{}
		for _, b := range list.Blocks {
			states[b.ID] = b.State
		}
		for i := range list.Workers {
			list.Workers[i].BlockState = states[list.Workers[i].BlockID]
		}
	}
	writeJSON(w, http.StatusOK, list)
	return nil
}
