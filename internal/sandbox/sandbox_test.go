package sandbox_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/sandbox"
	"github.com/kiln-dev/kiln/internal/snapshot"
	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
	"github.com/kiln-dev/kiln/internal/vm"
)

func TestMain(m *testing.M) { testutil.Main(m) }

func start(t *testing.T, o sandbox.Options) *sandbox.Sandbox {
	t.Helper()
	img := testutil.OpenImage(t, testimage.Numpy(t))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	sb, err := sandbox.Start(ctx, img, o)
	if err != nil {
		t.Fatalf("Start(%s) error = %v", img.Path, err)
	}
	t.Cleanup(func() { sb.Close() })
	return sb
}

func source(src, name string, args ...any) *task.Task {
	if args == nil {
		args = []any{}
	}
	a, _ := task.JSONValue(args)
	return &task.Task{Kind: task.KindSource, Source: src, Name: name, Args: &a}
}

func invoke(t *testing.T, sb *sandbox.Sandbox, tk *task.Task) (*task.Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return sb.Invoke(ctx, tk)
}

func value(t *testing.T, r *task.Result) any {
	t.Helper()
	if r.Value == nil || r.Value.Enc != task.EncJSON {
		t.Fatalf("result value = %+v, want a JSON value", r.Value)
	}
	var v any
	if err := json.Unmarshal(r.Value.Data, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestInvoke covers the function kinds and the failures that must leave the
// VM usable, all on one warm VM.
func TestInvoke(t *testing.T) {
	sb := start(t, sandbox.Options{})
	tests := []struct {
		name      string
		task      *task.Task
		wantOK    bool
		wantValue any
		wantKind  string // error kind of a failed result
		wantText  []string
	}{
		{name: "numpy by source", task: source("def f(n):\n    import numpy as np\n    return int(np.arange(n).sum())\n", "f", 10), wantOK: true, wantValue: 45.0},
		{name: "by reference", task: &task.Task{Kind: task.KindRef, Ref: "math:factorial", Args: mustJSON([]any{5})}, wantOK: true, wantValue: 120.0},
		{name: "stdout beside value", task: source("def f():\n    print('hello from the guest')\n    return 7\n", "f"), wantOK: true, wantValue: 7.0, wantText: []string{"hello from the guest"}},
		{name: "ValueError with traceback", task: source("def boom():\n    raise ValueError('bad input 42')\n", "boom"), wantKind: task.ErrorException, wantText: []string{"ValueError", "bad input 42", "line 2"}},
		{name: "syntax error", task: source("def f(:\n", "f"), wantKind: task.ErrorBadTask, wantText: []string{"SyntaxError"}},
		{name: "missing function", task: source("def f():\n    return 1\n", "nope"), wantKind: task.ErrorBadTask, wantText: []string{"nope"}},
		{name: "still usable", task: source("def f(a, b):\n    return a * b\n", "f", 6, 7), wantOK: true, wantValue: 42.0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := invoke(t, sb, tt.task)
			if err != nil {
				t.Fatalf("Invoke() error = %v", err)
			}
			if r.OK != tt.wantOK {
				t.Fatalf("Invoke().OK = %v, want %v (result %+v, error %+v)", r.OK, tt.wantOK, r, r.Error)
			}
			text := r.Stdout
			if tt.wantOK {
				if got := value(t, r); got != tt.wantValue {
					t.Errorf("Invoke() value = %v, want %v", got, tt.wantValue)
				}
			} else {
				if r.ErrorKind != tt.wantKind || r.Error == nil {
					t.Fatalf("Invoke() error kind = %q (%+v), want %q", r.ErrorKind, r.Error, tt.wantKind)
				}
				text = r.Error.Type + ": " + r.Error.Message + "\n" + r.Error.Traceback
			}
			for _, w := range tt.wantText {
				if !strings.Contains(text, w) {
					t.Errorf("Invoke() text = %q, want it to contain %q", text, w)
				}
			}
		})
	}
	if n := sb.Boots.Load(); n != 1 {
		t.Errorf("VMs booted = %d, want 1 (one warm VM for every call)", n)
	}
}

// settle gives exiting goroutines and closing fds up to 5 s to reach the
// counts fds0 and gr0 (the assertions after it check them).
func settle(fds0, gr0 int) {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		runtime.GC()
		if fds, _ := os.ReadDir("/proc/self/fd"); len(fds) <= fds0 && runtime.NumGoroutine() <= gr0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func mustJSON(v any) *task.Value {
	x, err := task.JSONValue(v)
	if err != nil {
		panic(err)
	}
	return &x
}

func TestTimeoutReplacesVM(t *testing.T) {
	sb := start(t, sandbox.Options{Timeout: 5 * time.Second})
	t0 := time.Now()
	_, err := invoke(t, sb, source("def spin():\n    while True:\n        pass\n", "spin"))
	took := time.Since(t0)
	if !errors.Is(err, sandbox.ErrTimeout) {
		t.Fatalf("Invoke(infinite loop) error = %v, want ErrTimeout", err)
	}
	if !strings.Contains(err.Error(), "timeout after 5 s") {
		t.Errorf("Invoke(infinite loop) error = %q, want it to say \"timeout after 5 s\"", err)
	}
	if took < 5*time.Second || took > 60*time.Second {
		t.Errorf("Invoke(infinite loop) took %s, want about 5 s", took)
	}
	r, err := invoke(t, sb, source("def f():\n    return 'alive'\n", "f"))
	if err != nil || !r.OK {
		t.Fatalf("Invoke after timeout = %+v, %v; want a result", r, err)
	}
	if n := sb.Boots.Load(); n != 2 {
		t.Errorf("VMs booted = %d, want 2 (the timed-out VM replaced)", n)
	}
}

func TestTooLargeAndOOM(t *testing.T) {
	sb := start(t, sandbox.Options{})
	_, err := invoke(t, sb, source("def big():\n    return 'x' * (50 << 20)\n", "big"))
	if !errors.Is(err, sandbox.ErrTooLarge) {
		t.Fatalf("Invoke(50 MiB result) error = %v, want ErrTooLarge", err)
	}
	if hwm := testutil.ProcKB(t, "/proc/self/status", "VmHWM"); hwm > 200<<20 {
		t.Errorf("host peak RSS = %d MiB, want under 200 MiB", hwm>>20)
	}
	// Far beyond the VM's memory in one go: MemoryError.
	_, err = invoke(t, sb, source("def hog():\n    return len(bytearray(64 << 30))\n", "hog"))
	if !errors.Is(err, sandbox.ErrOOM) {
		t.Fatalf("Invoke(64 GiB bytearray) error = %v, want ErrOOM", err)
	}
	// Growing until the guest kernel's OOM killer strikes.
	_, err = invoke(t, sb, source("def grow():\n    xs = []\n    while True:\n        xs.append(bytearray(16 << 20))\n", "grow"))
	if !errors.Is(err, sandbox.ErrOOM) {
		t.Fatalf("Invoke(growing allocation) error = %v, want ErrOOM", err)
	}
	r, err := invoke(t, sb, source("def f():\n    return 1\n", "f"))
	if err != nil || !r.OK {
		t.Fatalf("Invoke after OOM = %+v, %v; want a result", r, err)
	}
}

func TestGuestDeath(t *testing.T) {
	sb := start(t, sandbox.Options{})
	deaths := []struct {
		name string
		src  string
	}{
		{"os._exit", "def f():\n    import os\n    os._exit(1)\n"},
		{"poweroff", "def f():\n    import ctypes\n    ctypes.CDLL(None).sync()\n    ctypes.CDLL(None).reboot(0x4321fedc)\n"},
		{"kernel panic", "def f():\n    open('/proc/sysrq-trigger', 'w').write('c')\n"},
	}
	for _, d := range deaths {
		t.Run(d.name, func(t *testing.T) {
			t0 := time.Now()
			_, err := invoke(t, sb, source(d.src, "f"))
			if !errors.Is(err, sandbox.ErrVMDied) {
				t.Fatalf("Invoke(%s) error = %v, want ErrVMDied", d.name, err)
			}
			if took := time.Since(t0); took > 30*time.Second {
				t.Errorf("Invoke(%s) took %s to notice the death, want it prompt", d.name, took)
			}
			r, err := invoke(t, sb, source("def f():\n    return 2\n", "f"))
			if err != nil || !r.OK {
				t.Fatalf("Invoke after %s = %+v, %v; want a result", d.name, r, err)
			}
		})
	}
}

func TestRepeatNoLeaks(t *testing.T) {
	sb := start(t, sandbox.Options{})
	call := source("def f(n):\n    import numpy as np\n    return float(np.ones(n).sum())\n", "f", 100)
	if _, err := invoke(t, sb, call); err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	fds0, gr0 := testutil.CountFDs(t), runtime.NumGoroutine()
	for i := 0; i < 100; i++ {
		r, err := invoke(t, sb, call)
		if err != nil || !r.OK {
			t.Fatalf("call %d = %+v, %v", i, r, err)
		}
		if v := value(t, r); v != 100.0 {
			t.Fatalf("call %d value = %v, want 100", i, v)
		}
	}
	settle(fds0, gr0)
	if fds := testutil.CountFDs(t); fds > fds0 {
		t.Errorf("open fds after 100 calls = %d, want at most %d", fds, fds0)
	}
	if gr := runtime.NumGoroutine(); gr > gr0 {
		t.Errorf("goroutines after 100 calls = %d, want at most %d", gr, gr0)
	}
	if n := sb.Boots.Load(); n != 1 {
		t.Errorf("VMs booted = %d, want 1", n)
	}
}

func TestCloseReleasesEverything(t *testing.T) {
	img := testutil.OpenImage(t, testimage.Numpy(t))
	fds0, gr0 := testutil.CountFDs(t), runtime.NumGoroutine()
	sb, err := sandbox.Start(context.Background(), img, sandbox.Options{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := sb.Invoke(context.Background(), source("def f():\n    import time\n    time.sleep(600)\n", "f"))
		done <- err
	}()
	// Close only once the task is in the agent's hands.
	testutil.WaitFor(t, time.Minute, "the task to be in flight", func() bool { return sb.InFlight() == 1 })
	if err := sb.Close(); err != nil {
		t.Fatalf("Close() error = %v", err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, sandbox.ErrClosed) {
			t.Errorf("Invoke during Close error = %v, want ErrClosed", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Invoke did not return after Close")
	}
	if _, err := sb.Invoke(context.Background(), source("def f():\n    return 1\n", "f")); !errors.Is(err, sandbox.ErrClosed) {
		t.Errorf("Invoke after Close error = %v, want ErrClosed", err)
	}
	if err := sb.Close(); err != nil {
		t.Errorf("second Close() error = %v", err)
	}
	settle(fds0, gr0)
	if fds := testutil.CountFDs(t); fds > fds0 {
		t.Errorf("open fds after Close = %d, want at most %d", fds, fds0)
	}
	if gr := runtime.NumGoroutine(); gr > gr0 {
		t.Errorf("goroutines after Close = %d, want at most %d", gr, gr0)
	}
}

// TestGuestLimits: a fork bomb is bounded by the guest's memory and its
// processes do not outlive the task; filling the disk stops at the
// size-capped tmpfs (the image itself is read-only).
func TestGuestLimits(t *testing.T) {
	sb := start(t, sandbox.Options{Timeout: 2 * time.Minute})
	forkBomb := "def f():\n    import os, time\n    n = 0\n    while n < 5000:\n        try:\n            pid = os.fork()\n        except OSError as e:\n            return [n, e.errno]\n        if pid == 0:\n            time.sleep(3600)\n            os._exit(0)\n        n += 1\n    return [n, 0]\n"
	r, err := invoke(t, sb, source(forkBomb, "f"))
	if err != nil || !r.OK {
		t.Fatalf("Invoke(fork bomb) = %+v, %v; want a result", r, err)
	}
	var fb []int
	if err := r.Value.Decode(&fb); err != nil || len(fb) != 2 || fb[0] == 0 || fb[1] == 0 {
		t.Fatalf("fork bomb result = %s (%v), want [forks > 0, errno]", r.Value.Data, err)
	}
	// The agent's children, from every process's parent in /proc (the
	// guest kernel need not have /proc/PID/task/TID/children).
	children := "def f():\n    import os\n    me, kids = str(os.getpid()), []\n    for p in os.listdir('/proc'):\n        if p.isdigit():\n" +
		"            try:\n                st = open('/proc/%s/stat' % p).read()\n            except OSError:\n                continue\n" +
		"            if st[st.rfind(')') + 2:].split()[1] == me:\n                kids.append(int(p))\n    return kids\n"
	r, err = invoke(t, sb, source(children, "f"))
	if err != nil || !r.OK {
		t.Fatalf("Invoke after fork bomb = %+v (%+v), %v", r, r.Error, err)
	}
	if string(r.Value.Data) != "[]" {
		t.Errorf("agent children after the fork bomb = %s, want none left", r.Value.Data)
	}
	fill := "def f():\n    import os\n    n = 0\n    try:\n        with open('/tmp/fill', 'wb') as fh:\n            while True:\n                fh.write(b'x' * (1 << 20))\n                n += 1\n    except OSError as e:\n        os.remove('/tmp/fill')\n        try:\n            open('/usr/lib/kiln/new', 'w')\n        except OSError as e2:\n            return [e.errno, n, e2.errno]\n    return [0, n, 0]\n"
	r, err = invoke(t, sb, source(fill, "f"))
	if err != nil || !r.OK {
		t.Fatalf("Invoke(fill /tmp) = %+v, %v", r, err)
	}
	var fl []int
	if err := r.Value.Decode(&fl); err != nil || len(fl) != 3 {
		t.Fatalf("fill result = %s (%v)", r.Value.Data, err)
	}
	if fl[0] != 28 || fl[1] > 256 || fl[2] != 30 {
		t.Errorf("fill /tmp = errno %d after %d MiB, image write errno %d; want ENOSPC (28) within the tmpfs cap, and EROFS (30)", fl[0], fl[1], fl[2])
	}
}

// TestStoppedVMM: a VMM that stops answering (SIGSTOP) is caught by the task
// timeout, killed and replaced.
func TestStoppedVMM(t *testing.T) {
	sb := start(t, sandbox.Options{Timeout: 5 * time.Second})
	pid := sb.VMPid()
	if pid == 0 {
		t.Fatal("VMPid() = 0 for a started sandbox")
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	_, err := invoke(t, sb, source("def f():\n    return 1\n", "f"))
	if !errors.Is(err, sandbox.ErrTimeout) {
		t.Fatalf("Invoke on a stopped VMM error = %v, want ErrTimeout", err)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		if st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); !strings.Contains(string(st), ") Z ") {
			t.Errorf("stopped VMM %d still exists after the timeout", pid)
		}
	}
	r, err := invoke(t, sb, source("def f():\n    return 2\n", "f"))
	if err != nil || !r.OK {
		t.Fatalf("Invoke after the stopped VMM = %+v, %v", r, err)
	}
}

// TestProcessesAndStreams: multiprocessing.Pool(4) over numpy works in a
// default 512 MiB VM (the overcommit policy and /dev/shm allow it, while
// TestTooLargeAndOOM keeps big allocations failing fast), a command gets
// its stdin with an end, and a task's output streams while it runs.
func TestProcessesAndStreams(t *testing.T) {
	sb := start(t, sandbox.Options{Timeout: 2 * time.Minute})
	pool := "def g(n):\n    import numpy as np\n    return float(np.arange(n).sum())\n\ndef f():\n    import multiprocessing as mp\n    with mp.Pool(4) as p:\n        return p.map(g, [10, 100, 1000, 10000])\n"
	r, err := invoke(t, sb, source(pool, "f"))
	if err != nil || !r.OK {
		t.Fatalf("Pool(4) task = %+v (%+v), %v", r, r.Error, err)
	}
	if string(r.Value.Data) != "[45.0,4950.0,499500.0,49995000.0]" && string(r.Value.Data) != "[45.0, 4950.0, 499500.0, 49995000.0]" {
		t.Errorf("Pool(4).map = %s, want [45.0, 4950.0, 499500.0, 49995000.0]", r.Value.Data)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, errb bytes.Buffer
	code, err := sb.Run(ctx, []string{"python3", "-c", "import sys; d = sys.stdin.read(); print(len(d.split())); sys.exit(4)"}, nil,
		sandbox.Streams{Stdin: strings.NewReader("a\nb\nc\n"), Stdout: &out, Stderr: &errb})
	if err != nil || code != 4 || out.String() != "3\n" {
		t.Errorf("Run(stdin a b c) = %d, %v, stdout %q (stderr %q); want 4, nil, \"3\\n\"", code, err, out.String(), errb.String())
	}

	// Streamed output arrives before the result, in order.
	var streamed testutil.LockedBuffer
	r, err = sb.InvokeStreams(ctx, source("def f():\n    for i in range(3):\n        print('line', i, flush=True)\n    return 'done'\n", "f"), sandbox.Streams{Stdout: &streamed})
	if err != nil || !r.OK {
		t.Fatalf("InvokeStreams = %+v, %v", r, err)
	}
	if want := "line 0\nline 1\nline 2\n"; streamed.String() != want || r.Stdout != want {
		t.Errorf("streamed %q and captured %q, want %q both", streamed.String(), r.Stdout, want)
	}
}

// TestEscapedProcess: a process a task daemonized (double fork, new
// session) is killed when the task ends, and nothing it writes reaches a
// later task's output.
func TestEscapedProcess(t *testing.T) {
	sb := start(t, sandbox.Options{Timeout: 2 * time.Minute})
	daemon := "def f():\n    import os, time\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n" +
		"            while True:\n                os.write(1, b'leak\\n')\n                time.sleep(0.01)\n        os._exit(0)\n" +
		"    os.wait()\n    time.sleep(0.2)\n    return 'started'\n"
	if r, err := invoke(t, sb, source(daemon, "f")); err != nil || !r.OK || !strings.Contains(r.Stdout, "leak") {
		t.Fatalf("daemon task = %+v, %v; want ok with the daemon's output", r, err)
	}
	for i := 0; i < 3; i++ {
		r, err := invoke(t, sb, source("def f():\n    import time\n    print('clean')\n    time.sleep(0.2)\n    return 1\n", "f"))
		if err != nil || !r.OK || r.Stdout != "clean\n" {
			t.Fatalf("task %d after the daemon: stdout %q (%+v, %v), want \"clean\\n\"", i, r.Stdout, r, err)
		}
	}
}

// TestInvokeEach: tasks sent ahead run in order with their own results; a
// crash ends the stream, the tasks sent ahead are ErrNotRun, and the next
// call runs on a new VM.
func TestInvokeEach(t *testing.T) {
	sb := start(t, sandbox.Options{Timeout: 2 * time.Minute})
	src := "def f(x):\n    import os\n    if x == 3:\n        os._exit(7)\n    return x * x\n"
	mk := func(x int) *task.Task {
		tk := source(src, "f", x)
		tk.CacheKey = "fn-square"
		return tk
	}
	run := func(xs ...int) []string {
		var out []string
		i := 0
		next := func() *task.Task {
			if i == len(xs) {
				return nil
			}
			i++
			return mk(xs[i-1])
		}
		done := func(tk *task.Task, res *task.Result, err error) {
			switch {
			case errors.Is(err, sandbox.ErrNotRun):
				out = append(out, "not run")
			case err != nil:
				out = append(out, string(sandbox.KindOf(err)))
			default:
				out = append(out, string(res.Value.Data))
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		sb.InvokeEach(ctx, 0, next, done)
		return out
	}
	if got, want := run(0, 1, 2, 4, 5), []string{"0", "1", "4", "16", "25"}; !cmp.Equal(got, want) {
		t.Errorf("InvokeEach(0, 1, 2, 4, 5) = %q, want %q", got, want)
	}
	// 4 and 5 were sent ahead (the window holds them all): neither ran.
	if got, want := run(1, 3, 4, 5), []string{"1", string(sandbox.KindVMDied), "not run", "not run"}; !cmp.Equal(got, want) {
		t.Errorf("InvokeEach(1, 3 crashes, 4, 5) = %q, want %q", got, want)
	}
	if got, want := run(6), []string{"36"}; !cmp.Equal(got, want) {
		t.Errorf("InvokeEach(6) after the crash = %q, want %q", got, want)
	}
}

// TestPreloadFailsSnapshot: a preload module the guest cannot import fails
// the snapshot's creation with the module and its ImportError, never
// silently.
func TestPreloadFailsSnapshot(t *testing.T) {
	img := testutil.OpenImage(t, testimage.Numpy(t))
	st, err := snapshot.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	_, err = sandbox.Start(context.Background(), img, sandbox.Options{Store: st, Preload: []string{"json", "nosuchmodule_kiln"}})
	if !errors.Is(err, sandbox.ErrStart) || !strings.Contains(err.Error(), "nosuchmodule_kiln: ModuleNotFoundError") {
		t.Fatalf("Start(preload nosuchmodule_kiln) = %v, want ErrStart naming the module and its ImportError", err)
	}
	if entries, _ := st.List(); len(entries) != 0 {
		t.Errorf("store holds %d snapshots after the failed creation, want none", len(entries))
	}
}

// TestVolumesRestored: VMs restored from one snapshot mount the volumes
// each sandbox asks for (the snapshot was taken with none mounted, and
// its key does not depend on them), commands and functions read and
// write them, and a VM with volumes mounted refuses to be checkpointed.
func TestVolumesRestored(t *testing.T) {
	img := testutil.OpenImage(t, testimage.Numpy(t))
	st, err := snapshot.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for i := range 2 {
		in, out := t.TempDir(), t.TempDir()
		want := fmt.Sprintf("row,%d\n", i)
		if err := os.WriteFile(filepath.Join(in, "x.csv"), []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
		vols := []vm.Volume{{Host: in, Guest: "/data", ReadOnly: true}, {Host: out, Guest: "/results"}}
		k0, err0 := vm.SnapshotKey(ctx, vm.Config{Image: img}, img.Manifest.Preload)
		k1, err1 := vm.SnapshotKey(ctx, vm.Config{Image: img, Volumes: vols}, img.Manifest.Preload)
		if err0 != nil || err1 != nil || !k0.Equal(k1) {
			t.Fatalf("SnapshotKey without volumes = %v, %v; with = %v, %v; want one key", k0, err0, k1, err1)
		}
		sb, err := sandbox.Start(ctx, img, sandbox.Options{Store: st, VM: vm.Config{Volumes: vols}})
		if err != nil {
			t.Fatalf("sandbox %d: Start() = %v", i, err)
		}
		defer sb.Close()
		if sb.Restores.Load() != 1 || (i > 0 && sb.SnapshotsCreated.Load() != 0) {
			t.Errorf("sandbox %d: Restores = %d, SnapshotsCreated = %d; want 1 restore of the one snapshot", i, sb.Restores.Load(), sb.SnapshotsCreated.Load())
		}
		var stdout, stderr bytes.Buffer
		code, err := sb.Run(ctx, []string{"python3", "-c", "print(open('/data/x.csv').read(), end=''); open('/results/r.txt', 'w').write('run')"}, nil, sandbox.Streams{Stdout: &stdout, Stderr: &stderr})
		if err != nil || code != 0 || stdout.String() != want {
			t.Errorf("sandbox %d: Run(read /data/x.csv) = %d, %v, stdout %q (stderr %q); want 0, nil, %q", i, code, err, stdout.String(), stderr.String(), want)
		}
		r, err := invoke(t, sb, source("def f():\n    open('/results/f.txt', 'w').write('function')\n    return open('/data/x.csv').read()\n", "f"))
		if err != nil || !r.OK || value(t, r) != want {
			t.Errorf("sandbox %d: Invoke(read /data/x.csv) = %+v, %v; want %q", i, r, err, want)
		}
		for name, content := range map[string]string{"r.txt": "run", "f.txt": "function"} {
			if b, err := os.ReadFile(filepath.Join(out, name)); err != nil || string(b) != content {
				t.Errorf("sandbox %d: host file %s = %q, %v; want %q", i, name, b, err, content)
			}
		}
		if err := sb.Checkpoint(ctx, t.TempDir()); err == nil || !strings.Contains(err.Error(), "volumes mounted") {
			t.Errorf("sandbox %d: Checkpoint() with volumes = %v, want an error saying volumes are mounted", i, err)
		}
		sb.Close()
	}
	// A volume the guest cannot mount fails the start with the guest's
	// reason, and the snapshot, which is not to blame, stays.
	_, err = sandbox.Start(ctx, img, sandbox.Options{Store: st, VM: vm.Config{Volumes: []vm.Volume{{Host: t.TempDir(), Guest: "/home/x"}}}})
	if want := "the image is read-only there"; err == nil || !errors.Is(err, sandbox.ErrStart) || !strings.Contains(err.Error(), want) {
		t.Errorf("Start() with a volume at /home/x = %v, want ErrStart containing %q", err, want)
	}
	if l, err := st.List(); err != nil || len(l) != 1 {
		t.Errorf("snapshots after a failed mount = %d, %v; want the 1 snapshot kept", len(l), err)
	}
}
