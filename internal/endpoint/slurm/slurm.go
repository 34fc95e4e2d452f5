// Package slurm launches kiln's pilot jobs (blocks) through Slurm's sbatch and tracks them with squeue or sacct.
//
// A Provider renders one sbatch script, the pilot, from the [slurm] table
// of serve.toml (Config) and writes it to StateDir/slurm/pilot.sbatch for
// the operator to read. Submit submits it once per block; each block's job
// runs the worker command with KILN_BLOCK_ID set. Status asks squeue about
// every active block in one call (squeue --states=all keeps finished jobs
// for MinJobAge, five minutes by default, so their final state comes from
// there); jobs squeue no longer lists get their final state from sacct
// when accounting works, else they count as completed. Cancel is one
// scancel call. The provider makes no scaling decision: BlocksWanted is
// the rule, and its caller decides when to Submit and Cancel.
//
// Slurm is driven through its commands, not a library: sbatch, squeue,
// sacct and scancel are the stable interface on every cluster (the C API
// and slurmrestd vary by site and version), and their messages are what
// users already know.
package slurm

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/renameio/v2"
)

// Options are the provider's inputs besides the config.
type Options struct {
	// StateDir is kiln serve's state directory; the provider keeps its
	// files in StateDir/slurm (mode 0700): pilot.sbatch, token and the
	// jobs' output, pilot-<job id>.out.
	StateDir string
	// WorkerCommand is the argv each pilot runs, e.g. ["/usr/local/bin/kiln",
	// "worker", "--endpoint", "http://login1:8470", "--token-file",
	// TokenFile(stateDir)].
	WorkerCommand []string
	// Token is written to TokenFile(StateDir) with mode 0600 for the
	// worker's --token-file; "" writes no file.
	Token string
	// ConfigFile, if set, is named in the script's header comment (the
	// serve.toml the [slurm] table came from).
	ConfigFile string
	Log        *slog.Logger
	// Commands are the Slurm commands to run; empty fields mean the
	// command of that name on PATH.
	Commands Commands
}

// Commands are the paths (or names on PATH) of the Slurm commands.
type Commands struct{ Sbatch, Squeue, Sacct, Scancel string }

// TokenFile is where New writes Options.Token.
func TokenFile(stateDir string) string { return filepath.Join(stateDir, "slurm", "token") }

// Block is one pilot job.
type Block struct {
	ID        string // kiln's block id: "b1", "b2", ... in submission order
	JobID     string // Slurm's job id
	State     State
	Submitted time.Time
	Nodes     string // squeue's node list (%N) once the job has nodes
	// Reason is squeue's reason (%r) while the job pends ("Resources",
	// "PartitionDown") or after it failed ("NonZeroExitCode"), or sacct's
	// final state ("CANCELLED by 1000", "NODE_FAIL").
	Reason string
}

// idsPerCall bounds the job ids of one squeue or scancel call; sacct gets
// fewer (Parsl #3814: sacct hangs on long lists on some clusters).
const (
	idsPerCall      = 500
	sacctIDsPerCall = 100
	// callTimeout bounds one Slurm command when the caller's context has
	// no earlier deadline: they hang when slurmctld does not answer.
	callTimeout = 2 * time.Minute
)

// Provider submits, tracks and cancels the blocks of one endpoint run.
// Its methods are safe for concurrent use.
type Provider struct {
	cfg    Config
	cmds   Commands
	log    *slog.Logger
	script string

	statusMu sync.Mutex // one Status at a time

	mu     sync.Mutex
	next   int      // last block number handed out
	order  []string // active block ids, in submission order
	blocks map[string]*block
	sacct  sacctUse
}

type block struct {
	Block
	cancelled bool // Cancel was asked for it
	ran       bool // seen running
}

type sacctUse int

const (
	sacctUntried sacctUse = iota
	sacctWorks
	sacctBroken
)

// New validates cfg, creates StateDir/slurm, writes the token file and
// the pilot script. It runs no Slurm command.
func New(cfg Config, opts Options) (*Provider, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if opts.StateDir == "" {
		return nil, errors.New("slurm provider: no state directory")
	}
	if len(opts.WorkerCommand) == 0 {
		return nil, errors.New("slurm provider: no worker command")
	}
	dirAbs, err := filepath.Abs(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("resolving the state directory: %w", err)
	}
	dir := filepath.Join(dirAbs, "slurm")
	if strings.ContainsAny(dir, "\"'\\\n\r") {
		return nil, fmt.Errorf("state directory %q: the pilot's #SBATCH --output cannot name a path with quotes, backslashes or newlines: choose another state directory", opts.StateDir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating the slurm state directory: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("restricting the slurm state directory: %w", err)
	}
	if opts.Token != "" {
		if err := renameio.WriteFile(TokenFile(dirAbs), []byte(opts.Token+"\n"), 0o600); err != nil {
			return nil, fmt.Errorf("writing the workers' token file: %w", err)
		}
	}
	c := opts.Commands
	c.Sbatch = cmp.Or(c.Sbatch, "sbatch")
	c.Squeue = cmp.Or(c.Squeue, "squeue")
	c.Sacct = cmp.Or(c.Sacct, "sacct")
	c.Scancel = cmp.Or(c.Scancel, "scancel")
	log := opts.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	p := &Provider{
		cfg: cfg, cmds: c, log: log,
		script: filepath.Join(dir, "pilot.sbatch"),
		blocks: make(map[string]*block),
	}
	text := renderScript(cfg, scriptParams{dir: dir, worker: opts.WorkerCommand, configFile: opts.ConfigFile})
	if err := renameio.WriteFile(p.script, []byte(text), 0o600); err != nil {
		return nil, fmt.Errorf("writing the pilot script: %w", err)
	}
	return p, nil
}

// Script is the path of the rendered pilot script.
func (p *Provider) Script() string { return p.script }

// OutputFile is where a block's pilot job writes its output (the
// script's #SBATCH --output); jobID may be a placeholder such as "<job>".
func (p *Provider) OutputFile(jobID string) string {
	return filepath.Join(filepath.Dir(p.script), "pilot-"+jobID+".out")
}

// Config is the validated config, defaults filled in.
func (p *Provider) Config() Config { return p.cfg }

// Check asks sbatch whether it would accept the pilot (sbatch --test-only,
// which submits nothing): a bad partition, account, qos or walltime is an
// error quoting sbatch's message and naming the serve.toml key to fix.
func (p *Provider) Check(ctx context.Context) error {
	_, stderr, err := p.run(ctx, p.cmds.Sbatch, "--test-only", p.script)
	if err != nil {
		return p.sbatchError("checking the pilot job with sbatch --test-only", err, stderr)
	}
	p.log.Debug("slurm: sbatch --test-only accepts the pilot", "script", p.script, "sbatch", strings.TrimSpace(stderr))
	return nil
}

// Submit submits one block: sbatch --parsable with KILN_BLOCK_ID=<block
// id> in the job's environment.
func (p *Provider) Submit(ctx context.Context) (Block, error) {
	p.mu.Lock()
	p.next++
	id := "b" + strconv.Itoa(p.next)
	p.mu.Unlock()
	stdout, stderr, err := p.run(ctx, p.cmds.Sbatch, "--parsable", "--export=ALL,KILN_BLOCK_ID="+id, p.script)
	if err != nil {
		return Block{}, p.sbatchError("submitting block "+id, err, stderr)
	}
	jobID, err := parseSbatch(stdout)
	if err != nil {
		return Block{}, fmt.Errorf("submitting block %s: %w", id, err)
	}
	b := &block{Block: Block{ID: id, JobID: jobID, State: StatePending, Submitted: time.Now()}}
	p.mu.Lock()
	p.blocks[id] = b
	p.order = append(p.order, id)
	p.mu.Unlock()
	p.log.Info("slurm: submitted block", "block", id, "job", jobID)
	return b.Block, nil
}

// Status polls Slurm for every active block, one squeue call per 500
// blocks, and returns them with their new state; blocks found finished
// are returned once more and then dropped from Blocks.
func (p *Provider) Status(ctx context.Context) ([]Block, error) {
	p.statusMu.Lock()
	defer p.statusMu.Unlock()
	active := p.Blocks()
	if len(active) == 0 {
		return nil, nil
	}
	ids := make([]string, len(active))
	for i, b := range active {
		ids[i] = b.JobID
	}
	rows := make(map[string]squeueRow, len(ids))
	for chunk := range slices.Chunk(ids, idsPerCall) {
		stdout, stderr, err := p.run(ctx, p.cmds.Squeue, "--noheader", "--states=all", "--format="+squeueFormat, "--jobs="+strings.Join(chunk, ","))
		if err != nil {
			// For one job id that is gone, squeue fails with "Invalid
			// job id specified" instead of listing nothing.
			if !strings.Contains(stderr, "Invalid job id specified") {
				return nil, p.cmdError("polling blocks with squeue", err, stderr)
			}
		}
		got, perr := parseSqueue(stdout)
		if perr != nil {
			p.log.Warn("slurm: squeue printed lines kiln cannot read", "err", perr)
		}
		for _, r := range got {
			rows[r.JobID] = r
		}
	}
	var gone []string
	for _, id := range ids {
		if _, ok := rows[id]; !ok {
			gone = append(gone, id)
		}
	}
	final := p.sacctStates(ctx, gone)

	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Block, 0, len(active))
	for _, a := range active {
		b := p.blocks[a.ID]
		if b == nil { // a concurrent Cancel cannot drop it; be safe anyway
			continue
		}
		var row *squeueRow
		if r, ok := rows[b.JobID]; ok {
			row = &r
		}
		var acct *sacctRow
		if r, ok := final[b.JobID]; ok {
			acct = &r
		}
		prev := b.Block
		b.Block = nextState(b.Block, b.cancelled, b.ran, row, acct, p.sacct == sacctWorks)
		b.ran = b.ran || b.State == StateRunning || b.State == StateCompleting
		if b.State != prev.State || b.Reason != prev.Reason || b.Nodes != prev.Nodes {
			p.log.Info("slurm: block state", "block", b.ID, "job", b.JobID, "state", b.State, "nodes", b.Nodes, "reason", b.Reason)
		}
		out = append(out, b.Block)
		if !b.State.Active() {
			delete(p.blocks, b.ID)
			p.order = slices.DeleteFunc(p.order, func(id string) bool { return id == b.ID })
		}
	}
	return out, nil
}

// nextState is a block's state after a poll: from squeue's row if squeue
// listed the job, else from sacct's if accounting knows it, else final:
// cancelled if kiln cancelled it, completed if it ran, unknown if not.
func nextState(b Block, cancelled, ran bool, row *squeueRow, acct *sacctRow, sacctWorks bool) Block {
	if row != nil {
		b.State, b.Nodes, b.Reason = row.State, row.Nodes, row.Reason
		switch row.State {
		case StateUnknown:
			b.Reason = "Slurm state " + row.Code
		case StateRunning, StateCompleting, StateCompleted, StateCancelled:
			// squeue keeps the last pending reason ("Resources") after
			// the job started or was cancelled.
			b.Reason = ""
		}
		return b
	}
	if acct != nil && !acct.State.Active() {
		b.State, b.Reason = acct.State, acct.Raw
		if acct.State == StateCompleted {
			b.Reason = ""
		}
		return b
	}
	gone := "no longer listed by squeue"
	if !sacctWorks {
		gone += "; sacct does not work here"
	}
	switch {
	case cancelled:
		b.State, b.Reason = StateCancelled, "cancelled by kiln"
	case ran:
		b.State, b.Reason = StateCompleted, gone
	default:
		b.State, b.Reason = StateUnknown, gone
	}
	return b
}

// sacctStates asks sacct for the final state of jobs squeue no longer
// lists. The first failure means accounting does not work here: it is
// logged once and sacct is not asked again.
func (p *Provider) sacctStates(ctx context.Context, ids []string) map[string]sacctRow {
	p.mu.Lock()
	use := p.sacct
	p.mu.Unlock()
	if len(ids) == 0 || use == sacctBroken {
		return nil
	}
	all := make(map[string]sacctRow)
	for chunk := range slices.Chunk(ids, sacctIDsPerCall) {
		stdout, stderr, err := p.run(ctx, p.cmds.Sacct, "--noheader", "--parsable2", "-X", "--format=JobID,State", "--jobs="+strings.Join(chunk, ","))
		if err != nil {
			if use == sacctUntried {
				p.mu.Lock()
				p.sacct = sacctBroken
				p.mu.Unlock()
				p.log.Info("slurm: sacct does not work here; blocks squeue no longer lists are taken as finished",
					"err", p.cmdError("running sacct", err, stderr))
			} else {
				p.log.Warn("slurm: sacct failed", "err", p.cmdError("running sacct", err, stderr))
			}
			return all
		}
		if use == sacctUntried {
			use = sacctWorks
			p.mu.Lock()
			p.sacct = sacctWorks
			p.mu.Unlock()
		}
		rows, perr := parseSacct(stdout)
		if perr != nil {
			p.log.Warn("slurm: sacct printed lines kiln cannot read", "err", perr)
		}
		for id, r := range rows {
			all[id] = r
		}
	}
	return all
}

// Cancel cancels blocks with one scancel call (per 500). Jobs that had
// finished already are not an error. The blocks stay in Blocks until
// Status sees them end.
func (p *Provider) Cancel(ctx context.Context, blocks ...Block) error {
	var ids, names []string
	p.mu.Lock()
	for _, b := range blocks {
		if b.JobID == "" || slices.Contains(ids, b.JobID) {
			continue
		}
		ids = append(ids, b.JobID)
		names = append(names, b.ID)
		for _, have := range p.blocks {
			if have.JobID == b.JobID {
				have.cancelled = true
			}
		}
	}
	p.mu.Unlock()
	if len(ids) == 0 {
		return nil
	}
	for chunk := range slices.Chunk(ids, idsPerCall) {
		_, stderr, err := p.run(ctx, p.cmds.Scancel, chunk...)
		if err != nil && !scancelHarmless(stderr) {
			return p.cmdError(fmt.Sprintf("cancelling blocks %s (jobs %s)", strings.Join(names, ", "), strings.Join(ids, ", ")), err, stderr)
		}
	}
	p.log.Info("slurm: cancelled blocks", "blocks", strings.Join(names, ","), "jobs", strings.Join(ids, ","))
	return nil
}

// Blocks returns the last known state of every block not known to have
// finished, in submission order.
func (p *Provider) Blocks() []Block {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Block, 0, len(p.order))
	for _, id := range p.order {
		out = append(out, p.blocks[id].Block)
	}
	return out
}

// Close releases nothing and cancels nothing: whether the blocks outlive
// the endpoint is the caller's decision (Cancel them first if not).
func (p *Provider) Close() error { return nil }

// run runs a Slurm command and returns its stdout and stderr.
func (p *Provider) run(parent context.Context, name string, args ...string) (stdout, stderr string, err error) {
	ctx, cancel := context.WithTimeout(parent, callTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	t0 := time.Now()
	err = cmd.Run()
	p.log.Debug("slurm: ran a command", "cmd", filepath.Base(name), "args", strings.Join(args, " "), "took", time.Since(t0).Round(time.Millisecond), "err", err)
	if err != nil && ctx.Err() != nil && parent.Err() == nil {
		err = fmt.Errorf("%s did not answer within %s (%w): is slurmctld up? (scontrol ping)", filepath.Base(name), callTimeout, ctx.Err())
	}
	return o.String(), e.String(), err
}

// cmdError explains a failed Slurm command: not installed, the controller
// down, or its own message.
func (p *Provider) cmdError(doing string, err error, stderr string) error {
	name := ""
	var ee *exec.Error
	if errors.As(err, &ee) {
		name = filepath.Base(ee.Name)
	}
	if errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s: %s is not installed here (%w): run kiln serve on a Slurm login node, where sbatch, squeue and scancel are on PATH (for a one-node test cluster: scripts/slurm-dev.sh start)", doing, cmp.Or(name, "a Slurm command"), err)
	}
	msg := stderrMessage(stderr)
	if msg == "" {
		return fmt.Errorf("%s: %w", doing, err)
	}
	if clusterDown(msg) {
		return fmt.Errorf("%s: %s (%w): Slurm's controller does not answer: check scontrol ping and munge (scripts/slurm-dev.sh start for a test cluster)", doing, msg, err)
	}
	return fmt.Errorf("%s: %s (%w)", doing, msg, err)
}

// stderrMessage is a command's stderr on one line, without sbatch's
// pointer to --help.
func stderrMessage(stderr string) string {
	var lines []string
	for _, l := range strings.Split(stderr, "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "Try \"") {
			lines = append(lines, l)
		}
	}
	return truncate(strings.Join(lines, " / "), 2000)
}

// sbatchError is cmdError plus the serve.toml keys sbatch's message points
// at, with their current values.
func (p *Provider) sbatchError(doing string, err error, stderr string) error {
	msg := stderrMessage(stderr)
	base := p.cmdError(doing, err, stderr)
	if msg == "" || clusterDown(msg) || errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
		return base
	}
	keys := configKeys(msg)
	var set []string
	for _, k := range keys {
		if v, ok := p.cfg.value(k); ok || k == "nodes_per_block" || len(keys) == 1 {
			set = append(set, k+" = "+v)
		}
	}
	if len(set) == 0 {
		return fmt.Errorf("%w: check the [slurm] table of serve.toml (partition, account, qos, constraint, walltime, nodes_per_block, cpus_per_task, mem, exclusive, scheduler_options) against the pilot script %s", base, p.script)
	}
	verb, hint := "fix", ""
	if len(keys) > 1 {
		verb = "check"
	}
	switch keys[0] {
	case "partition":
		hint = " (sinfo lists the partitions)"
	case "account", "qos":
		hint = " (sacctmgr show associations user=$USER lists yours)"
	case "nodes_per_block":
		hint = " (sinfo -N -l lists the nodes and their sizes)"
	}
	return fmt.Errorf("%w: %s %s in the [slurm] table of serve.toml%s", base, verb, strings.Join(set, ", "), hint)
}

// value is key's value as serve.toml would spell it, and whether it is
// set (not empty, zero or false).
func (c Config) value(key string) (string, bool) {
	str := func(v string) (string, bool) { return strconv.Quote(v), v != "" }
	switch key {
	case "partition":
		return str(c.Partition)
	case "account":
		return str(c.Account)
	case "qos":
		return str(c.QOS)
	case "constraint":
		return str(c.Constraint)
	case "walltime":
		return str(c.Walltime)
	case "mem":
		return str(c.Mem)
	case "scheduler_options":
		return str(c.SchedulerOptions)
	case "nodes_per_block":
		return strconv.Itoa(c.NodesPerBlock), true
	case "cpus_per_task":
		return strconv.Itoa(c.CPUsPerTask), c.CPUsPerTask != 0
	case "exclusive":
		return strconv.FormatBool(c.Exclusive), c.Exclusive
	}
	return "?", false
}
