package testutil

import (
	"context"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	slurmOnce sync.Once
	slurmWhy  string // why Slurm cannot run jobs here; "" if it can
)

// NeedSlurm marks a test that submits jobs to a real Slurm cluster:
// skipped with -short, and when sbatch, squeue, scancel and sinfo are
// missing or no node can run jobs (scripts/slurm-dev.sh start installs
// and starts a one-node cluster; .ci/run does).
func NeedSlurm(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("submits Slurm jobs: skipped with -short")
	}
	slurmOnce.Do(func() { slurmWhy = probeSlurm() })
	if slurmWhy != "" {
		missing(t, slurmWhy+" (scripts/slurm-dev.sh start installs and starts a one-node cluster)")
	}
}

// probeSlurm says why Slurm cannot run jobs here, or "".
func probeSlurm() string {
	for _, tool := range []string{"sbatch", "squeue", "scancel", "sinfo"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "needs Slurm, but " + tool + " is not on PATH (apt-get install slurm-wlm munge)"
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// %t: the nodes' compact states; a node that can take a job is idle,
	// mixed or allocated (it frees up) and responding (no "*" flag).
	out, err := exec.CommandContext(ctx, "sinfo", "--noheader", "--format=%t").CombinedOutput()
	if err != nil {
		return "needs Slurm, but the cluster does not answer: sinfo: " + strings.TrimSpace(string(out)) + " (" + err.Error() + ")"
	}
	states := strings.Fields(string(out))
	for _, s := range states {
		if strings.HasSuffix(s, "*") {
			continue
		}
		if strings.HasPrefix(s, "idle") || strings.HasPrefix(s, "mix") || strings.HasPrefix(s, "alloc") {
			return ""
		}
	}
	return "needs Slurm, but no node can run jobs (sinfo node states: " + strings.Join(states, " ") + ")"
}
