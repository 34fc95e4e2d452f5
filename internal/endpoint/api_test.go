package endpoint

import (
	"github.com/kiln-dev/kiln/internal/testutil"

	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
)

// TestErrors: bad requests get the right status and a JSON error body, and
// the endpoint keeps serving.
func TestErrors(t *testing.T) {
	ts := startServer(t, Config{ImagesDir: t.TempDir(), MaxBody: 4096, Paused: true})
	putFunction(t, ts.Server, "fn-known", 0)
	noAuth := newClient(t, ts.url, "")
	wrongAuth := newClient(t, ts.url, "not-the-token")
	big := `{"function_id":"fn-known","args":{"enc":"json","data":["` + strings.Repeat("x", 8000) + `"]}}`
	tests := []struct {
		name   string
		c      *client
		method string
		path   string
		body   any
		status int
		code   string
	}{
		{"no token", noAuth, "GET", "/v1/functions", nil, 401, apitype.ErrCodeUnauthorized},
		{"wrong token", wrongAuth, "POST", "/v1/tasks", `{"function_id":"fn-known"}`, 401, apitype.ErrCodeUnauthorized},
		{"metrics need a token", noAuth, "GET", "/metrics", nil, 401, apitype.ErrCodeUnauthorized},
		{"oversized body", ts.c, "POST", "/v1/tasks", big, 413, apitype.ErrCodeTooLarge},
		{"oversized batch", ts.c, "POST", "/v1/tasks/batch", `{"tasks":[` + strings.Repeat(`{"function_id":"fn-known"},`, 300) + `{}]}`, 413, apitype.ErrCodeTooLarge},
		{"malformed JSON", ts.c, "POST", "/v1/tasks", `{"function_id":`, 400, apitype.ErrCodeBadRequest},
		{"empty body", ts.c, "POST", "/v1/functions", "", 400, apitype.ErrCodeBadRequest},
		{"unknown field", ts.c, "POST", "/v1/tasks", `{"function_id":"fn-known","argz":[]}`, 400, apitype.ErrCodeBadRequest},
		{"trailing data", ts.c, "POST", "/v1/tasks", `{"function_id":"fn-known"} {}`, 400, apitype.ErrCodeBadRequest},
		{"args not a list", ts.c, "POST", "/v1/tasks", `{"function_id":"fn-known","args":{"enc":"json","data":{"a":1}}}`, 400, apitype.ErrCodeBadRequest},
		{"bad pickle", ts.c, "POST", "/v1/tasks", `{"function_id":"fn-known","args":{"enc":"pickle","data":"!!"}}`, 400, apitype.ErrCodeBadRequest},
		{"bad wait", ts.c, "GET", "/v1/tasks/t-x?wait=soon", nil, 400, apitype.ErrCodeBadRequest},
		{"bad state filter", ts.c, "GET", "/v1/tasks?state=done", nil, 400, apitype.ErrCodeBadRequest},
		{"unknown function", ts.c, "POST", "/v1/tasks", `{"function_id":"fn-nope"}`, 404, apitype.ErrCodeUnknownFunction},
		{"unknown function in batch", ts.c, "POST", "/v1/tasks/batch", `{"tasks":[{"function_id":"fn-known"},{"function_id":"fn-nope"}]}`, 404, apitype.ErrCodeUnknownFunction},
		{"get unknown function", ts.c, "GET", "/v1/functions/fn-nope", nil, 404, apitype.ErrCodeUnknownFunction},
		{"unknown task", ts.c, "GET", "/v1/tasks/t-nope", nil, 404, apitype.ErrCodeUnknownTask},
		{"cancel unknown task", ts.c, "POST", "/v1/tasks/t-nope/cancel", nil, 404, apitype.ErrCodeUnknownTask},
		{"unknown image", ts.c, "POST", "/v1/functions", `{"image":"nope","source":"def f():\n    return 1\n"}`, 404, apitype.ErrCodeUnknownImage},
		{"image outside the directory", ts.c, "POST", "/v1/functions", `{"image":"../../etc/passwd","source":"def f():\n    return 1\n"}`, 404, apitype.ErrCodeUnknownImage},
		{"absolute image path outside", ts.c, "POST", "/v1/functions", `{"image":"/etc/passwd","source":"def f():\n    return 1\n"}`, 404, apitype.ErrCodeUnknownImage},
		{"nothing to run", ts.c, "POST", "/v1/functions", `{"image":"numpy"}`, 400, apitype.ErrCodeBadRequest},
		{"bad kind", ts.c, "POST", "/v1/functions", `{"image":"numpy","kind":"binary","source":"ls"}`, 400, apitype.ErrCodeBadRequest},
		{"source and ref", ts.c, "POST", "/v1/functions", `{"image":"numpy","source":"def f():\n    return 1\n","ref":"math:factorial"}`, 400, apitype.ErrCodeBadRequest},
		{"source and pickle", ts.c, "POST", "/v1/functions", `{"image":"numpy","source":"def f():\n    return 1\n","pickle":"gAR9lC4="}`, 400, apitype.ErrCodeBadRequest},
		{"ref and command", ts.c, "POST", "/v1/functions", `{"image":"numpy","ref":"math:factorial","command":"echo hi"}`, 400, apitype.ErrCodeBadRequest},
		{"shell kind without a command", ts.c, "POST", "/v1/functions", `{"image":"numpy","kind":"shell","source":"ls"}`, 400, apitype.ErrCodeBadRequest},
		{"negative walltime", ts.c, "POST", "/v1/functions", `{"image":"numpy","command":"echo hi","walltime":-1}`, 400, apitype.ErrCodeBadRequest},
		{"kind disagrees", ts.c, "POST", "/v1/functions", `{"image":"numpy","kind":"ref","source":"def f():\n    return 1\n"}`, 400, apitype.ErrCodeBadRequest},
		{"bad timeout", ts.c, "POST", "/v1/functions", `{"image":"numpy","source":"def f():\n    return 1\n","timeout":"soon"}`, 400, apitype.ErrCodeBadRequest},
		{"unknown route", ts.c, "GET", "/v2/things", nil, 404, apitype.ErrCodeNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.c.t = t
			code, body, hdr := tt.c.do(tt.method, tt.path, tt.body)
			if code != tt.status {
				t.Fatalf("%s %s = %d %s, want %d", tt.method, tt.path, code, body, tt.status)
			}
			var eb apitype.ErrorBody
			if err := json.Unmarshal(body, &eb); err != nil {
				t.Fatalf("error body %q is not JSON: %v", body, err)
			}
			if eb.Code != tt.code || eb.Error == "" {
				t.Errorf("error body = %+v, want code %q and a message", eb, tt.code)
			}
			if ct := hdr.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q, want application/json", ct)
			}
			// The endpoint keeps serving.
			ts.c.t = t
			ts.c.json("GET", "/v1/functions", nil, 200, nil)
		})
	}
	// Health needs no token.
	noAuth.t = t
	var h map[string]any
	noAuth.json("GET", "/v1/health", nil, 200, &h)
	if h["status"] != "ok" {
		t.Errorf("health = %v, want status ok", h)
	}
}

func TestBackpressure(t *testing.T) {
	ts := startServer(t, Config{Paused: true, MaxQueued: 3})
	putFunction(t, ts.Server, "fn-a", 0)
	ts.c.json("POST", "/v1/tasks/batch", `{"function_id":"fn-a","tasks":[{},{}]}`, 202, nil)
	code, body, hdr := ts.c.do("POST", "/v1/tasks/batch", `{"function_id":"fn-a","tasks":[{},{}]}`)
	if code != http.StatusTooManyRequests {
		t.Fatalf("submit over the queue limit = %d %s, want 429", code, body)
	}
	if hdr.Get("Retry-After") == "" {
		t.Errorf("429 without Retry-After")
	}
	var eb apitype.ErrorBody
	if err := json.Unmarshal(body, &eb); err != nil || eb.Code != apitype.ErrCodeQueueFull {
		t.Errorf("429 body = %s, want code %s", body, apitype.ErrCodeQueueFull)
	}
	// One more still fits.
	ts.c.json("POST", "/v1/tasks", `{"function_id":"fn-a"}`, 202, nil)
}

// TestQueueWithoutVMs covers submit, list, long-poll and cancel on a paused endpoint.
func TestQueueWithoutVMs(t *testing.T) {
	ts := startServer(t, Config{Paused: true})
	putFunction(t, ts.Server, "fn-a", 0)
	var sub struct {
		TaskID string `json:"task_id"`
	}
	ts.c.json("POST", "/v1/tasks", `{"function_id":"fn-a","args":{"enc":"json","data":[1]}}`, 202, &sub)
	var tv apitype.TaskView
	ts.c.json("GET", "/v1/tasks/"+sub.TaskID+"?wait=100ms", nil, 200, &tv)
	if tv.State != apitype.StateQueued {
		t.Fatalf("state = %q, want queued", tv.State)
	}
	var list struct{ Tasks []apitype.TaskView }
	ts.c.json("GET", "/v1/tasks?state=queued", nil, 200, &list)
	if len(list.Tasks) != 1 || list.Tasks[0].ID != sub.TaskID {
		t.Fatalf("queued tasks = %+v, want just %s", list.Tasks, sub.TaskID)
	}
	// A long poll wakes when the task is cancelled.
	got := make(chan apitype.TaskView, 1)
	start := time.Now()
	go func() {
		c := newClient(t, ts.url, ts.Token())
		var v apitype.TaskView
		code, body, _ := c.do("GET", "/v1/tasks/"+sub.TaskID+"?wait=120s", nil)
		if code == 200 {
			json.Unmarshal(body, &v)
		}
		got <- v
	}()
	// Cancel once the poll waits, so that it must be woken.
	testutil.WaitFor(t, time.Minute, "the long poll to wait", func() bool { return ts.w.waiting(sub.TaskID) > 0 })
	ts.c.json("POST", "/v1/tasks/"+sub.TaskID+"/cancel", nil, 200, &tv)
	if tv.State != apitype.StateCancelled {
		t.Errorf("after cancel state = %q, want cancelled", tv.State)
	}
	v := <-got
	if v.State != apitype.StateCancelled {
		t.Errorf("long poll state = %q, want cancelled", v.State)
	}
	if d := time.Since(start); d > 100*time.Second {
		t.Errorf("long poll returned after %s: it did not wake on the cancel", d)
	}
	if n := ts.sched.queuedCount(); n != 0 {
		t.Errorf("scheduler queue = %d after cancel, want 0", n)
	}
	// Wait on several: returns the finished one.
	var wr struct {
		Tasks   []apitype.TaskView
		Unknown []string
	}
	ts.c.json("POST", "/v1/tasks/wait", map[string]any{"task_ids": []string{sub.TaskID, "t-missing"}, "timeout": "1s"}, 200, &wr)
	if len(wr.Tasks) != 1 || wr.Tasks[0].ID != sub.TaskID || !cmp.Equal(wr.Unknown, []string{"t-missing"}) {
		t.Errorf("wait = %+v, want the cancelled task and t-missing unknown", wr)
	}
}

func TestMetricsNames(t *testing.T) {
	ts := startServer(t, Config{Paused: true})
	code, body, hdr := ts.c.do("GET", "/metrics", nil)
	if code != 200 {
		t.Fatalf("GET /metrics = %d %s", code, body)
	}
	if !strings.HasPrefix(hdr.Get("Content-Type"), "text/plain") {
		t.Errorf("Content-Type = %q", hdr.Get("Content-Type"))
	}
	for _, w := range []string{
		`kiln_tasks{state="queued"} 0`,
		`kiln_task_queue_wait_seconds_bucket{le="+Inf"} 0`,
		`kiln_vm_acquire_seconds_bucket{kind="warm",le="0.001"} 0`,
		`kiln_vm_acquire_seconds_count{kind="restore"} 0`,
		`kiln_vm_acquire_seconds_count{kind="cold"} 0`,
		`kiln_task_execution_seconds_count 0`,
		"# TYPE kiln_task_execution_seconds histogram",
	} {
		if !strings.Contains(string(body), w) {
			t.Errorf("/metrics lacks %q:\n%s", w, body)
		}
	}
}

func TestToken(t *testing.T) {
	d := t.TempDir()
	tok, created, err := LoadOrCreateToken(d)
	if err != nil || !created || len(tok) != 64 {
		t.Fatalf("LoadOrCreateToken() = %q, %v, %v; want a new 64-hex token", tok, created, err)
	}
	st, err := os.Stat(filepath.Join(d, TokenFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("token file mode = %v, %v; want 0600", st.Mode(), err)
	}
	tok2, created, err := LoadOrCreateToken(d)
	if err != nil || created || tok2 != tok {
		t.Errorf("second LoadOrCreateToken() = %q, %v, %v; want the same token", tok2, created, err)
	}
	os.Chmod(filepath.Join(d, TokenFile), 0o644)
	if _, _, err := LoadOrCreateToken(d); err == nil {
		t.Errorf("LoadOrCreateToken() accepted a world-readable token file")
	}
}

func TestCheckListen(t *testing.T) {
	for _, tt := range []struct {
		addr string
		auth bool
		ok   bool
	}{
		{"127.0.0.1:8470", false, true},
		{"[::1]:8470", false, true},
		{"localhost:8470", false, true},
		{"0.0.0.0:8470", false, false},
		{":8470", false, false},
		{"192.168.1.2:8470", false, false},
		{"0.0.0.0:8470", true, true},
	} {
		err := CheckListen(tt.addr, tt.auth)
		if (err == nil) != tt.ok {
			t.Errorf("CheckListen(%q, %v) = %v, want ok %v", tt.addr, tt.auth, err, tt.ok)
		}
	}
}

// waiting returns the number of long polls waiting for task id.
func (ws *waiters) waiting(id string) int {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	return len(ws.m[id])
}
