package endpoint

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
	"github.com/kiln-dev/kiln/internal/testutil"
)

// The Slurm provider end to end: a real kiln serve (the CLI) with provider
// "slurm", real sbatch/squeue/scancel on the one-node cluster that
// scripts/slurm-dev.sh starts, real kiln workers in the pilot jobs, real
// VMs.

// slurmServe is a kiln serve process with the Slurm provider.
type slurmServe struct {
	t     testing.TB
	cmd   *exec.Cmd
	url   string
	token string
	state string
	log   *testutil.LockedBuffer
	c     *client
	done  chan struct{}
}

// startSlurmServe starts kiln serve --config serve.toml with a [slurm]
// table of partition "debug" plus extra lines, and waits until it serves.
func startSlurmServe(t testing.TB, extra string) *slurmServe {
	t.Helper()
	testutil.NeedSlurm(t)
	testutil.NeedQEMU(t)
	bin := testutil.Kiln(t)
	images := imagesDir(t)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	conf := fmt.Sprintf(`listen = "127.0.0.1:0"
images = %q
state = %q
provider = "slurm"

[slurm]
partition = "debug"
walltime = "00:20:00"
cpus_per_task = 1
%s
`, images, state, extra)
	confPath := filepath.Join(dir, "serve.toml")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	s := &slurmServe{t: t, state: state, log: &testutil.LockedBuffer{}, done: make(chan struct{})}
	s.cmd = exec.Command(bin, "serve", "--config", confPath, "-v")
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr = pw
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	urlc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		re := regexp.MustCompile(`kiln: serving on (http://\S+)`)
		for sc.Scan() {
			line := sc.Text()
			s.log.Write([]byte(line + "\n"))
			if m := re.FindStringSubmatch(line); m != nil {
				urlc <- m[1]
			}
		}
	}()
	go func() { s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		s.stop()
		if t.Failed() {
			t.Logf("kiln serve's log:\n%s", s.log.String())
			for _, f := range s.pilotOutputs() {
				b, _ := os.ReadFile(f)
				t.Logf("%s:\n%s", filepath.Base(f), b)
			}
		}
	})
	select {
	case s.url = <-urlc:
	case <-s.done:
		t.Fatalf("kiln serve exited before serving (%v):\n%s", s.cmd.ProcessState, s.log.String())
	case <-time.After(2 * time.Minute):
		t.Fatalf("kiln serve did not start serving in 2 minutes:\n%s", s.log.String())
	}
	tok, err := os.ReadFile(filepath.Join(state, TokenFile))
	if err != nil {
		t.Fatal(err)
	}
	s.token = strings.TrimSpace(string(tok))
	s.c = newClient(t, s.url, s.token)
	return s
}

// stop interrupts kiln serve (which cancels its blocks) and waits for it.
func (s *slurmServe) stop() {
	select {
	case <-s.done:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-s.done:
	case <-time.After(time.Minute):
		s.cmd.Process.Kill()
		<-s.done
	}
}

func (s *slurmServe) pilotOutputs() []string {
	m, _ := filepath.Glob(filepath.Join(s.state, "slurm", "pilot-*.out"))
	return m
}

func (s *slurmServe) workers() apitype.WorkerList {
	var l apitype.WorkerList
	s.c.json("GET", "/v1/workers", nil, 200, &l)
	return l
}

// jobIDs are the Slurm job ids of the endpoint's blocks so far.
func (s *slurmServe) jobIDs() []string {
	var ids []string
	for _, f := range s.pilotOutputs() {
		ids = append(ids, strings.TrimSuffix(strings.TrimPrefix(filepath.Base(f), "pilot-"), ".out"))
	}
	return ids
}

// squeue returns the ids of the kiln pilot jobs Slurm lists as pending or running.
func squeuePilots(t testing.TB) []string {
	t.Helper()
	out, err := exec.Command("squeue", "--noheader", "--name="+"kiln-pilot", "--states=PENDING,RUNNING,CONFIGURING,COMPLETING", "--format=%i").Output()
	if err != nil {
		t.Fatalf("squeue: %v", err)
	}
	return strings.Fields(string(out))
}

// ours keeps the ids of jobs that belong to s.
func (s *slurmServe) ours(ids []string) []string {
	mine := s.jobIDs()
	return slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return !slices.Contains(mine, id) })
}

// register puts a Python function with the numpy image.
func (s *slurmServe) register(source, entry string, timeoutS, retries int) string {
	var fv apitype.FunctionView
	s.c.json("POST", "/v1/functions", map[string]any{"name": entry, "source": source, "function": entry, "image": "numpy",
		"timeout": timeoutS, "max_retries": retries}, 201, &fv)
	return fv.ID
}

func (s *slurmServe) submit(fnID string, args string) string {
	var sub apitype.SubmitResponse
	s.c.json("POST", "/v1/tasks", fmt.Sprintf(`{"function_id": %q, "args": {"enc": "json", "data": %s}}`, fnID, args), 202, &sub)
	return sub.TaskID
}

func (s *slurmServe) task(id string) apitype.TaskView {
	var tv apitype.TaskView
	s.c.json("GET", "/v1/tasks/"+id, nil, 200, &tv)
	return tv
}

// waitTask waits for task id to finish.
func (s *slurmServe) waitTask(id string, within time.Duration) apitype.TaskView {
	s.t.Helper()
	var tv apitype.TaskView
	testutil.WaitFor(s.t, within, "task "+id+" finishing", func() bool {
		s.c.json("GET", "/v1/tasks/"+id+"?wait=5s", nil, 200, &tv)
		return apitype.Finished(tv.State)
	})
	return tv
}

// TestSlurm runs an SDK client's 200 tasks, a numpy function, a raise and
// a timeout through workers in Slurm pilot jobs (max_blocks = 2): squeue
// shows the pilots while they run, every result is right, every task ran
// once, on a worker the record names, and the idle blocks are cancelled
// after max_idle.
func TestSlurm(t *testing.T) {
	s := startSlurmServe(t, "max_blocks = 2\nmax_idle = 3\n")
	cmd, sc := startClientScript(t, "slurm_client.py", s.url, s.token, "numpy")
	if !sc.Scan() || sc.Text() != "submitted" {
		cmd.Wait()
		t.Fatalf("client's first line = %q, want submitted", sc.Text())
	}
	// While the tasks run, squeue lists the endpoint's pilots.
	var seen []string
	testutil.WaitFor(t, 5*time.Minute, "squeue listing a kiln pilot job", func() bool {
		seen = s.ours(squeuePilots(t))
		return len(seen) > 0
	})
	var got struct {
		SquaresOK bool     `json:"squares_ok"`
		TaskIDs   []string `json:"task_ids"`
		Norm      float64  `json:"norm"`
		KeyError  string   `json:"key_error"`
		Timeout   string   `json:"timeout"`
	}
	if !sc.Scan() {
		cmd.Wait()
		t.Fatal("the client printed no result")
	}
	if err := json.Unmarshal(sc.Bytes(), &got); err != nil {
		t.Fatalf("client result %q: %v", sc.Text(), err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("client: %v", err)
	}
	if !got.SquaresOK || len(got.TaskIDs) != 200 {
		t.Errorf("200 squares through Slurm workers: ok = %v with %d tasks, want true with 200", got.SquaresOK, len(got.TaskIDs))
	}
	if got.Norm != 3.7416573867739413 {
		t.Errorf("numpy norm(arange(4)) = %v, want 3.7416573867739413", got.Norm)
	}
	if got.KeyError != "KeyError, RemoteError=True" {
		t.Errorf("a raised KeyError arrived as %q, want KeyError, RemoteError=True", got.KeyError)
	}
	if got.Timeout != "timeout" {
		t.Errorf("a task past its timeout failed with code %q, want timeout", got.Timeout)
	}

	// Every task ran exactly once, on a worker of one of the blocks.
	st, err := OpenStore(filepath.Join(s.state, DBFile))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	recs, err := st.TasksByID(context.Background(), got.TaskIDs)
	if err != nil {
		t.Fatal(err)
	}
	where := map[string]int{}
	for _, id := range got.TaskIDs {
		r := recs[id]
		if r == nil || r.State != apitype.StateSucceeded || r.Attempts != 1 || r.Completions != 1 {
			t.Fatalf("task %s = %+v, want succeeded after 1 attempt and 1 completion", id, r)
		}
		if !regexp.MustCompile(`^\S+ \(Slurm job \d+, block b\d+\)$`).MatchString(r.Worker) {
			t.Fatalf("task %s ran on %q, want node (Slurm job N, block bN)", id, r.Worker)
		}
		where[r.Worker]++
	}
	t.Logf("pilots seen in squeue: %v; tasks by worker: %v", seen, where)

	// Idle blocks are cancelled after max_idle (3 s, polled every 5 s).
	// The metrics count the ended blocks by final state.
	want := fmt.Sprintf(`kiln_blocks{state="cancelled"} %d`, len(s.jobIDs()))
	var metrics string
	testutil.WaitFor(t, time.Minute, "the idle blocks being cancelled", func() bool {
		_, b, _ := s.c.do("GET", "/metrics", nil)
		metrics = string(b)
		return len(s.ours(squeuePilots(t))) == 0 && strings.Contains(metrics, want)
	})
	if !strings.Contains(metrics, `kiln_blocks{state="running"} 0`) {
		t.Errorf("metrics after max_idle:\n%s\nwant kiln_blocks{state=\"running\"} 0", metrics)
	}
}

const sleeperSource = "import time\n\ndef nap(s):\n    time.sleep(s)\n    return s\n"

// submitNaps queues n short naps of function nap.
func (s *slurmServe) submitNaps(nap string, n int) []string {
	var ids []string
	for i := range n {
		ids = append(ids, s.submit(nap, fmt.Sprintf("[0.0%d]", i)))
	}
	return ids
}

// allSucceed waits for the tasks and checks that each succeeded.
func (s *slurmServe) allSucceed(ids []string) {
	s.t.Helper()
	for _, id := range ids {
		if tv := s.waitTask(id, 5*time.Minute); tv.State != apitype.StateSucceeded {
			s.t.Errorf("task %s = %s (%s), want succeeded", id, tv.State, tv.Error)
		}
	}
}

// runningOn waits for task id to run on a worker and returns its Slurm job id.
func (s *slurmServe) runningOn(id string) (job string, tv apitype.TaskView) {
	s.t.Helper()
	testutil.WaitFor(s.t, 5*time.Minute, "task "+id+" running on a worker", func() bool {
		tv = s.task(id)
		if apitype.Finished(tv.State) {
			s.t.Fatalf("task %s finished (%s: %s) before the test could stop its worker", id, tv.State, tv.Error)
		}
		return tv.State == apitype.StateRunning && tv.Worker != ""
	})
	m := regexp.MustCompile(`Slurm job (\d+)`).FindStringSubmatch(tv.Worker)
	if m == nil {
		s.t.Fatalf("task %s runs on %q: no Slurm job named", id, tv.Worker)
	}
	return m[1], tv
}

// TestSlurmScancel cancels a pilot with scancel while it runs a task: the
// worker drains (KILN_DRAIN_GRACE = 1s, set through worker_init), hands
// the task back, and it runs again on another block; the other tasks all
// complete.
func TestSlurmScancel(t *testing.T) {
	s := startSlurmServe(t, "max_blocks = 1\nmax_idle = 60\nworker_init = \"export KILN_DRAIN_GRACE=1s\"\n")
	nap := s.register(sleeperSource, "nap", 120, 1)
	long := s.submit(nap, "[20]")
	job, _ := s.runningOn(long)
	quick := s.submitNaps(nap, 10)
	if out, err := exec.Command("scancel", job).CombinedOutput(); err != nil {
		t.Fatalf("scancel %s: %v %s", job, err, out)
	}
	tv := s.waitTask(long, 5*time.Minute)
	if tv.State != apitype.StateSucceeded || tv.Attempts != 2 || strings.Contains(tv.Worker, "Slurm job "+job+",") {
		t.Errorf("the task whose pilot was cancelled = %s after %d attempts on %q, want succeeded after 2 attempts on another job than %s (%s)",
			tv.State, tv.Attempts, tv.Worker, job, tv.Error)
	}
	s.allSucceed(quick)
	b, _ := os.ReadFile(filepath.Join(s.state, "slurm", "pilot-"+job+".out"))
	if !strings.Contains(string(b), "worker draining") {
		t.Errorf("the cancelled pilot's output does not show the worker draining:\n%s", b)
	}
}

// TestSlurmWorkerKilled kills a worker with SIGKILL while it runs a task
// of a function with max_retries = 0: the endpoint declares the worker
// lost within apitype.WorkerLostAfter (and a scan period) and fails the
// task with worker_lost, naming the node and the Slurm job; the queued
// tasks complete on a new block.
func TestSlurmWorkerKilled(t *testing.T) {
	s := startSlurmServe(t, "max_blocks = 1\nmax_idle = 60\n")
	nap := s.register(sleeperSource, "nap", 120, 0)
	long := s.submit(nap, "[60]")
	job, _ := s.runningOn(long)
	quick := s.submitNaps(nap, 5)
	pid := workerPID(t, s.url)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	tv := s.waitTask(long, 2*time.Minute)
	took := time.Since(killed)
	want := fmt.Sprintf("(Slurm job %s, block b", job)
	if tv.State != apitype.StateFailed || tv.ErrorCode != apitype.CodeWorkerLost || !strings.Contains(tv.Error, want) || !strings.Contains(tv.Error, "localhost") {
		t.Errorf("the killed worker's task = %s %s %q, want failed worker_lost naming localhost %s…", tv.State, tv.ErrorCode, tv.Error, want)
	}
	// Detected by heartbeat: lost after WorkerLostAfter, found by a scan
	// every tenth of it, and the long poll the task's result waits on.
	if limit := apitype.WorkerLostAfter + apitype.WorkerLostAfter/10 + 5*time.Second; took > limit {
		t.Errorf("the lost worker's task failed %s after the kill, want within %s (WorkerLostAfter %s)", took, limit, apitype.WorkerLostAfter)
	}
	s.allSucceed(quick)
	lost := 0
	for _, w := range s.workers().Workers {
		if w.State == apitype.WorkerLost {
			lost++
		}
	}
	if lost != 1 {
		t.Errorf("GET /v1/workers lists %d lost workers, want 1", lost)
	}
}

// workerPID finds the kiln worker process serving url (not the srun that
// started it: its executable is kiln's).
func workerPID(t testing.TB, url string) int {
	t.Helper()
	bin := testutil.Kiln(t)
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil || exe != bin {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		args := strings.Split(string(cmdline), "\x00")
		if len(args) > 1 && args[1] == "worker" && slices.Contains(args, url) {
			return pid
		}
	}
	t.Fatalf("no kiln worker process for %s", url)
	return 0
}

// TestSlurmBadPartition: a partition the cluster does not have stops kiln
// serve at start with sbatch's own message and the key to fix.
func TestSlurmBadPartition(t *testing.T) {
	testutil.NeedSlurm(t)
	bin := testutil.Kiln(t)
	dir := t.TempDir()
	conf := filepath.Join(dir, "serve.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf("listen = \"127.0.0.1:0\"\nstate = %q\nprovider = \"slurm\"\n[slurm]\npartition = \"nosuch\"\n", filepath.Join(dir, "state"))), 0o600)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "serve", "--config", conf).CombinedOutput()
	if err == nil {
		t.Fatalf("kiln serve with partition nosuch started:\n%s", out)
	}
	for _, want := range []string{"sbatch: error:", "invalid partition", `partition = "nosuch"`} {
		if !strings.Contains(strings.ToLower(string(out)), strings.ToLower(want)) {
			t.Errorf("kiln serve with a bad partition said:\n%s\nwant it to contain %q", out, want)
		}
	}
	if ids := squeuePilots(t); len(ids) > 0 {
		// Other tests' pilots may be listed; none can be from this endpoint,
		// which never submitted.
		t.Logf("pilots listed by squeue (not this test's): %v", ids)
	}
}

// BenchmarkSlurm measures SDK-style tasks through Slurm pilots on this
// machine's one-node cluster, with 1 and with 2 pilots (one worker slot
// each), for a no-op and a numpy task: the time from the first submit to
// the first result (pilot queue wait, worker start, VM restore included)
// and the throughput after it. Each run is a fresh endpoint with no block:
// run with -benchtime 1x.
func BenchmarkSlurm(b *testing.B) {
	const n = 200
	sources := []struct{ name, src string }{
		{"noop", "def f(i):\n    return i\n"},
		{"numpy", "import numpy as np\n\ndef f(i):\n    return float(np.linalg.norm(np.arange(100) + i))\n"},
	}
	for _, pilots := range []int{1, 2} {
		for _, fn := range sources {
			b.Run(fmt.Sprintf("pilots=%d/%s", pilots, fn.name), func(b *testing.B) {
				for b.Loop() {
					first, rate := slurmRun(b, pilots, fn.src, n)
					b.ReportMetric(first.Seconds(), "s-to-first-result")
					b.ReportMetric(rate, "tasks/s")
				}
			})
		}
	}
}

// slurmRun submits n tasks of src to a fresh Slurm endpoint with max_blocks
// = pilots and returns the first result's delay and the rate after it.
func slurmRun(b *testing.B, pilots int, src string, n int) (time.Duration, float64) {
	s := startSlurmServe(b, fmt.Sprintf("max_blocks = %d\nmax_idle = 60\n", pilots))
	defer s.stop()
	var fv apitype.FunctionView
	s.c.json("POST", "/v1/functions", map[string]any{"name": "f", "source": src, "function": "f", "image": "numpy"}, 201, &fv)
	tasks := make([]map[string]any, n)
	for i := range tasks {
		tasks[i] = map[string]any{"args": map[string]any{"enc": "json", "data": []int{i}}}
	}
	t0 := time.Now()
	var sub apitype.BatchResponse
	s.c.json("POST", "/v1/tasks/batch", map[string]any{"function_id": fv.ID, "tasks": tasks}, 202, &sub)
	var firstDone, lastDone time.Time
	for _, id := range sub.TaskIDs {
		var tv apitype.TaskView
		for !apitype.Finished(tv.State) {
			s.c.json("GET", "/v1/tasks/"+id+"?wait=60s", nil, 200, &tv)
		}
		if tv.State != apitype.StateSucceeded {
			b.Fatalf("task %s = %s (%s)", id, tv.State, tv.Error)
		}
		if firstDone.IsZero() || tv.FinishedAt.Before(firstDone) {
			firstDone = *tv.FinishedAt
		}
		if tv.FinishedAt.After(lastDone) {
			lastDone = *tv.FinishedAt
		}
	}
	return firstDone.Sub(t0), float64(n-1) / lastDone.Sub(firstDone).Seconds()
}
