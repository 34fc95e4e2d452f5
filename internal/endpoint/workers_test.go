package endpoint

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
	"github.com/kiln-dev/kiln/internal/testutil"
)

// The worker protocol against a real endpoint over loopback HTTP, with the
// test as the worker (no VM): leases, starts, outcomes, give-backs, cancels,
// deregistration and lost workers.

// fakeWorker registers with ts and speaks the protocol by hand.
type fakeWorker struct {
	t  *testing.T
	ts *testServer
	id string
}

func registerWorker(t *testing.T, ts *testServer, block string) *fakeWorker {
	t.Helper()
	var reg apitype.WorkerRegistered
	ts.c.json("POST", "/v1/workers", apitype.WorkerRegister{Node: "node7", SlurmJobID: "4242", BlockID: block, CPUs: 2, MemoryMiB: 2048, Accel: "tcg", Slots: 1}, 201, &reg)
	return &fakeWorker{t: t, ts: ts, id: reg.ID}
}

func (w *fakeWorker) poll(p apitype.WorkerPoll) apitype.WorkerWork {
	w.t.Helper()
	var work apitype.WorkerWork
	w.ts.c.json("POST", "/v1/workers/"+w.id+"/poll", p, 200, &work)
	return work
}

func (w *fakeWorker) report(r apitype.WorkerReport) apitype.WorkerReportAnswer {
	w.t.Helper()
	var ans apitype.WorkerReportAnswer
	w.ts.c.json("POST", "/v1/workers/"+w.id+"/report", r, 200, &ans)
	return ans
}

func taskIDs(ts []apitype.WorkerTask) []string {
	var ids []string
	for _, t := range ts {
		ids = append(ids, t.ID)
	}
	return ids
}

func submitN(t *testing.T, ts *testServer, fnID string, n int) []string {
	t.Helper()
	var ids []string
	for i := range n {
		var sub apitype.SubmitResponse
		ts.c.json("POST", "/v1/tasks", map[string]any{"function_id": fnID, "args": map[string]any{"enc": "json", "data": []int{i}}}, 202, &sub)
		ids = append(ids, sub.TaskID)
	}
	return ids
}

func (ts *testServer) state(t *testing.T, id string) *TaskRecord {
	t.Helper()
	r, err := ts.Store().Task(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestWorkerProtocol(t *testing.T) {
	ts := startServer(t, Config{Provider: ProviderWorkers})
	fn := putFunction(t, ts.Server, "fn-w", 0)
	ids := submitN(t, ts, fn.ID, 3)
	w := registerWorker(t, ts, "b1")

	// A poll hands out up to its capacity, with the function once.
	work := w.poll(apitype.WorkerPoll{Capacity: 2, WaitMS: 1000})
	if diff := cmp.Diff(ids[:2], taskIDs(work.Tasks)); diff != "" {
		t.Fatalf("first poll's tasks (-want +got):\n%s", diff)
	}
	if len(work.Functions) != 1 || !bytes.Contains(work.Functions[0], []byte(`"fn-w"`)) {
		t.Errorf("first poll's functions = %s, want fn-w's definition", work.Functions)
	}
	if got := string(work.Tasks[0].Args); got != `{"enc":"json","data":[0]}` {
		t.Errorf("leased task's args = %s, want {\"enc\":\"json\",\"data\":[0]}", got)
	}
	if st := ts.state(t, ids[0]).State; st != apitype.StateQueued {
		t.Errorf("a leased task's state = %s, want queued until the worker starts it", st)
	}

	// Started, then done: the record names the worker.
	w.report(apitype.WorkerReport{Started: []string{ids[0]}})
	testutil.WaitFor(t, 10*time.Second, "the start being written", func() bool { return ts.state(t, ids[0]).State == apitype.StateRunning })
	if got := ts.state(t, ids[0]).Worker; got != "node7 (Slurm job 4242, block b1)" {
		t.Errorf("running task's worker = %q, want node7 (Slurm job 4242, block b1)", got)
	}
	w.report(apitype.WorkerReport{Results: []apitype.WorkerResult{{ID: ids[0], State: apitype.StateSucceeded, Result: json.RawMessage(`{"ok":true}`)}}})
	testutil.WaitFor(t, 10*time.Second, "the result being written", func() bool { return ts.state(t, ids[0]).State == apitype.StateSucceeded })

	// A lease the worker does not hold (an answer lost on the way) is
	// given back and handed out again; the function is not sent twice.
	work = w.poll(apitype.WorkerPoll{Capacity: 2, WaitMS: 1000})
	if diff := cmp.Diff([]string{ids[1], ids[2]}, taskIDs(work.Tasks)); diff != "" {
		t.Errorf("poll after a lost answer (-want +got):\n%s", diff)
	}
	if len(work.Functions) != 0 {
		t.Errorf("function sent again: %s", work.Functions)
	}

	// Cancelling a leased task tells the worker at its next poll.
	ts.c.json("POST", "/v1/tasks/"+ids[2]+"/cancel", nil, 200, nil)
	work = w.poll(apitype.WorkerPoll{Capacity: 2, WaitMS: 1000, Held: ids[1:]})
	if diff := cmp.Diff([]string{ids[2]}, work.Cancel); diff != "" {
		t.Errorf("cancels after cancelling a leased task (-want +got):\n%s", diff)
	}
	// Starting it anyway is answered with a cancel.
	if ans := w.report(apitype.WorkerReport{Started: []string{ids[2]}}); !slices.Contains(ans.Cancel, ids[2]) {
		t.Errorf("report of a cancelled task's start answered %v, want a cancel of %s", ans.Cancel, ids[2])
	}

	// Deregistering hands back a running task: it is queued again.
	w.report(apitype.WorkerReport{Started: []string{ids[1]}})
	testutil.WaitFor(t, 10*time.Second, "the start being written", func() bool { return ts.state(t, ids[1]).State == apitype.StateRunning })
	ts.c.json("DELETE", "/v1/workers/"+w.id, apitype.WorkerRelease{Release: []string{ids[1]}}, 204, nil)
	testutil.WaitFor(t, 10*time.Second, "the handed-back task queued again", func() bool { return ts.state(t, ids[1]).State == apitype.StateQueued })
	code, body, _ := ts.c.do("POST", "/v1/workers/"+w.id+"/poll", apitype.WorkerPoll{Capacity: 1})
	if code != 410 {
		t.Errorf("poll of a deregistered worker = %d %s, want 410", code, body)
	}
	code, body, _ = ts.c.do("POST", "/v1/workers/w-nosuch/poll", apitype.WorkerPoll{Capacity: 1})
	if code != 404 || !strings.Contains(string(body), "register again") {
		t.Errorf("poll of an unknown worker = %d %s, want 404 saying to register again", code, body)
	}

	// A new worker gets the handed-back task.
	w2 := registerWorker(t, ts, "b2")
	if got := taskIDs(w2.poll(apitype.WorkerPoll{Capacity: 1, WaitMS: 1000}).Tasks); !slices.Equal(got, ids[1:2]) {
		t.Errorf("new worker's tasks = %v, want %v", got, ids[1:2])
	}
	var list apitype.WorkerList
	ts.c.json("GET", "/v1/workers", nil, 200, &list)
	if len(list.Workers) != 2 || list.Workers[0].ID != w2.id || list.Workers[0].Leased != 1 || list.Workers[1].State != apitype.WorkerGone || list.Workers[1].Done != 1 {
		t.Errorf("GET /v1/workers = %+v, want the new worker first with 1 leased, then the gone one with 1 done", list.Workers)
	}
}

// TestWorkerLost: a worker that stops polling is declared lost after
// WorkerLostAfter; its running task reruns when max_retries allows,
// else fails with worker_lost naming the node and the Slurm job; its
// leased task goes back to the queue.
func TestWorkerLost(t *testing.T) {
	ts := startServer(t, Config{Provider: ProviderWorkers, WorkerHeartbeat: 100 * time.Millisecond, WorkerLostAfter: 300 * time.Millisecond})
	once := putFunction(t, ts.Server, "fn-once", 0)
	twice := putFunction(t, ts.Server, "fn-twice", 1)
	a := submitN(t, ts, once.ID, 1)[0]
	b := submitN(t, ts, twice.ID, 1)[0]
	c := submitN(t, ts, once.ID, 1)[0]
	w := registerWorker(t, ts, "b1")
	work := w.poll(apitype.WorkerPoll{Capacity: 3, WaitMS: 100})
	if len(work.Tasks) != 3 {
		t.Fatalf("poll handed out %v, want 3 tasks", taskIDs(work.Tasks))
	}
	w.report(apitype.WorkerReport{Started: []string{a, b}})
	testutil.WaitFor(t, 10*time.Second, "the starts being written", func() bool {
		return ts.state(t, a).State == apitype.StateRunning && ts.state(t, b).State == apitype.StateRunning
	})
	// The worker goes silent.
	testutil.WaitFor(t, 10*time.Second, "the lost worker's tasks being handled", func() bool {
		return ts.state(t, a).State == apitype.StateFailed && ts.state(t, b).State == apitype.StateQueued
	})
	ra := ts.state(t, a)
	if ra.ErrorCode != apitype.CodeWorkerLost || !strings.Contains(ra.Error, "node7 (Slurm job 4242, block b1)") {
		t.Errorf("lost worker's task = %s %q, want worker_lost naming node7 (Slurm job 4242, block b1)", ra.ErrorCode, ra.Error)
	}
	if st := ts.state(t, c).State; st != apitype.StateQueued {
		t.Errorf("lost worker's leased task = %s, want queued", st)
	}
	code, body, _ := ts.c.do("POST", "/v1/workers/"+w.id+"/report", apitype.WorkerReport{Started: []string{c}})
	if code != 410 || !strings.Contains(string(body), "declared lost") {
		t.Errorf("report of a lost worker = %d %s, want 410 declared lost", code, body)
	}
	// Both queued tasks go to the next worker.
	w2 := registerWorker(t, ts, "b2")
	got := taskIDs(w2.poll(apitype.WorkerPoll{Capacity: 3, WaitMS: 100}).Tasks)
	slices.Sort(got)
	want := []string{b, c}
	slices.Sort(want)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("next worker's tasks (-want +got):\n%s", diff)
	}
}

func TestWorkerRegisterErrors(t *testing.T) {
	ts := startServer(t, Config{Provider: ProviderWorkers})
	for _, tc := range []struct {
		body string
		want string
	}{
		{`{"slots":1}`, "node: required"},
		{`{"node":"n","slots":0}`, "slots = 0"},
		{`{"node":"n","slots":1,"cpus":-1}`, "must not be negative"},
		{`{"node":"n","slots":1,"gpus":1}`, "gpus"},
	} {
		code, body, _ := ts.c.do("POST", "/v1/workers", tc.body)
		if code != 400 || !strings.Contains(string(body), tc.want) {
			t.Errorf("POST /v1/workers %s = %d %s, want 400 with %q", tc.body, code, body, tc.want)
		}
	}
}

var workerSeeds = []string{
	`{"node":"n1","slurm_job_id":"12","block_id":"b1","cpus":2,"memory_mib":4096,"accel":"kvm","slots":2}`,
	`{"capacity":4,"wait_ms":5000,"held":["t-1","t-2"]}`, `{"capacity":0,"draining":true}`, `{"capacity":-1}`, `{"held":[""]}`,
	`{"started":["t-1"],"results":[{"id":"t-2","state":"succeeded","result":{"ok":true}}]}`,
	`{"results":[{"id":"t-2","state":"running"}]}`, `{"started":[""]}`, `{}`, `[]`, `null`, "", `{"capacity":1} x`,
}

func FuzzDecodeWorkerMessages(f *testing.F) {
	for _, s := range workerSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := DecodeWorkerRegister(bytes.NewReader(b)); err == nil {
			if r.Node == "" || r.Slots < 1 || r.CPUs < 0 || r.MemoryMiB < 0 {
				t.Errorf("DecodeWorkerRegister(%q) accepted %+v", b, r)
			}
		}
		if p, err := DecodeWorkerPoll(bytes.NewReader(b)); err == nil {
			if p.Capacity < 0 || p.WaitMS < 0 || slices.Contains(p.Held, "") {
				t.Errorf("DecodeWorkerPoll(%q) accepted %+v", b, p)
			}
		}
		if r, err := DecodeWorkerReport(bytes.NewReader(b)); err == nil {
			for _, res := range r.Results {
				if res.ID == "" || !apitype.Finished(res.State) {
					t.Errorf("DecodeWorkerReport(%q) accepted result %+v", b, res)
				}
			}
			again, _ := json.Marshal(r)
			if _, err := DecodeWorkerReport(bytes.NewReader(again)); err != nil {
				t.Errorf("re-decoding %s: %v", again, err)
			}
		}
	})
}

func TestWithID(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"id":"t-1~3","ok":true}`, `{"id":"t-1","ok":true}`},
		{`{"ok":true}`, `{"ok":true}`},
		{``, ``},
		{`not json`, `not json`},
	} {
		if got := string(withID(json.RawMessage(tc.in), "t-1")); got != tc.want {
			t.Errorf("withID(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

// runWorker runs RunWorker against url in the background; the returned
// channel yields its error. It waits for the registration unless
// registered is false.
func runWorker(t *testing.T, ctx context.Context, cfg WorkerConfig, registered bool) <-chan error {
	t.Helper()
	reg := make(chan string, 1)
	cfg.Registered = func(id string) { reg <- id }
	if cfg.StateDir == "" {
		cfg.StateDir = t.TempDir()
	}
	cfg.Node, cfg.Slots = "node-test", 1
	errc := make(chan error, 1)
	go func() { errc <- RunWorker(ctx, cfg) }()
	if registered {
		select {
		case <-reg:
		case err := <-errc:
			t.Fatalf("RunWorker() = %v before registering", err)
		case <-time.After(time.Minute):
			t.Fatal("the worker did not register within a minute")
		}
	}
	return errc
}

// TestWorkerLifecycle runs the real worker (no task, so no VM): it
// registers, drains and deregisters when its context ends, gives up on an
// endpoint that went away, and removes a dead worker's state directory.
func TestWorkerLifecycle(t *testing.T) {
	t.Run("drain on cancel", func(t *testing.T) {
		ts := startServer(t, Config{Provider: ProviderWorkers})
		ctx, cancel := context.WithCancel(context.Background())
		errc := runWorker(t, ctx, WorkerConfig{Endpoint: ts.url, Token: ts.Token()}, true)
		cancel()
		if err := <-errc; err != nil {
			t.Fatalf("RunWorker() after cancel = %v, want nil (drained)", err)
		}
		var list apitype.WorkerList
		ts.c.json("GET", "/v1/workers", nil, 200, &list)
		if len(list.Workers) != 1 || list.Workers[0].State != apitype.WorkerGone {
			t.Errorf("workers after the drain = %+v, want one gone", list.Workers)
		}
	})
	t.Run("endpoint gone", func(t *testing.T) {
		s, err := New(Config{StateDir: t.TempDir(), Provider: ProviderWorkers})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		hs := httptest.NewServer(s.Handler())
		errc := runWorker(t, context.Background(), WorkerConfig{Endpoint: hs.URL, Token: s.Token(), EndpointTimeout: time.Second}, true)
		hs.CloseClientConnections()
		hs.Close()
		select {
		case err := <-errc:
			if err == nil || !strings.Contains(err.Error(), "has not answered for") {
				t.Errorf("RunWorker() with its endpoint gone = %v, want an error saying it has not answered", err)
			}
		case <-time.After(time.Minute):
			t.Fatal("the worker kept running for a minute after its endpoint went away (EndpointTimeout 1 s)")
		}
	})
	t.Run("unreachable at start", func(t *testing.T) {
		errc := runWorker(t, context.Background(), WorkerConfig{Endpoint: "http://127.0.0.1:1", EndpointTimeout: 500 * time.Millisecond}, false)
		if err := <-errc; err == nil || !strings.Contains(err.Error(), "registering with the endpoint http://127.0.0.1:1") {
			t.Errorf("RunWorker() with no endpoint = %v, want a registration error naming it", err)
		}
	})
	t.Run("stale state removed", func(t *testing.T) {
		parent := t.TempDir()
		dead := exec.Command("true")
		if err := dead.Run(); err != nil {
			t.Fatal(err)
		}
		stale := filepath.Join(parent, "worker-stale")
		os.MkdirAll(stale, 0o700)
		os.WriteFile(filepath.Join(stale, workerPIDFile), []byte(strconv.Itoa(dead.Process.Pid)), 0o600)
		live := filepath.Join(parent, "worker-live")
		os.MkdirAll(live, 0o700)
		os.WriteFile(filepath.Join(live, workerPIDFile), []byte(strconv.Itoa(os.Getpid())), 0o600)
		removeStaleWorkerDirs(parent, slog.New(slog.DiscardHandler))
		if _, err := os.Stat(stale); !os.IsNotExist(err) {
			t.Errorf("a dead worker's state directory is still there (stat: %v)", err)
		}
		if _, err := os.Stat(live); err != nil {
			t.Errorf("a live worker's state directory was removed: %v", err)
		}
	})
}
