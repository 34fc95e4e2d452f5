package endpoint

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
	"github.com/kiln-dev/kiln/internal/guest/task"
)

type apiError struct {
	status     int
	code       string
	msg        string
	retryAfter int
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, code, format string, args ...any) *apiError {
	return &apiError{status: status, code: code, msg: fmt.Sprintf(format, args...)}
}

// decodeStrict decodes exactly one JSON value with no unknown fields.
func decodeStrict(r io.Reader, dst any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		if errors.Is(err, io.EOF) {
			return errors.New("empty request body: send a JSON object")
		}
		return fmt.Errorf("malformed JSON: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		return errors.New("malformed JSON: trailing data after the object")
	}
	return nil
}

// DecodeRegister decodes and checks a registration body.
func DecodeRegister(r io.Reader) (*apitype.RegisterRequest, error) {
	var req apitype.RegisterRequest
	if err := decodeStrict(r, &req); err != nil {
		return nil, err
	}
	var given []string
	for _, f := range []struct {
		name, kind string
		set        bool
	}{
		{"source", task.KindSource, req.Source != ""}, {"pickle", task.KindPickle, len(req.Pickle) > 0},
		{"ref", task.KindRef, req.Ref != ""}, {"command", task.KindShell, req.Command != ""},
	} {
		if f.set {
			given = append(given, f.name)
			if req.Kind == "" {
				req.Kind = f.kind
			}
		}
	}
	switch len(given) {
	case 0:
		return nil, errors.New("nothing to run: give one of source (with function), pickle, ref and command")
	case 1:
	default:
		return nil, fmt.Errorf("give exactly one of source, pickle, ref and command, not %s", strings.Join(given, " and "))
	}
	if (req.Namespace != nil || req.Module != "" || req.Filename != "") && req.Kind != task.KindSource {
		return nil, errors.New("module, filename and namespace go with source only")
	}
	t := task.Task{Kind: req.Kind, Ref: req.Ref, Source: req.Source, Name: req.Function, Pickle: req.Pickle, Pickler: req.Pickler,
		Module: req.Module, Filename: req.Filename, Lineno: req.Lineno, Namespace: req.Namespace, Command: req.Command, Walltime: req.Walltime}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	if req.Image == "" {
		return nil, errors.New("no image: set \"image\" to a name from GET /v1/images")
	}
	switch {
	case req.Timeout < 0:
		return nil, errors.New("timeout must not be negative")
	case req.MemoryMiB < 0:
		return nil, errors.New("memory_mib must not be negative")
	case req.MaxResult < 0:
		return nil, errors.New("max_result must not be negative")
	case req.MaxRetries < 0 || req.MaxRetries > 10:
		return nil, errors.New("max_retries must be between 0 and 10")
	case len(req.Name) > 200:
		return nil, errors.New("name is longer than 200 bytes")
	}
	return &req, nil
}

func checkValue(v *task.Value, what string, want byte) error {
	if v == nil {
		return nil
	}
	switch v.Enc {
	case task.EncJSON:
		d := bytes.TrimSpace(v.Data)
		if len(d) == 0 || !json.Valid(d) {
			return fmt.Errorf("%s: json value carries no valid JSON data", what)
		}
		if d[0] != want {
			kind := map[byte]string{'[': "a list", '{': "an object"}[want]
			return fmt.Errorf("%s: json data must be %s", what, kind)
		}
	case task.EncPickle:
		if _, err := v.Pickle(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
	default:
		return fmt.Errorf("%s: unknown encoding %q (want json or pickle)", what, v.Enc)
	}
	return nil
}

func checkSubmit(r *apitype.SubmitRequest) error {
	if err := checkValue(r.Args, "args", '['); err != nil {
		return err
	}
	if len(r.TaskGroup) > 200 {
		return errors.New("task_group is longer than 200 bytes")
	}
	return checkValue(r.Kwargs, "kwargs", '{')
}

// DecodeSubmit decodes and checks a task submission.
func DecodeSubmit(r io.Reader) (*apitype.SubmitRequest, error) {
	var req apitype.SubmitRequest
	if err := decodeStrict(r, &req); err != nil {
		return nil, err
	}
	if req.FunctionID == "" {
		return nil, errors.New("no function_id: register the function first (POST /v1/functions)")
	}
	if err := checkSubmit(&req); err != nil {
		return nil, err
	}
	return &req, nil
}

// DecodeBatch decodes and checks a batch of at most max tasks.
func DecodeBatch(r io.Reader, max int) (*apitype.BatchRequest, error) {
	var req apitype.BatchRequest
	if err := decodeStrict(r, &req); err != nil {
		return nil, err
	}
	if len(req.Tasks) == 0 {
		return nil, errors.New("empty batch: give at least one task")
	}
	if len(req.Tasks) > max {
		return nil, fmt.Errorf("batch of %d tasks is over the limit of %d: split it", len(req.Tasks), max)
	}
	for i := range req.Tasks {
		t := &req.Tasks[i]
		if t.FunctionID == "" {
			t.FunctionID = req.FunctionID
		}
		if t.TaskGroup == "" {
			t.TaskGroup = req.TaskGroup
		}
		if t.FunctionID == "" {
			return nil, fmt.Errorf("task %d: no function_id", i)
		}
		if err := checkSubmit(t); err != nil {
			return nil, fmt.Errorf("task %d: %w", i, err)
		}
	}
	return &req, nil
}

// DecodeWait decodes and checks a wait request for at most max ids.
func DecodeWait(r io.Reader, max int) (*apitype.WaitRequest, error) {
	var req apitype.WaitRequest
	if err := decodeStrict(r, &req); err != nil {
		return nil, err
	}
	switch {
	case len(req.TaskIDs) == 0 && req.TaskGroup == "":
		return nil, errors.New("give task_ids, or a task_group (with the cursor of the previous answer)")
	case len(req.TaskIDs) > 0 && req.TaskGroup != "":
		return nil, errors.New("give task_ids or a task_group, not both")
	case req.Cursor < 0:
		return nil, errors.New("cursor must not be negative")
	}
	if len(req.TaskIDs) > max {
		return nil, fmt.Errorf("%d task ids is over the limit of %d", len(req.TaskIDs), max)
	}
	if req.Timeout < 0 {
		return nil, errors.New("timeout must not be negative")
	}
	if len(req.KnownRunning) > max {
		return nil, fmt.Errorf("%d known running ids is over the limit of %d", len(req.KnownRunning), max)
	}
	return &req, nil
}

func viewFunction(f *Function) apitype.FunctionView {
	return apitype.FunctionView{ID: f.ID, Name: f.Name, Kind: f.Kind, Function: f.Entry, Module: f.Module, Filename: f.Filename, Command: f.Command, Ref: f.Ref, Pickler: f.Pickler,
		SourceBytes: len(f.Source), PickleBytes: len(f.Pickle), Image: f.Image, ImageDigest: f.ImageDigest,
		Timeout: apitype.Duration(f.Timeout()), MemoryMiB: f.MemoryMiB, MaxResult: f.MaxResult, MaxRetries: f.MaxRetries, CreatedAt: f.Created}
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

func viewTask(t *TaskRecord, withResult bool) apitype.TaskView {
	v := apitype.TaskView{ID: t.ID, FunctionID: t.FunctionID, TaskGroup: t.TaskGroup, State: t.State, Attempts: t.Attempts, CreatedAt: t.Created,
		StartedAt: timePtr(t.Started), FinishedAt: timePtr(t.Finished), Error: t.Error, ErrorCode: t.ErrorCode, Worker: t.Worker}
	if withResult {
		v.Result = t.Result
	}
	return v
}

// Handler returns the HTTP handler of the API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	h := func(pattern string, f func(w http.ResponseWriter, r *http.Request) error) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			if err := f(w, r); err != nil {
				s.writeError(w, err)
			}
		})
	}
	h("GET /v1/health", s.health)
	mux.Handle("GET /metrics", s.m.handler(s.cfg.Log))
	h("GET /v1/images", s.listImages)
	h("POST /v1/functions", s.registerFunction)
	h("GET /v1/functions", s.listFunctions)
	h("GET /v1/functions/{id}", s.getFunction)
	h("POST /v1/tasks", s.submit)
	h("POST /v1/tasks/batch", s.submitBatch)
	h("POST /v1/tasks/wait", s.waitTasks)
	h("GET /v1/tasks", s.listTasks)
	h("GET /v1/tasks/{id}", s.getTask)
	h("POST /v1/tasks/{id}/cancel", s.cancelTask)
	h("POST /v1/workers", s.registerWorker)
	h("GET /v1/workers", s.listWorkers)
	h("POST /v1/workers/{id}/poll", s.pollWorker)
	h("POST /v1/workers/{id}/report", s.reportWorker)
	h("DELETE /v1/workers/{id}", s.deregisterWorker)
	h("/", func(w http.ResponseWriter, r *http.Request) error {
		return errorf(http.StatusNotFound, apitype.ErrCodeNotFound, "no route %s %s (see docs/api.md)", r.Method, r.URL.Path)
	})
	return s.middleware(mux)
}

func (s *Server) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				s.cfg.Log.Error("handler panic", "method", r.Method, "path", r.URL.Path, "panic", v)
				s.writeError(w, fmt.Errorf("internal error: %v", v))
			}
		}()
		if r.URL.Path != "/v1/health" && s.token != "" {
			auth := r.Header.Get("Authorization")
			tok, ok := strings.CutPrefix(auth, "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(strings.TrimSpace(tok)), []byte(s.token)) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="kiln"`)
				msg := "missing bearer token: send Authorization: Bearer <token> (the token is in the endpoint's state directory, file token)"
				if ok {
					msg = "wrong bearer token"
				}
				s.writeError(w, errorf(http.StatusUnauthorized, apitype.ErrCodeUnauthorized, "%s", msg))
				return
			}
		}
		if r.ContentLength > s.cfg.MaxBody {
			s.writeError(w, errorf(http.StatusRequestEntityTooLarge, apitype.ErrCodeTooLarge, "request body of %d bytes is over the limit of %d bytes", r.ContentLength, s.cfg.MaxBody))
			return
		}
		if r.Body != nil {
			r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBody)
		}
		next.ServeHTTP(w, r)
	})
}

func (s *Server) writeError(w http.ResponseWriter, err error) {
	var ae *apiError
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &ae):
	case errors.As(err, &mbe):
		ae = errorf(http.StatusRequestEntityTooLarge, apitype.ErrCodeTooLarge, "request body is over the limit of %d bytes", mbe.Limit)
	default:
		s.cfg.Log.Error("request failed", "error", err)
		ae = errorf(http.StatusInternalServerError, apitype.ErrCodeInternal, "%s", err.Error())
	}
	if ae.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(ae.retryAfter))
	}
	writeJSON(w, ae.status, apitype.ErrorBody{Error: ae.msg, Code: ae.code})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.Encode(v)
}

func badRequest(err error) error {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return err
	}
	return errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "%s", err.Error())
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) error {
	writeJSON(w, http.StatusOK, apitype.Health{Status: "ok", API: apitype.Version})
	return nil
}

// gauges reads the metrics' gauges at scrape time.
func (s *Server) gauges(ctx context.Context) (gaugeSnapshot, error) {
	counts, err := s.store.Counts(ctx)
	if err != nil {
		return gaugeSnapshot{}, err
	}
	vms, mem, queued := s.sched.snapshot()
	g := gaugeSnapshot{tasks: counts, vms: vms, vmMemMiB: mem, queued: queued, maxVMs: s.cfg.MaxVMs, maxMemMiB: s.cfg.MaxMemoryMiB,
		workers: map[string]int{}}
	for _, v := range s.workers.views(time.Now()) {
		g.workers[v.State]++
	}
	if s.provider != nil {
		g.blocks = s.provider.blockCounts()
	}
	return g, nil
}

func (s *Server) listImages(w http.ResponseWriter, r *http.Request) error {
	imgs, err := s.images.list()
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, apitype.ImageList{Images: imgs})
	return nil
}

func randomID(prefix string) string {
	var b [10]byte
	rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

func (s *Server) registerFunction(w http.ResponseWriter, r *http.Request) error {
	req, err := DecodeRegister(r.Body)
	if err != nil {
		return badRequest(err)
	}
	info, err := s.images.lookup(req.Image)
	if errors.Is(err, ErrUnknownImage) {
		return errorf(http.StatusNotFound, apitype.ErrCodeUnknownImage, "%s", err.Error())
	}
	if err != nil {
		return errorf(http.StatusBadRequest, apitype.ErrCodeBadImage, "%s", err.Error())
	}
	fn := &Function{Name: req.Name, Kind: req.Kind, Source: req.Source, Entry: req.Function, Ref: req.Ref, Pickle: req.Pickle, Pickler: req.Pickler,
		Module: req.Module, Filename: req.Filename, Lineno: req.Lineno, Namespace: req.Namespace, ExactTypes: req.ExactTypes,
		Command: req.Command, Walltime: req.Walltime,
		// The image by its name in the images directory, however the
		// request spelled it: the same function has the same id.
		Image: info.Name, ImagePath: info.Path, ImageDigest: info.Digest, MaxRetries: req.MaxRetries}
	timeout := time.Duration(req.Timeout)
	if timeout == 0 {
		timeout = s.cfg.DefaultTimeout
	}
	if timeout > s.cfg.MaxTimeout {
		return errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "timeout %s is over the endpoint's limit of %s", timeout, s.cfg.MaxTimeout)
	}
	fn.TimeoutMS = max(timeout.Milliseconds(), 1)
	fn.MemoryMiB = req.MemoryMiB
	if fn.MemoryMiB == 0 {
		fn.MemoryMiB = info.MemoryMiB
	}
	if fn.MemoryMiB == 0 {
		fn.MemoryMiB = 512
	}
	if fn.MemoryMiB < 64 || fn.MemoryMiB > s.cfg.MaxMemoryMiB {
		return errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "memory_mib %d: want between 64 and the endpoint's limit of %d", fn.MemoryMiB, s.cfg.MaxMemoryMiB)
	}
	fn.MaxResult = req.MaxResult
	if fn.MaxResult == 0 {
		fn.MaxResult = s.cfg.DefaultMaxResult
	}
	if fn.MaxResult > s.cfg.MaxResultCap {
		return errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "max_result %d is over the endpoint's limit of %d bytes", fn.MaxResult, s.cfg.MaxResultCap)
	}
	if fn.Name == "" {
		fn.Name = map[string]string{task.KindSource: fn.Entry, task.KindRef: fn.Ref, task.KindPickle: "pickled", task.KindShell: "shell"}[fn.Kind]
	}
	// Content address: registering the same function twice gives one id.
	body, _ := json.Marshal(fn)
	sum := sha256.Sum256(body)
	fn.ID = "fn-" + hex.EncodeToString(sum[:10])
	fn.Created = time.Now()
	if err := s.store.PutFunction(r.Context(), fn); err != nil {
		return err
	}
	stored, err := s.store.Function(r.Context(), fn.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, viewFunction(stored))
	return nil
}

func (s *Server) listFunctions(w http.ResponseWriter, r *http.Request) error {
	fns, err := s.store.Functions(r.Context())
	if err != nil {
		return err
	}
	out := make([]apitype.FunctionView, 0, len(fns))
	for _, f := range fns {
		out = append(out, viewFunction(f))
	}
	writeJSON(w, http.StatusOK, apitype.FunctionList{Functions: out})
	return nil
}

func (s *Server) getFunction(w http.ResponseWriter, r *http.Request) error {
	fn, err := s.function(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, viewFunction(fn))
	return nil
}

func (s *Server) function(ctx context.Context, id string) (*Function, error) {
	fn, err := s.store.Function(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return nil, errorf(http.StatusNotFound, apitype.ErrCodeUnknownFunction, "unknown function %q: register it with POST /v1/functions", id)
	}
	return fn, err
}

func (s *Server) submit(w http.ResponseWriter, r *http.Request) error {
	req, err := DecodeSubmit(r.Body)
	if err != nil {
		return badRequest(err)
	}
	ids, err := s.enqueue(r.Context(), []apitype.SubmitRequest{*req})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, apitype.SubmitResponse{TaskID: ids[0], State: apitype.StateQueued})
	return nil
}

func (s *Server) submitBatch(w http.ResponseWriter, r *http.Request) error {
	req, err := DecodeBatch(r.Body, s.cfg.MaxBatch)
	if err != nil {
		return badRequest(err)
	}
	ids, err := s.enqueue(r.Context(), req.Tasks)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, apitype.BatchResponse{TaskIDs: ids})
	return nil
}

// enqueue stores and queues tasks, all or none.
func (s *Server) enqueue(ctx context.Context, reqs []apitype.SubmitRequest) ([]string, error) {
	fns := map[string]*Function{}
	for _, q := range reqs {
		if fns[q.FunctionID] == nil {
			fn, err := s.function(ctx, q.FunctionID)
			if err != nil {
				return nil, err
			}
			fns[q.FunctionID] = fn
		}
	}
	if q := s.sched.queuedCount(); q+len(reqs) > s.cfg.MaxQueued {
		s.m.rejected.Add(float64(len(reqs)))
		e := errorf(http.StatusTooManyRequests, apitype.ErrCodeQueueFull, "the queue is full (%d tasks queued, limit %d): retry later", q, s.cfg.MaxQueued)
		e.retryAfter = min(max(q/(10*s.cfg.MaxVMs), 1), 60)
		return nil, e
	}
	nts := make([]NewTask, len(reqs))
	ids := make([]string, len(reqs))
	for i, q := range reqs {
		ids[i] = randomID("t-")
		nts[i] = NewTask{ID: ids[i], FunctionID: q.FunctionID, Args: marshalValue(q.Args), Kwargs: marshalValue(q.Kwargs), TaskGroup: q.TaskGroup}
	}
	now := time.Now()
	if _, err := s.store.InsertTasks(ctx, now, nts); err != nil {
		return nil, err
	}
	s.m.submitted.Add(float64(len(reqs)))
	byFn := map[string][]qitem{}
	var order []string
	for i, q := range reqs {
		if byFn[q.FunctionID] == nil {
			order = append(order, q.FunctionID)
		}
		byFn[q.FunctionID] = append(byFn[q.FunctionID], qitem{id: ids[i], enq: now})
	}
	for _, id := range order {
		s.sched.enqueue(fns[id], byFn[id]...)
	}
	return ids, nil
}

func marshalValue(v *task.Value) json.RawMessage {
	if v == nil {
		return nil
	}
	b, _ := json.Marshal(v)
	return b
}

// parseWait reads ?wait= as a duration ("30s") or seconds ("30").
func (s *Server) parseWait(r *http.Request) (time.Duration, error) {
	q := r.URL.Query().Get("wait")
	if q == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(q)
	if err != nil {
		f, ferr := strconv.ParseFloat(q, 64)
		if ferr != nil || f < 0 || f > 1e6 {
			return 0, errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "wait=%q: want a duration such as 30s", q)
		}
		d = time.Duration(f * float64(time.Second))
	}
	if d < 0 {
		return 0, errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "wait must not be negative")
	}
	return min(d, s.cfg.MaxWait), nil
}

func (s *Server) task(ctx context.Context, id string) (*TaskRecord, error) {
	t, err := s.store.Task(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return nil, errorf(http.StatusNotFound, apitype.ErrCodeUnknownTask, "unknown task %q (results are kept for %s after they finish)", id, s.cfg.ResultTTL)
	}
	return t, err
}

func (s *Server) getTask(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	wait, err := s.parseWait(r)
	if err != nil {
		return err
	}
	var wt *waiter
	if wait > 0 {
		var done func()
		wt, done = s.w.add([]string{id})
		defer done()
	}
	t, err := s.task(r.Context(), id)
	if err != nil {
		return err
	}
	if wait > 0 && !apitype.Finished(t.State) {
		timer := time.NewTimer(wait)
		defer timer.Stop()
		select {
		case <-wt.ch:
		case <-timer.C:
		case <-r.Context().Done():
			return nil
		}
		if t, err = s.task(r.Context(), id); err != nil {
			return err
		}
	}
	writeJSON(w, http.StatusOK, viewTask(t, true))
	return nil
}

func (s *Server) waitTasks(w http.ResponseWriter, r *http.Request) error {
	req, err := DecodeWait(r.Body, s.cfg.MaxBatch)
	if err != nil {
		return badRequest(err)
	}
	wait := min(time.Duration(req.Timeout), s.cfg.MaxWait)
	if req.TaskGroup != "" {
		return s.waitGroup(w, r, req.TaskGroup, req.Cursor, wait)
	}
	wt, done := s.w.add(req.TaskIDs)
	defer done()
	deadline := time.Now().Add(wait)
	for {
		var out []apitype.TaskView
		var unknown []string
		ts, err := s.store.TasksByID(r.Context(), req.TaskIDs)
		if err != nil {
			return err
		}
		var running []string
		fresh := false // a task started that the client does not know runs
		for _, id := range req.TaskIDs {
			t := ts[id]
			if t == nil {
				unknown = append(unknown, id)
				continue
			}
			if apitype.Finished(t.State) {
				out = append(out, viewTask(t, true))
			} else if req.Running && t.State == apitype.StateRunning {
				running = append(running, id)
				fresh = fresh || !slices.Contains(req.KnownRunning, id)
			}
		}
		left := time.Until(deadline)
		if len(out) > 0 || len(unknown) > 0 || left <= 0 || fresh {
			if out == nil {
				out = []apitype.TaskView{}
			}
			if unknown == nil {
				unknown = []string{}
			}
			writeJSON(w, http.StatusOK, apitype.WaitResponse{Tasks: out, Unknown: unknown, Running: running})
			return nil
		}
		timer := time.NewTimer(left)
		select {
		case <-wt.ch:
			timer.Stop()
			wt, done = s.w.add(req.TaskIDs) // re-arm (the old one is removed by the deferred done)
			defer done()
		case <-timer.C:
		case <-r.Context().Done():
			timer.Stop()
			return nil
		}
	}
}

// waitGroup answers a group wait: the group's tasks that changed state
// after cursor, waiting up to wait for one.
func (s *Server) waitGroup(w http.ResponseWriter, r *http.Request, group string, cursor int64, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	var read time.Time // the last read of the group's events
	for {
		wt, done := s.w.add([]string{anyTask})
		read = time.Now()
		ts, err := s.store.GroupEvents(r.Context(), group, cursor, s.cfg.MaxBatch)
		if err != nil {
			done()
			return err
		}
		left := time.Until(deadline)
		if len(ts) > 0 || left <= 0 {
			done()
			out := make([]apitype.TaskView, 0, len(ts))
			next := cursor
			for _, t := range ts {
				out = append(out, viewTask(t, apitype.Finished(t.State)))
				next = max(next, t.EventSeq)
			}
			writeJSON(w, http.StatusOK, apitype.WaitResponse{Tasks: out, Unknown: []string{}, Cursor: next})
			return nil
		}
		timer := time.NewTimer(left)
		select {
		case <-wt.ch:
			// Woken by a change (maybe another group's): read again, but
			// not sooner than groupPollGap after the last read, so that
			// a stream of completions comes several to an answer.
			if gap := groupPollGap - time.Since(read); gap > 0 && gap < left {
				timer.Reset(gap)
				select {
				case <-timer.C:
				case <-r.Context().Done():
					timer.Stop()
					done()
					return nil
				}
			}
		case <-timer.C:
		case <-r.Context().Done():
			timer.Stop()
			done()
			return nil
		}
		timer.Stop()
		done()
	}
}

// groupPollGap is the least time between two reads of a group's events in
// one group wait: every task's change wakes a group waiter, and under a
// stream of completions it would otherwise read, encode and answer them
// one or two at a time, the client polling as fast as the tasks end.
const groupPollGap = 5 * time.Millisecond

func (s *Server) listTasks(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	f := TaskFilter{State: q.Get("state"), FunctionID: q.Get("function_id"), TaskGroup: q.Get("task_group")}
	if f.State != "" && !slices.Contains(apitype.States, f.State) {
		return errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "state=%q: want one of %s", f.State, strings.Join(apitype.States, ", "))
	}
	var err error
	if v := q.Get("after"); v != "" {
		if f.After, err = strconv.ParseInt(v, 10, 64); err != nil {
			return errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "after=%q: want the next_after of the previous page", v)
		}
	}
	f.Limit = 100
	if v := q.Get("limit"); v != "" {
		if f.Limit, err = strconv.Atoi(v); err != nil || f.Limit < 1 || f.Limit > 1000 {
			return errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "limit=%q: want 1 to 1000", v)
		}
	}
	ts, err := s.store.Tasks(r.Context(), f)
	if err != nil {
		return err
	}
	out := make([]apitype.TaskView, 0, len(ts))
	for _, t := range ts {
		out = append(out, viewTask(t, false))
	}
	resp := apitype.TaskList{Tasks: out}
	if len(ts) == f.Limit {
		resp.NextAfter = ts[len(ts)-1].Seq
	}
	writeJSON(w, http.StatusOK, resp)
	return nil
}

// cancelRunning stops a running task, on this endpoint's VMs or on a worker.
func (s *Server) cancelRunning(id string) {
	if !s.sched.cancelRunning(id) {
		s.workers.cancelRemote(id)
	}
}

// cancelTask cancels a queued task, and a running one unless
// ?only_queued=true (what an Executor's Future.cancel needs: a running
// task is not cancelled, as concurrent.futures does).
func (s *Server) cancelTask(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	onlyQueued := false
	if v := r.URL.Query().Get("only_queued"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return errorf(http.StatusBadRequest, apitype.ErrCodeBadRequest, "only_queued=%q: want true or false", v)
		}
		onlyQueued = b
	}
	t, err := s.task(r.Context(), id)
	if err != nil {
		return err
	}
	switch t.State {
	case apitype.StateQueued:
		ok, err := s.store.CancelQueued(r.Context(), id, time.Now(), s.cfg.ResultTTL)
		if err != nil {
			return err
		}
		if ok {
			s.sched.removeQueued(t.FunctionID, id)
			s.m.completed.WithLabelValues(apitype.StateCancelled).Inc()
			s.w.notify(id)
			s.workers.cancelRemote(id) // leased to a worker, not started yet
		} else if !onlyQueued {
			s.cancelRunning(id) // it started meanwhile
		}
	case apitype.StateRunning:
		if !onlyQueued {
			s.cancelRunning(id)
		}
	}
	if t, err = s.task(r.Context(), id); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, viewTask(t, true))
	return nil
}
