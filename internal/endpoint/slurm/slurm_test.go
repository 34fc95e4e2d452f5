package slurm

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/testutil"
)

// These tests submit real jobs to the Slurm cluster on this machine
// (scripts/slurm-dev.sh start; .ci/run starts it). A pilot waits for
// SIGTERM, as kiln worker does, and says which block it is first.
var pilot = []string{"bash", "-c", `echo "block=$KILN_BLOCK_ID job=$SLURM_JOB_ID"; exec sleep 300`}

const waitJob = 60 * time.Second // a free one-node cluster starts a job within a second or two

func newProvider(t *testing.T, cfg Config, cmds Commands) *Provider {
	t.Helper()
	p, err := New(cfg, Options{StateDir: t.TempDir(), WorkerCommand: pilot, Token: "t0k3n",
		Log: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})), Commands: cmds})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		// A failed test must not leave its jobs behind on the cluster.
		if bs := p.Blocks(); len(bs) > 0 {
			p.Cancel(context.Background(), bs...)
		}
		p.Close()
	})
	return p
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// poll calls Status until every block satisfies ok.
func poll(t *testing.T, p *Provider, what string, ok func(Block) bool) []Block {
	t.Helper()
	var last []Block
	testutil.WaitFor(t, waitJob, what, func() bool {
		bs, err := p.Status(context.Background())
		if err != nil {
			t.Fatalf("Status: %v", err)
		}
		last = bs
		for _, b := range bs {
			if !ok(b) {
				return false
			}
		}
		return len(bs) > 0
	})
	return last
}

func TestCheck(t *testing.T) {
	testutil.NeedSlurm(t)
	ctx := context.Background()
	if err := newProvider(t, Config{}, Commands{}).Check(ctx); err != nil {
		t.Errorf("Check(default partition) = %v, want nil", err)
	}

	p := newProvider(t, Config{Partition: "nosuch"}, Commands{})
	err := p.Check(ctx)
	if err == nil {
		t.Fatal(`Check(partition "nosuch") = nil, want sbatch's error`)
	}
	msg := err.Error()
	for _, want := range []string{"sbatch --test-only", "nvalid partition", `fix partition = "nosuch" in the [slurm] table of serve.toml`, "sinfo"} {
		if !strings.Contains(msg, want) {
			t.Errorf("Check(partition \"nosuch\") = %q, want it to contain %q", msg, want)
		}
	}
	_, err = p.Submit(ctx)
	if err == nil || !strings.Contains(err.Error(), "nvalid partition") || !strings.Contains(err.Error(), `fix partition = "nosuch"`) {
		t.Errorf(`Submit(partition "nosuch") = %v, want sbatch's message and the key to fix`, err)
	}
	if bs := p.Blocks(); len(bs) != 0 {
		t.Errorf("Blocks() after a failed Submit = %+v, want none", bs)
	}
}

func TestNotInstalled(t *testing.T) {
	p, err := New(Config{}, Options{StateDir: t.TempDir(), WorkerCommand: pilot, Commands: Commands{Sbatch: "kiln-no-such-sbatch"}})
	if err != nil {
		t.Fatal(err)
	}
	err = p.Check(context.Background())
	if err == nil || !strings.Contains(err.Error(), "kiln-no-such-sbatch is not installed here") || !strings.Contains(err.Error(), "Slurm login node") {
		t.Errorf("Check without sbatch = %v, want it to say sbatch is not installed and where to run kiln serve", err)
	}
}

func TestBlockLifecycle(t *testing.T) {
	testutil.NeedSlurm(t)
	for _, launcher := range []string{LauncherNone, LauncherSrun} {
		t.Run(launcher, func(t *testing.T) {
			ctx := context.Background()
			p := newProvider(t, Config{Launcher: launcher, Walltime: "10:00"}, Commands{})
			t0 := time.Now()
			b, err := p.Submit(ctx)
			if err != nil {
				t.Fatalf("Submit: %v", err)
			}
			if b.ID != "b1" || b.JobID == "" || b.State != StatePending {
				t.Errorf("Submit() = %+v, want block b1, pending, with a job id", b)
			}
			bs := poll(t, p, "the block to run", func(b Block) bool { return b.State == StateRunning })
			t.Logf("sbatch to running: %s", time.Since(t0).Round(time.Millisecond))
			if bs[0].Nodes == "" {
				t.Errorf("running block %+v has no nodes", bs[0])
			}
			out := filepath.Join(filepath.Dir(p.Script()), "pilot-"+b.JobID+".out")
			want := fmt.Sprintf("block=b1 job=%s", b.JobID)
			testutil.WaitFor(t, waitJob, "the pilot to print "+want, func() bool {
				got, _ := os.ReadFile(out)
				return strings.Contains(string(got), want)
			})
			if got := p.Blocks(); len(got) != 1 || got[0].State != StateRunning {
				t.Errorf("Blocks() = %+v, want b1 running", got)
			}

			if err := p.Cancel(ctx, b); err != nil {
				t.Fatalf("Cancel: %v", err)
			}
			bs = poll(t, p, "the block to end", func(b Block) bool { return !b.State.Active() })
			if bs[0].State != StateCancelled {
				t.Errorf("after Cancel, Status() = %+v, want cancelled", bs[0])
			}
			if got := p.Blocks(); len(got) != 0 {
				t.Errorf("Blocks() after the block ended = %+v, want none", got)
			}
			if bs, err := p.Status(ctx); err != nil || len(bs) != 0 {
				t.Errorf("Status() with no active block = %+v, %v; want nothing, no call", bs, err)
			}
			// Cancelling a finished block again is not an error.
			if err := p.Cancel(ctx, b); err != nil {
				t.Errorf("Cancel(finished block) = %v, want nil", err)
			}
		})
	}
}

// TestBatchedCalls checks that polling and cancelling several blocks cost
// one squeue and one scancel call, through wrappers that count the calls.
func TestBatchedCalls(t *testing.T) {
	testutil.NeedSlurm(t)
	ctx := context.Background()
	dir := t.TempDir()
	calls := filepath.Join(dir, "calls")
	wrap := func(name string) string {
		bin, err := exec.LookPath(name)
		if err != nil {
			t.Fatal(err)
		}
		w := filepath.Join(dir, name)
		script := fmt.Sprintf("#!/bin/sh\necho %s \"$@\" >>%s\nexec %s \"$@\"\n", name, calls, bin)
		if err := os.WriteFile(w, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		return w
	}
	count := func(name string) []string {
		b, _ := os.ReadFile(calls)
		var lines []string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, name+" ") {
				lines = append(lines, l)
			}
		}
		return lines
	}
	p := newProvider(t, Config{Launcher: LauncherNone, Walltime: "10:00", MaxBlocks: 3}, Commands{Squeue: wrap("squeue"), Scancel: wrap("scancel")})
	const n = 3 // more than the CPUs of a two-core node: one may pend
	var blocks []Block
	for range n {
		b, err := p.Submit(ctx)
		if err != nil {
			t.Fatalf("Submit: %v", err)
		}
		blocks = append(blocks, b)
	}
	bs, err := p.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if got := count("squeue"); len(got) != 1 {
		t.Errorf("Status of %d blocks ran squeue %d times: %q, want once", n, len(got), got)
	}
	if len(bs) != n {
		t.Fatalf("Status() = %+v, want %d blocks", bs, n)
	}
	for i, b := range bs {
		if b.ID != blocks[i].ID || !b.State.Active() {
			t.Errorf("Status()[%d] = %+v, want %s active", i, b, blocks[i].ID)
		}
	}
	testutil.WaitFor(t, waitJob, "a block to run", func() bool {
		bs, _ := p.Status(ctx)
		for _, b := range bs {
			if b.State == StateRunning {
				return true
			}
		}
		return false
	})

	if err := p.Cancel(ctx, blocks...); err != nil {
		t.Fatalf("Cancel: %v", err)
	}
	got := count("scancel")
	ids := regexp.MustCompile(`\d+`).FindAllString(strings.Join(got, " "), -1)
	if len(got) != 1 || len(ids) != n {
		t.Errorf("Cancel of %d blocks ran %q, want one scancel with %d job ids", n, got, n)
	}
	poll(t, p, "every block to end", func(b Block) bool { return !b.State.Active() })
	if got := p.Blocks(); len(got) != 0 {
		t.Errorf("Blocks() after Cancel = %+v, want none", got)
	}
}
