package sandbox_test

// Benchmarks for docs/BENCHMARKS.md. They print their own tables (each row
// measured side by side in one run, rows interleaved) and report the
// headline numbers as metrics. Run them with, for example:
//
//	go test -run '^$' -bench . -benchtime 1x -timeout 60m ./internal/sandbox/

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/sandbox"
	"github.com/kiln-dev/kiln/internal/snapshot"
	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// preloadSpec is the numpy image with numpy imported before snapshots.
const preloadSpec = testutil.NumpySpec + `preload = ["numpy"]
`

const numpyFn = "def f(n):\n    import numpy as np\n    return float(np.arange(n).sum())\n"

// hostPython is the same job as numpyFn in a fresh host process.
var hostPython = []string{"/usr/bin/python3", "-c", "import numpy as np; print(float(np.arange(100).sum()))"}

func quantile(d []time.Duration, q float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1)+0.5)]
}

func row(b *testing.B, name string, d []time.Duration) {
	benchf("| %-34s | %3d | %8.3f | %8.3f | %8.3f | %8.3f |", name, len(d),
		quantile(d, 0).Seconds(), quantile(d, 0.5).Seconds(), quantile(d, 0.9).Seconds(), quantile(d, 1).Seconds())
}

func header(b *testing.B, what string) {
	acc, _ := vmm.DetectAccel()
	host, _ := os.Hostname()
	benchf("%s — accel %s, host %s, %d CPUs", what, acc, host, numCPU())
	benchf("| %-34s | %3s | %8s | %8s | %8s | %8s |", "row", "n", "min s", "p50 s", "p90 s", "max s")
}

func numCPU() int {
	out, _ := exec.Command("nproc").Output()
	n, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	return n
}

// BenchmarkColdStart compares, interleaved: a cold boot → first result, a
// snapshot restore → first result (same image, numpy preloaded), and a
// plain host python3 process importing numpy and computing the same value.
func BenchmarkColdStart(b *testing.B) {
	img := testutil.Image(b, preloadSpec)
	st, err := snapshot.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	call := source(numpyFn, "f", 100)
	first := func(o sandbox.Options) time.Duration {
		t0 := time.Now()
		sb, err := sandbox.Start(context.Background(), img, o)
		if err != nil {
			b.Fatal(err)
		}
		defer sb.Close()
		r, err := sb.Invoke(context.Background(), call)
		if err != nil || !r.OK {
			b.Fatalf("Invoke = %+v, %v", r, err)
		}
		return time.Since(t0)
	}
	// Create the snapshot outside the measurement.
	first(sandbox.Options{Store: st})
	runs := 10
	if v, err := strconv.Atoi(os.Getenv("KILN_BENCH_RUNS")); err == nil && v > 0 {
		runs = v
	}
	var cold, restore, host []time.Duration
	for i := 0; i < runs; i++ {
		cold = append(cold, first(sandbox.Options{Snapshots: sandbox.SnapshotOff}))
		restore = append(restore, first(sandbox.Options{Store: st, Snapshots: sandbox.SnapshotUse}))
		t0 := time.Now()
		if out, err := exec.Command(hostPython[0], hostPython[1:]...).CombinedOutput(); err != nil {
			b.Fatalf("host python3: %v: %s", err, out)
		}
		host = append(host, time.Since(t0))
	}
	header(b, "cold start → first numpy result")
	row(b, "kiln cold boot → first result", cold)
	row(b, "kiln snapshot restore → first result", restore)
	row(b, "host python3 process (import numpy)", host)
	c50, r50, h50 := quantile(cold, .5), quantile(restore, .5), quantile(host, .5)
	benchf("cold/restore p50 = %.1f×, restore/host p50 = %.2f×", c50.Seconds()/r50.Seconds(), r50.Seconds()/h50.Seconds())
	b.ReportMetric(c50.Seconds(), "cold-p50-s")
	b.ReportMetric(r50.Seconds(), "restore-p50-s")
	b.ReportMetric(h50.Seconds(), "host-p50-s")
}

// BenchmarkClonePSS restores 10 clones side by side and reports each QEMU
// process's PSS, against a cold-booted VM of the same image doing the same
// work.
func BenchmarkClonePSS(b *testing.B) {
	img := testutil.Image(b, preloadSpec)
	st, err := snapshot.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	call := source(numpyFn, "f", 100)
	start := func(o sandbox.Options) *sandbox.Sandbox {
		sb, err := sandbox.Start(context.Background(), img, o)
		if err != nil {
			b.Fatal(err)
		}
		if r, err := sb.Invoke(context.Background(), call); err != nil || !r.OK {
			b.Fatalf("Invoke = %+v, %v", r, err)
		}
		return sb
	}
	start(sandbox.Options{Store: st}).Close()
	cold := start(sandbox.Options{Snapshots: sandbox.SnapshotOff})
	coldPSS := testutil.ProcKB(b, fmt.Sprintf("/proc/%d/smaps_rollup", cold.VMPid()), "Pss")
	cold.Close()
	var clones []*sandbox.Sandbox
	defer func() {
		for _, c := range clones {
			c.Close()
		}
	}()
	for i := 0; i < 10; i++ {
		clones = append(clones, start(sandbox.Options{Store: st, Snapshots: sandbox.SnapshotUse}))
	}
	time.Sleep(time.Second)
	var total int64
	benchf("PSS of QEMU processes (numpy imported, one call served), accel and host as above")
	benchf("cold-booted VM: %d MiB", coldPSS>>20)
	for i, c := range clones {
		p := testutil.ProcKB(b, fmt.Sprintf("/proc/%d/smaps_rollup", c.VMPid()), "Pss")
		total += p
		benchf("clone %2d: %d MiB", i+1, p>>20)
	}
	avg := total / int64(len(clones))
	benchf("10 clones: %d MiB in all, %d MiB each on average = %.2f of a cold-booted VM", total>>20, avg>>20, float64(avg)/float64(coldPSS))
	b.ReportMetric(float64(coldPSS>>20), "cold-MiB")
	b.ReportMetric(float64(avg>>20), "clone-avg-MiB")
}

// BenchmarkWarmInvoke measures warm calls on one VM against the same
// function run by a plain python3 process on the host (a new process per
// call, and a call inside one warm host process).
func BenchmarkWarmInvoke(b *testing.B) {
	img := testutil.Image(b, preloadSpec)
	sb, err := sandbox.Start(context.Background(), img, sandbox.Options{Snapshots: sandbox.SnapshotOff})
	if err != nil {
		b.Fatal(err)
	}
	defer sb.Close()
	noop := source("def f():\n    return None\n", "f")
	np := source(numpyFn, "f", 100)
	n := 100
	var kNoop, kNp, hNoop, hNp []time.Duration
	for i := 0; i < n; i++ {
		for _, c := range []struct {
			t   *task.Task
			out *[]time.Duration
		}{{noop, &kNoop}, {np, &kNp}} {
			t0 := time.Now()
			if r, err := sb.Invoke(context.Background(), c.t); err != nil || !r.OK {
				b.Fatalf("Invoke = %+v, %v", r, err)
			}
			*c.out = append(*c.out, time.Since(t0))
		}
		if i%10 == 0 { // host processes are slow: sample every tenth round
			for _, c := range []struct {
				code string
				out  *[]time.Duration
			}{{"pass", &hNoop}, {"import numpy as np; float(np.arange(100).sum())", &hNp}} {
				t0 := time.Now()
				if out, err := exec.Command("/usr/bin/python3", "-c", c.code).CombinedOutput(); err != nil {
					b.Fatalf("host python3: %v: %s", err, out)
				}
				*c.out = append(*c.out, time.Since(t0))
			}
		}
	}
	// A warm host process calling the same function n times.
	script := fmt.Sprintf("import time, json\nimport numpy as np\ndef noop(): return None\ndef f(n): return float(np.arange(n).sum())\nfor fn, a in ((noop, ()), (f, (100,))):\n    ts=[]\n    for i in range(%d):\n        t=time.perf_counter(); fn(*a); ts.append(time.perf_counter()-t)\n    ts.sort(); print(ts[len(ts)//2])\n", n)
	out, err := exec.Command("/usr/bin/python3", "-c", script).Output()
	if err != nil {
		b.Fatal(err)
	}
	header(b, "warm invocation latency")
	row(b, "kiln warm VM: no-op", kNoop)
	row(b, "kiln warm VM: numpy sum(arange(100))", kNp)
	row(b, "host python3 process: no-op", hNoop)
	row(b, "host python3 process: numpy", hNp)
	benchf("in one warm host python3 process, median call: no-op / numpy = %s s", strings.Join(strings.Fields(string(out)), " / "))
	b.ReportMetric(quantile(kNoop, .5).Seconds()*1000, "noop-p50-ms")
	b.ReportMetric(quantile(kNp, .5).Seconds()*1000, "numpy-p50-ms")
}

// benchf prints a line of a benchmark's report to stdout (b.Logf output of
// benchmarks is cut after a few lines).
func benchf(format string, args ...any) {
	fmt.Printf(format+"\n", args...)
}
