package endpoint

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
)

func openStore(t *testing.T, path string) *Store {
	t.Helper()
	st, err := OpenStore(path)
	if err != nil {
		t.Fatalf("OpenStore() error = %v", err)
	}
	return st
}

func TestStoreExactlyOnce(t *testing.T) {
	ctx := context.Background()
	st := openStore(t, filepath.Join(t.TempDir(), "kiln.db"))
	defer st.Close()
	fn := &Function{ID: "fn-1", Kind: "source", Created: time.Now()}
	if err := st.PutFunction(ctx, fn); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if _, err := st.InsertTasks(ctx, now, []NewTask{{ID: "t1", FunctionID: "fn-1"}}); err != nil {
		t.Fatal(err)
	}
	if ok, err := st.Complete(ctx, "t1", Completion{State: apitype.StateSucceeded}, now, time.Hour); ok || err != nil {
		t.Fatalf("Complete(queued task) = %v, %v; want false (only running tasks complete)", ok, err)
	}
	if ok, err := st.MarkRunning(ctx, "t1", now); !ok || err != nil {
		t.Fatalf("MarkRunning() = %v, %v; want true", ok, err)
	}
	if ok, err := st.MarkRunning(ctx, "t1", now); ok || err != nil {
		t.Fatalf("second MarkRunning() = %v, %v; want false", ok, err)
	}
	if ok, err := st.Complete(ctx, "t1", Completion{State: apitype.StateSucceeded, Result: []byte(`{"ok":true}`)}, now, time.Hour); !ok || err != nil {
		t.Fatalf("Complete() = %v, %v; want true", ok, err)
	}
	if ok, err := st.Complete(ctx, "t1", Completion{State: apitype.StateFailed, Error: "late"}, now, time.Hour); ok || err != nil {
		t.Fatalf("second Complete() = %v, %v; want false", ok, err)
	}
	rec, err := st.Task(ctx, "t1")
	if err != nil {
		t.Fatal(err)
	}
	if rec.State != apitype.StateSucceeded || rec.Completions != 1 || rec.Attempts != 1 || string(rec.Result) != `{"ok":true}` {
		t.Errorf("task = %+v, want succeeded once with the first result", rec)
	}
	// Expiry.
	if n, err := st.Expire(ctx, now.Add(30*time.Minute)); n != 0 || err != nil {
		t.Errorf("Expire(before ttl) = %d, %v; want 0", n, err)
	}
	if n, err := st.Expire(ctx, now.Add(2*time.Hour)); n != 1 || err != nil {
		t.Errorf("Expire(after ttl) = %d, %v; want 1", n, err)
	}
	if _, err := st.Task(ctx, "t1"); err != ErrNotFound {
		t.Errorf("Task(expired) error = %v, want ErrNotFound", err)
	}
}

// TestStoreRecover: a task left running by a dead endpoint fails with the
// restart reason, or is queued again under max_retries.
func TestStoreRecover(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kiln.db")
	st := openStore(t, path)
	now := time.Now()
	for _, f := range []*Function{{ID: "fn-once", Created: now}, {ID: "fn-retry", MaxRetries: 1, Created: now}} {
		if err := st.PutFunction(ctx, f); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.InsertTasks(ctx, now, []NewTask{{ID: "a", FunctionID: "fn-once"}, {ID: "b", FunctionID: "fn-retry"}, {ID: "c", FunctionID: "fn-once"}}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b"} {
		if ok, err := st.MarkRunning(ctx, id, now); !ok || err != nil {
			t.Fatal(ok, err)
		}
	}
	st.Close() // the endpoint "dies" with a and b running

	st = openStore(t, path)
	defer st.Close()
	req, failed, err := st.Recover(ctx, now, time.Hour)
	if req != 1 || failed != 1 || err != nil {
		t.Fatalf("Recover() = %d, %d, %v; want 1 requeued, 1 failed", req, failed, err)
	}
	want := map[string]string{"a": apitype.StateFailed, "b": apitype.StateQueued, "c": apitype.StateQueued}
	for id, state := range want {
		rec, err := st.Task(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if rec.State != state {
			t.Errorf("task %s state = %q, want %q", id, rec.State, state)
		}
		if id == "a" && (rec.Error != RestartReason || rec.ErrorCode != apitype.CodeEndpointRestarted) {
			t.Errorf("task a error = %q (%s), want %q", rec.Error, rec.ErrorCode, RestartReason)
		}
	}
	q, err := st.Queued(ctx)
	if err != nil || len(q) != 2 || q[0].ID != "b" || q[1].ID != "c" {
		t.Errorf("Queued() = %+v, %v; want b, c in submission order", q, err)
	}
	// b ran once already: a second death fails it for good.
	if ok, _ := st.MarkRunning(ctx, "b", now); !ok {
		t.Fatal("MarkRunning(b) = false")
	}
	if req, failed, _ := st.Recover(ctx, now, time.Hour); req != 0 || failed != 1 {
		t.Errorf("second Recover() = %d requeued, %d failed; want 0, 1 (max_retries 1 allows two attempts)", req, failed)
	}
}

func TestStoreWAL(t *testing.T) {
	st := openStore(t, filepath.Join(t.TempDir(), "kiln.db"))
	defer st.Close()
	var mode string
	if err := st.db.QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil || mode != "wal" {
		t.Errorf("journal_mode = %q, %v; want wal", mode, err)
	}
}

// TestStateDirPrivate: the state directory is 0700 and every file in it
// (database, WAL, shared memory, token) 0600, also when it existed with
// looser modes.
func TestStateDirPrivate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, DBFile), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, Config{StateDir: dir, Paused: true})
	putFunction(t, ts.Server, "fn-a", 0)
	ts.c.json("POST", "/v1/tasks", `{"function_id":"fn-a","args":{"enc":"json","data":[1]}}`, 202, nil)
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o700 {
		t.Errorf("state directory mode = %o, want 700", got)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, e := range ents {
		names[e.Name()] = true
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if got := info.Mode().Perm(); got != 0o600 {
			t.Errorf("%s mode = %o, want 600", e.Name(), got)
		}
	}
	for _, want := range []string{DBFile, DBFile + "-wal", DBFile + "-shm", TokenFile} {
		if !names[want] {
			t.Errorf("state directory lacks %s (has %v)", want, names)
		}
	}
}

// step writes st and waits for it.
func step(st *Store, s Step) StepResult {
	ch := make(chan StepResult, 1)
	s.Then = func(r StepResult) { ch <- r }
	st.Step(s)
	return <-ch
}

// TestStoreStep: a step completes (or requeues) a running task and starts
// the queued one after it, each change guarded as on its own, and steps are
// written in order.
func TestStoreStep(t *testing.T) {
	ctx := context.Background()
	st := openStore(t, filepath.Join(t.TempDir(), "kiln.db"))
	defer st.Close()
	if err := st.PutFunction(ctx, &Function{ID: "fn-1", Kind: "source", Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if _, err := st.InsertTasks(ctx, now, []NewTask{{ID: "t1", FunctionID: "fn-1"}, {ID: "t2", FunctionID: "fn-1"}, {ID: "t3", FunctionID: "fn-1"}, {ID: "t4", FunctionID: "fn-1"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.MarkRunning(ctx, "t1", now); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CancelQueued(ctx, "t3", now, time.Hour); err != nil {
		t.Fatal(err)
	}
	ok := Completion{State: apitype.StateSucceeded, Result: []byte(`{"ok":true}`)}
	tests := []struct {
		s    Step
		want StepResult
	}{
		{Step{Done: "t1", C: ok, Next: "t2"}, StepResult{Completed: true, Started: true}}, // t1 ends, t2 begins
		{Step{Done: "t1", C: ok}, StepResult{}},                                           // t1 is complete already
		{Step{Next: "t3"}, StepResult{}},                                                  // t3 was cancelled while queued
		{Step{Done: "t2", C: ok, Next: "t2"}, StepResult{Completed: true}},                // t2 ends; it is not queued
		{Step{Next: "t4"}, StepResult{Started: true}},
		{Step{Done: "t4", Requeue: true}, StepResult{Requeued: true}}, // a retry
		{Step{Next: "nosuch"}, StepResult{}},
	}
	for _, tt := range tests {
		tt.s.Now, tt.s.TTL = now, time.Hour
		if got := step(st, tt.s); got != tt.want {
			t.Errorf("Step(%+v) = %+v, want %+v", tt.s, got, tt.want)
		}
	}
	for id, want := range map[string]string{"t1": apitype.StateSucceeded, "t2": apitype.StateSucceeded, "t3": apitype.StateCancelled, "t4": apitype.StateQueued} {
		rec, err := st.Task(ctx, id)
		if err != nil || rec.State != want || (want == apitype.StateSucceeded && (rec.Attempts != 1 || rec.Completions != 1)) {
			t.Errorf("task %s = %+v, %v; want %s (once)", id, rec, err, want)
		}
	}
	// Steps queued back to back are written in order, and Close writes
	// what is still queued.
	var order []string
	for _, id := range []string{"t4"} {
		st.Step(Step{Next: id, Now: now, Then: func(r StepResult) { order = append(order, fmt.Sprintf("start %v", r.Started)) }})
		st.Step(Step{Done: id, C: ok, Now: now, Then: func(r StepResult) { order = append(order, fmt.Sprintf("done %v", r.Completed)) }})
	}
	st.Close()
	if want := []string{"start true", "done true"}; !slices.Equal(order, want) {
		t.Errorf("steps wrote %q, want %q", order, want)
	}
}

// BenchmarkStoreStep measures the store's cost per task of a batch: a
// step that completes a task and starts the next, written as the endpoint
// writes them (queued, many per transaction).
func BenchmarkStoreStep(b *testing.B) {
	ctx := context.Background()
	st, err := OpenStore(filepath.Join(b.TempDir(), "kiln.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	if err := st.PutFunction(ctx, &Function{ID: "fn-1", Kind: "source", Created: time.Now()}); err != nil {
		b.Fatal(err)
	}
	const n = 50000
	tasks := make([]NewTask, n)
	for i := range tasks {
		tasks[i] = NewTask{ID: fmt.Sprintf("t%d", i), FunctionID: "fn-1"}
	}
	now := time.Now()
	if _, err := st.InsertTasks(ctx, now, tasks); err != nil {
		b.Fatal(err)
	}
	if _, err := st.MarkRunning(ctx, "t0", now); err != nil {
		b.Fatal(err)
	}
	c := Completion{State: apitype.StateSucceeded, Result: []byte(`{"id":"x","ok":true,"value":{"enc":"json","data":null},"stdout":"","stderr":""}`)}
	i := 0
	var last StepResult
	for b.Loop() {
		if i+1 >= n {
			b.Fatal("out of tasks: lower -benchtime")
		}
		st.Step(Step{Done: tasks[i].ID, C: c, Next: tasks[i+1].ID, Now: now, TTL: time.Hour, Then: func(r StepResult) { last = r }})
		i++
	}
	step(st, Step{}) // wait for the writer
	if !last.Completed || !last.Started {
		b.Fatalf("last step = %+v, want it completed and started", last)
	}
}
