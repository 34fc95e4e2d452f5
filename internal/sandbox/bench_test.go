package sandbox_test

// Benchmarks of the sandbox's hot paths, one operation per b.Loop
// iteration. The side-by-side comparisons with a host python3 process
// (tables, interleaved rounds) are kiln bench experiments: kiln bench
// coldstart, kiln bench invoke. Run these with, for example:
//
//	go test -run '^$' -bench . -benchtime 10x -timeout 60m ./internal/sandbox/

import (
	"context"
	"fmt"
	"testing"

	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/sandbox"
	"github.com/kiln-dev/kiln/internal/snapshot"
	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
)

// preloadSpec is the numpy image with numpy imported before snapshots.
const preloadSpec = testimage.NumpySpec + `preload = ["numpy"]
`

const numpyFn = "def f(n):\n    import numpy as np\n    return float(np.arange(n).sum())\n"

// startFirst starts a sandbox and runs its first call: a cold start as a
// caller sees it.
func startFirst(b *testing.B, o sandbox.Options, call *task.Task) *sandbox.Sandbox {
	b.Helper()
	sb, err := sandbox.Start(context.Background(), testutil.OpenImage(b, testimage.Image(b, preloadSpec)), o)
	if err != nil {
		b.Fatal(err)
	}
	if r, err := sb.Invoke(context.Background(), call); err != nil || !r.OK {
		sb.Close()
		b.Fatalf("Invoke = %+v, %v", r, err)
	}
	return sb
}

func privateStore(b *testing.B) *snapshot.Store {
	st, err := snapshot.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	return st
}

// BenchmarkStart: start → first numpy result, by cold boot and by restore
// from a snapshot (created before the timer starts).
func BenchmarkStart(b *testing.B) {
	call := source(numpyFn, "f", 100)
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			startFirst(b, sandbox.Options{Snapshots: sandbox.SnapshotOff}, call).Close()
		}
	})
	b.Run("restore", func(b *testing.B) {
		st := privateStore(b)
		startFirst(b, sandbox.Options{Store: st}, call).Close()
		for b.Loop() {
			startFirst(b, sandbox.Options{Store: st, Snapshots: sandbox.SnapshotUse}, call).Close()
		}
	})
}

// BenchmarkWarmInvoke: one call on a warm VM.
func BenchmarkWarmInvoke(b *testing.B) {
	for _, c := range []struct {
		name string
		task *task.Task
	}{
		{"noop", source("def f():\n    return None\n", "f")},
		{"numpy", source(numpyFn, "f", 100)},
	} {
		b.Run(c.name, func(b *testing.B) {
			sb := startFirst(b, sandbox.Options{Snapshots: sandbox.SnapshotOff}, c.task)
			defer sb.Close()
			for b.Loop() {
				if r, err := sb.Invoke(context.Background(), c.task); err != nil || !r.OK {
					b.Fatalf("Invoke = %+v, %v", r, err)
				}
			}
		})
	}
}

// BenchmarkClonePSS restores one clone per iteration, keeping every clone
// alive, and reports their average PSS: what each more clone of one
// snapshot costs in host memory.
func BenchmarkClonePSS(b *testing.B) {
	call := source(numpyFn, "f", 100)
	st := privateStore(b)
	startFirst(b, sandbox.Options{Store: st}, call).Close()
	var clones []*sandbox.Sandbox
	defer func() {
		for _, c := range clones {
			c.Close()
		}
	}()
	for b.Loop() {
		clones = append(clones, startFirst(b, sandbox.Options{Store: st, Snapshots: sandbox.SnapshotUse}, call))
	}
	var total int64
	for _, c := range clones {
		total += testutil.ProcKB(b, fmt.Sprintf("/proc/%d/smaps_rollup", c.VMPid()), "Pss")
	}
	b.ReportMetric(float64(total)/float64(len(clones))/(1<<20), "PSS-MiB/clone")
}

// BenchmarkInvokeEach: a stream of no-op tasks on one warm VM, cold-booted
// or restored from a snapshot, through InvokeEach, the endpoint's path
// (batched for agents that take Tasks frames); it reports tasks per second.
func BenchmarkInvokeEach(b *testing.B) {
	call := source("def f():\n    return None\n", "f")
	call.CacheKey = "noop"
	b.Run("cold", func(b *testing.B) {
		sb := startFirst(b, sandbox.Options{Snapshots: sandbox.SnapshotOff}, call)
		defer sb.Close()
		invokeEach(b, sb, call)
	})
	b.Run("restored", func(b *testing.B) {
		st := privateStore(b)
		startFirst(b, sandbox.Options{Store: st}, call).Close()
		sb := startFirst(b, sandbox.Options{Store: st, Snapshots: sandbox.SnapshotUse}, call)
		defer sb.Close()
		invokeEach(b, sb, call)
	})
}

func invokeEach(b *testing.B, sb *sandbox.Sandbox, call *task.Task) {
	const perLoop = 1000
	n := 0
	for b.Loop() {
		sent := 0
		sb.InvokeEach(context.Background(), 0, func() *task.Task {
			if sent == perLoop {
				return nil
			}
			sent++
			return call
		}, func(_ *task.Task, r *task.Result, err error) {
			if err != nil || !r.OK {
				b.Fatalf("InvokeEach: result %+v, error %v; want ok", r, err)
			}
		})
		n += perLoop
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "tasks/s")
}
