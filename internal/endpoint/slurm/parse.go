package slurm

import (
	"errors"
	"fmt"
	"strings"
)

// State is a block's state, from Slurm's job state.
type State string

// Block states. Pending, running and completing blocks are active; the
// others are final.
const (
	StatePending    State = "pending"
	StateRunning    State = "running"
	StateCompleting State = "completing"
	StateCompleted  State = "completed"
	StateFailed     State = "failed"
	StateCancelled  State = "cancelled"
	StateTimeout    State = "timeout"
	StateUnknown    State = "unknown"
)

// States lists every block state.
var States = []State{StatePending, StateRunning, StateCompleting, StateCompleted, StateFailed, StateCancelled, StateTimeout, StateUnknown}

// Active reports whether the block's job still exists in Slurm: pending,
// running or completing.
func (s State) Active() bool {
	return s == StatePending || s == StateRunning || s == StateCompleting
}

// slurmStates maps Slurm's job states, in squeue's compact codes (%t) and
// sacct's names, to block states (squeue(1), "JOB STATE CODES").
var slurmStates = map[string]State{
	"PD": StatePending, "PENDING": StatePending,
	"CF": StatePending, "CONFIGURING": StatePending, // nodes booting
	"RQ": StatePending, "REQUEUED": StatePending,
	"RF": StatePending, "REQUEUE_FED": StatePending,
	"RH": StatePending, "REQUEUE_HOLD": StatePending,
	"RD": StatePending, "RESV_DEL_HOLD": StatePending,
	"S": StatePending, "SUSPENDED": StatePending, // held by the scheduler, may resume
	"ST": StatePending, "STOPPED": StatePending,
	"R": StateRunning, "RUNNING": StateRunning,
	"RS": StateRunning, "RESIZING": StateRunning,
	"SI": StateRunning, "SIGNALING": StateRunning,
	"CG": StateCompleting, "COMPLETING": StateCompleting,
	"SO": StateCompleting, "STAGE_OUT": StateCompleting,
	"CD": StateCompleted, "COMPLETED": StateCompleted,
	"CA": StateCancelled, "CANCELLED": StateCancelled,
	"PR": StateCancelled, "PREEMPTED": StateCancelled,
	"F": StateFailed, "FAILED": StateFailed,
	"NF": StateFailed, "NODE_FAIL": StateFailed,
	"BF": StateFailed, "BOOT_FAIL": StateFailed,
	"OOM": StateFailed, "OUT_OF_MEMORY": StateFailed,
	"SE": StateFailed, "SPECIAL_EXIT": StateFailed,
	"RV": StateFailed, "REVOKED": StateFailed,
	"TO": StateTimeout, "TIMEOUT": StateTimeout,
	"DL": StateTimeout, "DEADLINE": StateTimeout,
}

// stateOf maps a Slurm state ("R", "RUNNING", "CANCELLED by 1000",
// "COMPLETED+") to a block state; ok is false for one it does not know.
func stateOf(s string) (st State, ok bool) {
	s = strings.TrimSpace(s)
	if i := strings.IndexAny(s, " +"); i >= 0 {
		s = s[:i]
	}
	st, ok = slurmStates[strings.ToUpper(s)]
	if !ok {
		return StateUnknown, false
	}
	return st, true
}

// squeueFormat is the squeue --format that parseSqueue reads: the reason
// last, as it may hold spaces and commas.
const squeueFormat = "%i|%t|%N|%r"

// squeueRow is one job as squeue printed it.
type squeueRow struct {
	JobID  string
	Code   string // squeue's compact state code
	State  State
	Nodes  string
	Reason string // "" for squeue's "None"
}

// parseSqueue reads squeue --noheader --format=squeueFormat output. Lines
// it cannot read are left out and reported in err; the rows it could read
// are returned either way.
func parseSqueue(out string) ([]squeueRow, error) {
	var rows []squeueRow
	var errs []error
	for i, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		f := strings.SplitN(line, "|", 4)
		if len(f) != 4 || !validJobID(strings.TrimSpace(f[0])) || strings.TrimSpace(f[1]) == "" {
			errs = append(errs, fmt.Errorf("line %d %q: want JOBID|STATE|NODES|REASON", i+1, line))
			continue
		}
		r := squeueRow{
			JobID:  strings.TrimSpace(f[0]),
			Code:   strings.TrimSpace(f[1]),
			Nodes:  strings.TrimSpace(f[2]),
			Reason: strings.TrimSpace(f[3]),
		}
		r.State, _ = stateOf(r.Code)
		if r.Nodes == "(null)" {
			r.Nodes = ""
		}
		if r.Reason == "None" || r.Reason == "(null)" {
			r.Reason = ""
		}
		rows = append(rows, r)
	}
	if len(errs) > 0 {
		return rows, fmt.Errorf("parsing squeue output: %w", errors.Join(errs...))
	}
	return rows, nil
}

// sacctRow is one job as sacct -X printed it.
type sacctRow struct {
	JobID string
	Raw   string // sacct's state, e.g. "CANCELLED by 1000"
	State State
}

// parseSacct reads sacct --noheader --parsable2 -X --format=JobID,State
// output. Step lines ("123.batch"), if any, are skipped; a job listed
// twice keeps its last line.
func parseSacct(out string) (map[string]sacctRow, error) {
	rows := make(map[string]sacctRow)
	var errs []error
	for i, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		id, state, ok := strings.Cut(line, "|")
		id, state = strings.TrimSpace(id), strings.TrimSpace(state)
		if strings.Contains(id, ".") {
			continue
		}
		if !ok || !validJobID(id) || state == "" {
			errs = append(errs, fmt.Errorf("line %d %q: want JOBID|STATE", i+1, line))
			continue
		}
		st, _ := stateOf(state)
		rows[id] = sacctRow{JobID: id, Raw: state, State: st}
	}
	if len(errs) > 0 {
		return rows, fmt.Errorf("parsing sacct output: %w", errors.Join(errs...))
	}
	return rows, nil
}

// parseSbatch reads the job id from sbatch --parsable output: "123" or
// "123;cluster", the last non-empty line.
func parseSbatch(out string) (string, error) {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	last := strings.TrimSpace(lines[len(lines)-1])
	id, _, _ := strings.Cut(last, ";")
	if id == "" || strings.Trim(id, "0123456789") != "" {
		return "", fmt.Errorf("sbatch --parsable printed %q, want a job id", truncate(out, 200))
	}
	return id, nil
}

// validJobID accepts Slurm job ids as squeue and sacct print them: digits,
// with an array ("123_4", "123_[1-3]") or heterogeneous ("123+0") suffix.
func validJobID(s string) bool {
	if s == "" || s[0] < '0' || s[0] > '9' {
		return false
	}
	for _, r := range s {
		if !(r >= '0' && r <= '9' || strings.ContainsRune("_+[]-,%", r)) {
			return false
		}
	}
	return true
}

// scancelHarmless reports whether scancel's stderr only says that jobs
// were finished already, which Cancel does not count as an error.
func scancelHarmless(stderr string) bool {
	seen := false
	for _, line := range strings.Split(stderr, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		l := strings.ToLower(line)
		if !strings.Contains(l, "already completing or completed") && !strings.Contains(l, "invalid job id specified") {
			return false
		}
		seen = true
	}
	return seen
}

// configKeys names the [slurm] keys an sbatch error message points at,
// most likely first; nil when the message is not about the config.
func configKeys(msg string) []string {
	l := strings.ToLower(msg)
	var keys []string
	add := func(k ...string) {
		for _, k := range k {
			dup := false
			for _, have := range keys {
				dup = dup || have == k
			}
			if !dup {
				keys = append(keys, k)
			}
		}
	}
	has := func(subs ...string) bool {
		for _, s := range subs {
			if strings.Contains(l, s) {
				return true
			}
		}
		return false
	}
	if has("account") {
		add("account")
	}
	if has("partition") {
		add("partition")
	}
	if has("qos") {
		add("qos")
	}
	if has("--time", "time limit") {
		add("walltime")
	}
	if has("feature", "constraint") {
		add("constraint")
	}
	if has("--mem", "memory") {
		add("mem")
	}
	if has("node count", "--nodes") {
		add("nodes_per_block")
	}
	if has("cpus-per-task", "cpu count") {
		add("cpus_per_task")
	}
	if has("requested node configuration is not available") {
		add("nodes_per_block", "cpus_per_task", "mem", "constraint", "exclusive")
	}
	if has("#sbatch", "unrecognized option", "invalid option") {
		add("scheduler_options")
	}
	return keys
}

// clusterDown reports whether an sbatch/squeue error means the controller
// did not answer, rather than a bad request.
func clusterDown(msg string) bool {
	l := strings.ToLower(msg)
	for _, s := range []string{"unable to contact slurm controller", "connection refused", "munge", "socket timed out", "communication connection failure", "could not establish a configuration source"} {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
