package endpoint

import (
	"context"
	"os"
	"path/filepath"
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
