package endpoint

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/testutil"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/vmm"
)

const squareSrc = "def square(x):\n    import numpy as np\n    return int(np.square(np.int64(x)))\n"

func register(t testing.TB, c *client, body map[string]any) string {
	t.Helper()
	var fv apitype.FunctionView
	c.json("POST", "/v1/functions", body, 201, &fv)
	return fv.ID
}

func submitOne(t testing.TB, c *client, fnID string, args ...any) string {
	t.Helper()
	if args == nil {
		args = []any{}
	}
	var sub struct {
		TaskID string `json:"task_id"`
	}
	c.json("POST", "/v1/tasks", map[string]any{"function_id": fnID, "args": map[string]any{"enc": "json", "data": args}}, 202, &sub)
	return sub.TaskID
}

// await long-polls until the task finished.
func await(t testing.TB, c *client, id string) apitype.TaskView {
	t.Helper()
	deadline := time.Now().Add(10 * time.Minute)
	for time.Now().Before(deadline) {
		var tv apitype.TaskView
		c.json("GET", "/v1/tasks/"+id+"?wait=60s", nil, 200, &tv)
		if apitype.Finished(tv.State) {
			return tv
		}
	}
	t.Fatalf("task %s did not finish in 10 minutes", id)
	return apitype.TaskView{}
}

type agentResult struct {
	OK    bool `json:"ok"`
	Value struct {
		Enc  string          `json:"enc"`
		Data json.RawMessage `json:"data"`
	} `json:"value"`
	Error *struct{ Type, Message, Traceback string } `json:"error"`
}

func resultOf(t testing.TB, tv apitype.TaskView) agentResult {
	t.Helper()
	var r agentResult
	if len(tv.Result) == 0 {
		t.Fatalf("task %s (%s: %s) has no result", tv.ID, tv.State, tv.Error)
	}
	if err := json.Unmarshal(tv.Result, &r); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestVM runs real tasks on one endpoint whose pool holds one VM.
func TestVM(t *testing.T) {
	ts := startServer(t, Config{ImagesDir: imagesDir(t), MaxVMs: 1, IdleTimeout: time.Hour})
	c := ts.c
	square := register(t, c, map[string]any{"image": "numpy", "source": squareSrc, "function": "square", "timeout": "5m"})

	t.Run("result", func(t *testing.T) {
		c.t = t
		tv := await(t, c, submitOne(t, c, square, 7))
		if tv.State != apitype.StateSucceeded || tv.Attempts != 1 {
			t.Fatalf("task = %+v, want succeeded on the first attempt", tv)
		}
		if r := resultOf(t, tv); string(r.Value.Data) != "49" {
			t.Errorf("square(7) = %s, want 49", r.Value.Data)
		}
	})

	t.Run("images and functions", func(t *testing.T) {
		c.t = t
		var imgs struct{ Images []apitype.ImageInfo }
		c.json("GET", "/v1/images", nil, 200, &imgs)
		if len(imgs.Images) != 1 || imgs.Images[0].Name != "numpy" || len(imgs.Images[0].Digest) != 64 {
			t.Errorf("images = %+v, want numpy with its digest", imgs.Images)
		}
		var fns struct{ Functions []apitype.FunctionView }
		c.json("GET", "/v1/functions", nil, 200, &fns)
		if len(fns.Functions) != 1 || fns.Functions[0].ID != square || fns.Functions[0].ImageDigest != imgs.Images[0].Digest {
			t.Errorf("functions = %+v, want square on the numpy digest", fns.Functions)
		}
		// Registering again gives the same id, whatever the image's spelling.
		for _, spelling := range []string{"numpy", "numpy.kimg", filepath.Join(ts.Config().ImagesDir, "numpy.kimg")} {
			if again := register(t, c, map[string]any{"image": spelling, "source": squareSrc, "function": "square", "timeout": "5m"}); again != square {
				t.Errorf("registration with image %q: id = %s, want %s", spelling, again, square)
			}
		}
	})

	t.Run("remote exception", func(t *testing.T) {
		c.t = t
		fn := register(t, c, map[string]any{"image": "numpy", "source": "def inv():\n    import numpy as np\n    return np.linalg.inv(np.zeros((2, 2)))\n"})
		tv := await(t, c, submitOne(t, c, fn))
		r := resultOf(t, tv)
		if tv.State != apitype.StateFailed || tv.ErrorCode != "exception" || r.Error == nil {
			t.Fatalf("task = %+v, want failed with an exception", tv)
		}
		if !strings.Contains(r.Error.Type, "LinAlgError") || !strings.Contains(r.Error.Traceback, "np.linalg.inv") {
			t.Errorf("error = %+v, want LinAlgError with a traceback showing the call", r.Error)
		}
	})

	t.Run("exactly once under load", func(t *testing.T) {
		runLoad(t, ts, square, 4, 25, false)
		runLoad(t, ts, square, 2, 5, true)
	})

	t.Run("sdk", func(t *testing.T) {
		runSDK(t, ts)
	})

	t.Run("vm dies", func(t *testing.T) {
		c.t = t
		crash := register(t, c, map[string]any{"image": "numpy", "source": "def crash():\n    import os\n    os._exit(3)\n"})
		tv := await(t, c, submitOne(t, c, crash))
		if tv.State != apitype.StateFailed || tv.ErrorCode != task.ErrorVMDied || !strings.Contains(tv.Error, "VM died") {
			t.Fatalf("task = %+v, want failed with %s", tv, task.ErrorVMDied)
		}
		// The pool recovers: the next task gets a new VM.
		tv = await(t, c, submitOne(t, c, square, 9))
		if r := resultOf(t, tv); tv.State != apitype.StateSucceeded || string(r.Value.Data) != "81" {
			t.Fatalf("after the crash: task = %+v, want square(9) = 81", tv)
		}
	})

	t.Run("crash mid-batch", func(t *testing.T) {
		c.t = t
		fn := register(t, c, map[string]any{"image": "numpy", "source": "def f(x):\n    import os\n    if x == 3:\n        os._exit(3)\n    return x * x\n"})
		var tasks []map[string]any
		for i := 0; i < 8; i++ {
			tasks = append(tasks, map[string]any{"args": map[string]any{"enc": "json", "data": []int{i}}})
		}
		var batch struct {
			TaskIDs []string `json:"task_ids"`
		}
		c.json("POST", "/v1/tasks/batch", map[string]any{"function_id": fn, "tasks": tasks}, 202, &batch)
		// One VM takes all 8; the crash at 3 ends it, and the tasks it had
		// not run yet run on the next VM, each once.
		for i, id := range batch.TaskIDs {
			tv := await(t, c, id)
			if i == 3 {
				if tv.State != apitype.StateFailed || tv.ErrorCode != task.ErrorVMDied {
					t.Errorf("task 3 = %s %s, want failed with %s", tv.State, tv.ErrorCode, task.ErrorVMDied)
				}
				continue
			}
			if r := resultOf(t, tv); tv.State != apitype.StateSucceeded || string(r.Value.Data) != strconv.Itoa(i*i) || tv.Attempts != 1 {
				t.Errorf("task %d = %s %s after %d attempts, want succeeded %d after 1", i, tv.State, r.Value.Data, tv.Attempts, i*i)
			}
		}
	})

	t.Run("timeout", func(t *testing.T) {
		c.t = t
		slow := register(t, c, map[string]any{"image": "numpy", "source": "def slow():\n    import time\n    time.sleep(3600)\n", "timeout": "3s"})
		tv := await(t, c, submitOne(t, c, slow))
		if tv.State != apitype.StateFailed || tv.ErrorCode != task.ErrorTimeout || !strings.Contains(tv.Error, "timeout of 3s") {
			t.Fatalf("task = %+v, want failed with %s", tv, task.ErrorTimeout)
		}
		tv = await(t, c, submitOne(t, c, square, 3))
		if tv.State != apitype.StateSucceeded {
			t.Fatalf("after the timeout: task = %+v, want succeeded", tv)
		}
	})

	t.Run("metrics", func(t *testing.T) {
		c.t = t
		code, body, _ := c.do("GET", "/metrics", nil)
		if code != 200 {
			t.Fatalf("GET /metrics = %d", code)
		}
		m := string(body)
		get := func(name string) (float64, bool) {
			re := regexp.MustCompile("(?m)^" + regexp.QuoteMeta(name) + ` (\S+)$`)
			mm := re.FindStringSubmatch(m)
			if mm == nil {
				return 0, false
			}
			v, err := strconv.ParseFloat(mm[1], 64)
			return v, err == nil
		}
		cold, ok1 := get(`kiln_vm_acquire_seconds_count{kind="cold"}`)
		restore, ok2 := get(`kiln_vm_acquire_seconds_count{kind="restore"}`)
		if !ok1 || !ok2 || cold+restore < 3 { // first VM, after the crash, after the timeout
			t.Errorf("VM acquires: cold %v + restore %v, want at least 3", cold, restore)
		}
		atLeast := map[string]float64{
			`kiln_vm_acquire_seconds_count{kind="warm"}`: 100,
			`kiln_task_queue_wait_seconds_count`:         105,
			`kiln_task_execution_seconds_count`:          105,
			`kiln_tasks{state="succeeded"}`:              104,
			`kiln_tasks{state="failed"}`:                 3,
		}
		for name, min := range atLeast {
			v, ok := get(name)
			if !ok {
				t.Errorf("/metrics has no %s", name)
			} else if v < min {
				t.Errorf("%s = %v, want at least %v", name, v, min)
			}
		}
		if !strings.Contains(m, `kiln_vm_acquire_seconds_bucket{kind="restore",le="+Inf"}`) {
			t.Errorf("/metrics lacks the restore acquire histogram")
		}
	})
}

// loadTask posts JSON and decodes the answer; it is safe in goroutines.
func post(url, token, path string, body, dst any) error {
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest("POST", url+path, bytes.NewReader(b))
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("POST %s = %d %s", path, resp.StatusCode, out)
	}
	return json.Unmarshal(out, dst)
}

// runLoad has clients submit per tasks each (square of a distinct number),
// waits for them all, and checks that each finished once with the right
// value. It returns the tasks' submit-to-finish latencies.
// runLoad runs clients×per tasks and checks each ran exactly once with the
// right result. Open loop (closed false): each client submits all its tasks,
// then waits for them, so latencies include queueing. Closed loop: each
// client submits one task and waits for it before the next.
func runLoad(tb testing.TB, ts *testServer, fnID string, clients, per int, closed bool) []time.Duration {
	var mu sync.Mutex
	var lat []time.Duration
	ids := map[string]int{}
	errs := make(chan error, clients)
	var wg sync.WaitGroup
	for cl := 0; cl < clients; cl++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				want := map[string]int{}
				drain := func() error {
					for len(want) > 0 {
						pending := make([]string, 0, len(want))
						for id := range want {
							pending = append(pending, id)
						}
						var wr struct {
							Tasks   []apitype.TaskView
							Unknown []string
						}
						if err := post(ts.url, ts.Token(), "/v1/tasks/wait", map[string]any{"task_ids": pending, "timeout": "60s"}, &wr); err != nil {
							return err
						}
						if len(wr.Unknown) > 0 {
							return fmt.Errorf("unknown tasks %v", wr.Unknown)
						}
						for _, tv := range wr.Tasks {
							n, ok := want[tv.ID]
							if !ok {
								return fmt.Errorf("task %s finished twice", tv.ID)
							}
							delete(want, tv.ID)
							var r agentResult
							json.Unmarshal(tv.Result, &r)
							if tv.State != apitype.StateSucceeded || string(r.Value.Data) != strconv.Itoa(n*n) {
								return fmt.Errorf("task %s: square(%d) = %s %s (%s), want %d", tv.ID, n, tv.State, r.Value.Data, tv.Error, n*n)
							}
							mu.Lock()
							lat = append(lat, tv.FinishedAt.Sub(tv.CreatedAt))
							mu.Unlock()
						}
					}
					return nil
				}
				for i := 0; i < per; i++ {
					n := cl*per + i
					var sub struct {
						TaskID string `json:"task_id"`
					}
					if err := post(ts.url, ts.Token(), "/v1/tasks", map[string]any{"function_id": fnID, "args": map[string]any{"enc": "json", "data": []int{n}}}, &sub); err != nil {
						return err
					}
					want[sub.TaskID] = n
					mu.Lock()
					ids[sub.TaskID] = n
					mu.Unlock()
					if closed {
						if err := drain(); err != nil {
							return err
						}
					}
				}
				if err := drain(); err != nil {
					return err
				}
				return nil
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			tb.Fatal(err)
		}
	}
	if len(ids) != clients*per {
		tb.Fatalf("%d distinct task ids, want %d", len(ids), clients*per)
	}
	// Exactly once, from the store: one attempt, one completion each.
	for id := range ids {
		rec, err := ts.Store().Task(context.Background(), id)
		if err != nil {
			tb.Fatal(err)
		}
		if rec.Attempts != 1 || rec.Completions != 1 || rec.State != apitype.StateSucceeded {
			tb.Errorf("task %s: state %s, attempts %d, completions %d; want succeeded once", id, rec.State, rec.Attempts, rec.Completions)
		}
	}
	return lat
}

// runSDK runs the quickstart example and the Python SDK's tests against ts.
func runSDK(t *testing.T, ts *testServer) {
	root := testutil.RepoRoot(t)
	env := append(os.Environ(), "PYTHONPATH="+filepath.Join(root, "python"), "KILN_URL="+ts.url, "KILN_TOKEN="+ts.Token(), "KILN_IMAGE=numpy", "PYTHONDONTWRITEBYTECODE=1")
	run := func(args ...string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "/usr/bin/python3", args...)
		cmd.Dir = root
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("python3 %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	out := run("examples/sdk/quickstart.py")
	for _, w := range []string{
		"mean_of_squares(10) = 28.5",
		"map: [0.0, 0.5, 1.6666666666666667, 3.5]",
		"remote error:", "LinAlgError", "Singular matrix",
		"Traceback (most recent call last)", "np.linalg.inv(np.array(matrix))",
	} {
		if !strings.Contains(out, w) {
			t.Errorf("quickstart output lacks %q:\n%s", w, out)
		}
	}
	out = run("-m", "unittest", "discover", "-v", "-s", "python/tests", "-t", "python")
	for _, w := range []string{
		"test_executor", "test_client", "test_errors",
		// An ordinary script's functions, unchanged (issue 13).
		"test_globals_helpers_constants", "test_client_types_round_trip", "test_typed_exceptions",
		"test_traceback_names_the_script", "test_unsendable_global_fails_at_submit",
		"test_shell_function", "test_reload_tasks", "test_shutdown_cancel_futures_leaves_running",
		"test_running_and_cancel", "test_many_submits_are_batched",
		// CPython's own concurrent.futures tests, run on kiln.Executor.
		`test_map_exception \(tests\.test_conformance`, `test_free_reference \(tests\.test_conformance`,
		`test_first_exception \(tests\.test_conformance`, `test_all_completed \(tests\.test_conformance`,
	} {
		if !regexp.MustCompile(`(?m)` + w + `\b.* \.\.\. ([0-9.]+s )?ok$`).MatchString(out) {
			t.Errorf("python tests: %s did not run and pass:\n%s", w, out)
		}
	}
	// The one skip is the conformance test of a local pool's worker count.
	if skips := regexp.MustCompile(`\.\.\. skipped`).FindAllString(out, -1); len(skips) != 1 {
		t.Errorf("python tests skipped %d tests, want 1 (test_max_workers_negative):\n%s", len(skips), out)
	}
}

// startKillable starts an endpoint subprocess with one VM and the numpy
// image, for a test that kills it -9 and starts it again on state.
func startKillable(t *testing.T) (images, state string, ep *endpointProcess, token string) {
	t.Helper()
	images, state = imagesDir(t), t.TempDir()
	ep = startEndpointProcess(t, helperConfig{State: state, Images: images, MaxVMs: 1})
	token, _, err := LoadOrCreateToken(state)
	if err != nil {
		t.Fatal(err)
	}
	return images, state, ep, token
}

// TestRestart kills -9 an endpoint (a re-executed test binary) with one
// task running and 200 queued, starts it again and checks that the running
// one failed with the restart reason and the 200 completed exactly once.
func TestRestart(t *testing.T) {
	images, state, ep, token := startKillable(t)
	c := newClient(t, "http://"+ep.addr, token)
	sleeper := register(t, c, map[string]any{"image": "numpy", "source": "def sleeper():\n    import time\n    time.sleep(3600)\n", "timeout": "2h"})
	square := register(t, c, map[string]any{"image": "numpy", "source": squareSrc, "timeout": "5m"})
	sleepID := submitOne(t, c, sleeper)
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		var tv apitype.TaskView
		c.json("GET", "/v1/tasks/"+sleepID, nil, 200, &tv)
		if tv.State == apitype.StateRunning {
			break
		}
		if tv.State != apitype.StateQueued || time.Now().After(deadline) {
			t.Fatalf("sleeper task = %+v, want it running", tv)
		}
	}
	const n = 200
	var tasks []map[string]any
	for i := 0; i < n; i++ {
		tasks = append(tasks, map[string]any{"args": map[string]any{"enc": "json", "data": []int{i}}})
	}
	var batch struct {
		TaskIDs []string `json:"task_ids"`
	}
	c.json("POST", "/v1/tasks/batch", map[string]any{"function_id": square, "tasks": tasks}, 202, &batch)
	var q struct{ Tasks []apitype.TaskView }
	c.json("GET", "/v1/tasks?state=queued&limit=1000", nil, 200, &q)
	if len(q.Tasks) != n {
		t.Fatalf("%d tasks queued before the kill, want %d", len(q.Tasks), n)
	}
	ep.kill()

	ts := startServer(t, Config{StateDir: state, ImagesDir: images, MaxVMs: 1})
	tv := await(t, ts.c, sleepID)
	if tv.State != apitype.StateFailed || tv.Error != RestartReason {
		t.Errorf("sleeper after restart = %s %q, want failed with %q", tv.State, tv.Error, RestartReason)
	}
	for i, id := range batch.TaskIDs {
		tv := await(t, ts.c, id)
		r := resultOf(t, tv)
		if tv.State != apitype.StateSucceeded || string(r.Value.Data) != strconv.Itoa(i*i) {
			t.Fatalf("task %d after restart = %s %s (%s), want %d", i, tv.State, r.Value.Data, tv.Error, i*i)
		}
		rec, err := ts.Store().Task(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if rec.Attempts != 1 || rec.Completions != 1 {
			t.Errorf("task %d: attempts %d, completions %d; want 1 and 1 (ran exactly once)", i, rec.Attempts, rec.Completions)
		}
	}
}

// BenchmarkLoad: 8 clients × 500 tasks of a small numpy function, each
// task checked for exactly one correct result. Run it once:
//
//	go test -run XXX -bench BenchmarkLoad -benchtime 1x ./internal/endpoint/
//
// KILN_BENCH_CLIENTS, KILN_BENCH_TASKS and KILN_BENCH_VMS change the shape.
func BenchmarkLoad(b *testing.B) {
	env := func(k string, def int) int {
		if v, err := strconv.Atoi(os.Getenv(k)); err == nil && v > 0 {
			return v
		}
		return def
	}
	clients, per, vms := env("KILN_BENCH_CLIENTS", 8), env("KILN_BENCH_TASKS", 500), env("KILN_BENCH_VMS", 0)
	ts := startServer(b, Config{ImagesDir: imagesDir(b), MaxVMs: vms, IdleTimeout: time.Hour})
	square := register(b, ts.c, map[string]any{"image": "numpy", "source": squareSrc})
	// Warm the pool to its size so the numbers measure warm dispatch.
	warm := ts.Config().PoolMax
	var ids []string
	for i := 0; i < warm; i++ {
		ids = append(ids, submitOne(b, ts.c, square, i))
	}
	for _, id := range ids {
		await(b, ts.c, id)
	}
	var all []time.Duration
	t0 := time.Now()
	for b.Loop() {
		all = append(all, runLoad(b, ts, square, clients, per, os.Getenv("KILN_BENCH_CLOSED") != "")...)
	}
	el := time.Since(t0)
	b.StopTimer()
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	q := func(p float64) float64 { return all[int(p*float64(len(all)-1))].Seconds() * 1000 }
	b.ReportMetric(float64(len(all))/el.Seconds(), "tasks/s")
	b.ReportMetric(q(0.5), "p50-ms")
	b.ReportMetric(q(0.99), "p99-ms")
	b.ReportMetric(float64(ts.Config().MaxVMs), "vms")
}

// TestExecutorRestart runs a client script (testdata/restart_client.py)
// whose endpoint is killed -9 under it. With the endpoint started again on
// the same address, each of 50 futures resolves exactly once with its
// value and each task ran to one completion; with the endpoint left down,
// the futures fail by the Executor's deadline, saying what happened.
func TestExecutorRestart(t *testing.T) {
	images, state, ep, token := startKillable(t)
	url := "http://" + ep.addr

	type outcome struct {
		Results   []int
		Errors    []string
		Callbacks []int
		Seconds   float64
	}
	// client runs the script; kill is called once it has submitted.
	client := func(phase string, kill func()) outcome {
		t.Helper()
		cmd, sc := startClientScript(t, "restart_client.py", url, token, "numpy", phase)
		var last string
		for sc.Scan() {
			if sc.Text() == "submitted" {
				kill()
				continue
			}
			last = sc.Text()
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("%s phase: the client script failed: %v", phase, err)
		}
		var o outcome
		if err := json.Unmarshal([]byte(last), &o); err != nil {
			t.Fatalf("%s phase: the client's last line %q: %v", phase, last, err)
		}
		return o
	}

	o := client("restart", func() {
		ep.kill()
		ep = startEndpointProcess(t, helperConfig{State: state, Images: images, MaxVMs: 1, Listen: ep.addr})
	})
	if len(o.Errors) != 0 || len(o.Results) != 50 {
		t.Fatalf("after the restart: %d results and errors %q, want 50 results", len(o.Results), o.Errors)
	}
	for i, r := range o.Results {
		if r != i*i || o.Callbacks[i] != 1 {
			t.Errorf("future %d: result %d, resolved %d times; want %d, once", i, r, o.Callbacks[i], i*i)
		}
	}
	ep.kill()
	st, err := OpenStore(filepath.Join(state, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	recs, err := st.Tasks(context.Background(), TaskFilter{Limit: 1000})
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 50 {
		t.Errorf("the store holds %d tasks, want the 50 submitted", len(recs))
	}
	for _, r := range recs {
		if r.Completions != 1 || r.State != apitype.StateSucceeded {
			t.Errorf("task %s: %s after %d completions, want succeeded after 1", r.ID, r.State, r.Completions)
		}
	}

	ep = startEndpointProcess(t, helperConfig{State: state, Images: images, MaxVMs: 1, Listen: ep.addr})
	o = client("down", ep.kill)
	if len(o.Results) != 0 || len(o.Errors) != 3 {
		t.Fatalf("with the endpoint down: results %v, errors %q; want 3 errors", o.Results, o.Errors)
	}
	for _, e := range o.Errors {
		if !strings.Contains(e, "has not answered for 5 s") || !strings.Contains(e, "reload_tasks()") {
			t.Errorf("with the endpoint down: error %q, want it to say the endpoint has not answered for 5 s and how to find the tasks again", e)
		}
	}
	if o.Seconds > 120 {
		t.Errorf("with the endpoint down the futures failed after %.0f s, want about the 5 s deadline", o.Seconds)
	}
}

// BenchmarkSDK runs testdata/sdk_bench.py against an endpoint with the
// numpy test image: the rates of a no-op in ProcessPoolExecutor(2), as one
// batch call and through kiln.Executor, side by side in one run, and the
// Executor's single-task latency. Run it once:
//
//	go test -run XXX -bench BenchmarkSDK -benchtime 1x ./internal/endpoint/
//
// KILN_BENCH_TASKS (default 10000) and KILN_BENCH_VMS (default: the
// endpoint's) change its shape.
func BenchmarkSDK(b *testing.B) {
	n := 10000
	if v, err := strconv.Atoi(os.Getenv("KILN_BENCH_TASKS")); err == nil && v > 0 {
		n = v
	}
	vms, _ := strconv.Atoi(os.Getenv("KILN_BENCH_VMS"))
	ts := startServer(b, Config{ImagesDir: imagesDir(b), MaxVMs: vms, IdleTimeout: time.Hour, MaxQueued: 4 * n})
	root := testutil.RepoRoot(b)
	var res struct {
		N                                 int
		PoolRate, BatchRate, ExecutorRate float64
		P50, P99                          float64
	}
	for b.Loop() {
		cmd := exec.Command("/usr/bin/python3", filepath.Join(root, "internal/endpoint/testdata/sdk_bench.py"), ts.url, ts.Token(), "numpy", strconv.Itoa(n))
		cmd.Env = append(os.Environ(), "PYTHONPATH="+filepath.Join(root, "python"), "PYTHONDONTWRITEBYTECODE=1")
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			b.Fatalf("sdk_bench.py: %v", err)
		}
		var raw map[string]float64
		if err := json.Unmarshal(out, &raw); err != nil {
			b.Fatalf("sdk_bench.py printed %q: %v", out, err)
		}
		res.N, res.PoolRate, res.BatchRate, res.ExecutorRate = int(raw["n"]), raw["pool_rate"], raw["batch_rate"], raw["executor_rate"]
		res.P50, res.P99 = raw["p50_ms"], raw["p99_ms"]
	}
	b.ReportMetric(res.PoolRate, "pool-tasks/s")
	b.ReportMetric(res.BatchRate, "batch-tasks/s")
	b.ReportMetric(res.ExecutorRate, "executor-tasks/s")
	b.ReportMetric(res.ExecutorRate/res.BatchRate, "executor/batch")
	b.ReportMetric(res.BatchRate/res.PoolRate, "batch/pool")
	b.ReportMetric(res.P50, "p50-ms")
	b.ReportMetric(res.P99, "p99-ms")
	b.ReportMetric(float64(ts.Config().MaxVMs), "vms")
	accel, _ := vmm.DetectAccel()
	b.Logf("%d no-op tasks, %d VMs (accel %s): ProcessPoolExecutor(2) %.0f/s, batch call %.0f/s, Executor %.0f/s; Executor latency p50 %.1f ms, p99 %.1f ms",
		res.N, ts.Config().MaxVMs, accel, res.PoolRate, res.BatchRate, res.ExecutorRate, res.P50, res.P99)
}
