package endpoint

import (
	"context"
	"fmt"
	"maps"
	"sort"
	"sync"
	"time"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
	"github.com/kiln-dev/kiln/internal/endpoint/slurm"
)

// Providers: where an endpoint's tasks run.
const (
	// ProviderLocal runs tasks on the endpoint's own VMs (the default).
	ProviderLocal = "local"
	// ProviderSlurm runs them on kiln workers in Slurm pilot jobs that the
	// endpoint submits, scales and cancels.
	ProviderSlurm = "slurm"
	// ProviderWorkers runs them on kiln workers started by hand (or by
	// another scheduler), with no blocks to manage.
	ProviderWorkers = "workers"
)

// Providers lists the valid Config.Provider values.
var Providers = []string{ProviderLocal, ProviderSlurm, ProviderWorkers}

// Defaults of the remote providers.
const (
	DefaultScaleInterval = 5 * time.Second
	// maxStartFailures is how many blocks in a row may end before their
	// worker registers before the endpoint stops submitting for
	// startBackoff: a broken worker_init or kiln path would otherwise
	// submit pilots in a loop.
	maxStartFailures = 3
	startBackoff     = time.Minute
)

// blockManager scales a Slurm provider's blocks with the queue.
type blockManager struct {
	s   *Server
	p   *slurm.Provider
	cfg slurm.Config

	mu        sync.Mutex
	blocks    []slurm.Block // the last status
	idleSince map[string]time.Time
	seen      map[string]bool // blocks whose worker registered
	judged    map[string]bool // ended blocks already counted
	cancelled map[string]bool // blocks the endpoint cancelled
	ended     map[string]int  // blocks that ended, by final state
	failures  int             // blocks in a row that ended before their worker registered
	pauseTill time.Time
}

// startSlurm creates the provider, checks its pilot job with sbatch
// --test-only (a bad partition or account stops the start, with sbatch's
// message) and submits the initial blocks.
func startSlurm(ctx context.Context, s *Server) (*blockManager, error) {
	if len(s.cfg.WorkerCommand) == 0 {
		return nil, fmt.Errorf("provider %q: no worker command (kiln serve sets it)", ProviderSlurm)
	}
	p, err := slurm.New(s.cfg.Slurm, slurm.Options{
		StateDir: s.cfg.StateDir, WorkerCommand: s.cfg.WorkerCommand, Token: s.token,
		ConfigFile: s.cfg.ConfigFile, Log: s.cfg.Log, Commands: s.cfg.SlurmCommands,
	})
	if err != nil {
		return nil, err
	}
	m := &blockManager{s: s, p: p, cfg: p.Config(), idleSince: map[string]time.Time{}, seen: map[string]bool{}, judged: map[string]bool{}, cancelled: map[string]bool{}, ended: map[string]int{}}
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := p.Check(cctx); err != nil {
		return nil, err
	}
	s.cfg.Log.Info("slurm provider ready", "script", p.Script(), "max_blocks", m.cfg.MaxBlocks, "max_idle", m.cfg.MaxIdle.Duration)
	for range m.cfg.InitBlocks {
		if err := m.submit(cctx); err != nil {
			m.close()
			return nil, fmt.Errorf("submitting the initial blocks (init_blocks = %d): %w", m.cfg.InitBlocks, err)
		}
	}
	return m, nil
}

func (m *blockManager) submit(ctx context.Context) error {
	b, err := m.p.Submit(ctx)
	if err != nil {
		return err
	}
	m.s.cfg.Log.Info("submitted a block", "block", b.ID, "job", b.JobID)
	return nil
}

// workerSeen records that a block's worker registered.
func (m *blockManager) workerSeen(blockID string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if blockID != "" {
		m.seen[blockID] = true
		m.failures = 0
	}
}

// scale polls the blocks' states (one squeue call), submits the blocks the
// queue needs and cancels blocks idle for max_idle.
func (m *blockManager) scale(ctx context.Context, now time.Time) {
	blocks, err := m.p.Status(ctx)
	if err != nil {
		m.s.cfg.Log.Warn("polling the blocks' states", "error", err)
		blocks = m.p.Blocks()
	}
	queued := m.s.sched.queuedCount()
	leased, running, busy, slots := m.s.workers.load()
	if slots == 0 {
		slots = max(m.cfg.CPUsPerTask, 1)
	}
	slots *= max(m.cfg.NodesPerBlock, 1)
	want := slurm.BlocksWanted(m.cfg, queued, leased+running, slots)

	m.mu.Lock()
	m.blocks = blocks
	var active []slurm.Block
	for _, b := range blocks {
		if b.State.Active() {
			active = append(active, b)
			continue
		}
		if !m.judged[b.ID] {
			m.judged[b.ID] = true
			m.ended[string(b.State)]++
			delete(m.idleSince, b.ID)
			if !m.seen[b.ID] && !m.cancelled[b.ID] {
				m.failures++
				m.s.cfg.Log.Warn("a block ended before its worker registered", "block", b.ID, "job", b.JobID, "state", b.State, "reason", b.Reason,
					"output", m.p.OutputFile(b.JobID))
				if m.failures >= maxStartFailures {
					m.pauseTill = now.Add(startBackoff)
					m.s.cfg.Log.Error(fmt.Sprintf("%d blocks in a row ended before their worker registered: not submitting for %s; read the pilots' output (%s) and fix worker_init or the kiln path",
						m.failures, startBackoff, m.p.OutputFile("<job>")))
				}
			}
		}
	}
	paused := now.Before(m.pauseTill)
	// Idle blocks, newest first, are cancelled once idle for max_idle.
	sort.Slice(active, func(i, j int) bool { return active[i].Submitted.After(active[j].Submitted) })
	n := len(active)
	var cancel []slurm.Block
	for _, b := range active {
		if busy[b.ID] || queued > 0 {
			delete(m.idleSince, b.ID)
			continue
		}
		since, ok := m.idleSince[b.ID]
		if !ok {
			m.idleSince[b.ID] = now
			continue
		}
		if now.Sub(since) >= m.cfg.MaxIdle.Duration && n > max(want, m.cfg.MinBlocks) {
			cancel = append(cancel, b)
			m.cancelled[b.ID] = true
			delete(m.idleSince, b.ID)
			n--
		}
	}
	m.mu.Unlock()

	for range max(want-len(active), 0) {
		if paused {
			break
		}
		if err := m.submit(ctx); err != nil {
			m.s.cfg.Log.Error("submitting a block", "error", err)
			break
		}
	}
	if len(cancel) > 0 {
		for _, b := range cancel {
			m.s.workers.stopBlock(b.ID)
			m.s.cfg.Log.Info("cancelling an idle block", "block", b.ID, "job", b.JobID, "idle_for", m.cfg.MaxIdle.Duration)
		}
		if err := m.p.Cancel(ctx, cancel...); err != nil {
			m.s.cfg.Log.Error("cancelling idle blocks", "error", err)
		}
	}
}

// views lists the blocks for GET /v1/workers.
func (m *blockManager) views() []apitype.BlockView {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]apitype.BlockView, 0, len(m.blocks))
	for _, b := range m.blocks {
		out = append(out, apitype.BlockView{ID: b.ID, JobID: b.JobID, State: string(b.State), Nodes: b.Nodes, Reason: b.Reason, Submitted: b.Submitted})
	}
	return out
}

// blockCounts counts the blocks by state, for the metrics.
func (m *blockManager) blockCounts() map[string]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := maps.Clone(m.ended)
	for _, b := range m.blocks {
		if b.State.Active() {
			c[string(b.State)]++
		}
	}
	return c
}

// close cancels every active block: a stopped endpoint's pilots would
// otherwise hold their nodes until max_idle ends them, with no endpoint to
// serve.
func (m *blockManager) close() {
	var active []slurm.Block
	for _, b := range m.p.Blocks() {
		if b.State.Active() {
			active = append(active, b)
		}
	}
	if len(active) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m.s.cfg.Log.Info("cancelling the endpoint's blocks", "blocks", len(active))
	if err := m.p.Cancel(ctx, active...); err != nil {
		m.s.cfg.Log.Error("cancelling the endpoint's blocks (scancel them by hand: squeue --name "+slurm.JobName+")", "error", err)
	}
}

// remoteLoop runs while the provider is remote: it declares lost the
// workers that stopped answering, and scales the blocks.
func (s *Server) remoteLoop() {
	defer close(s.remoteDone)
	lost := time.NewTicker(max(s.workers.lostAfter/10, 50*time.Millisecond))
	defer lost.Stop()
	var scale <-chan time.Time
	if s.provider != nil {
		t := time.NewTicker(s.cfg.ScaleInterval)
		defer t.Stop()
		scale = t.C
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-s.stop
		cancel()
	}()
	var last time.Time
	var soon <-chan time.Time // a kicked scale, delayed to keep one a second
	scaleNow := func(now time.Time) {
		if s.provider != nil {
			s.provider.scale(ctx, now)
			last = now
		}
	}
	scaleNow(time.Now())
	for {
		select {
		case <-s.stop:
			return
		case now := <-lost.C:
			s.checkLost(now)
		case now := <-scale:
			scaleNow(now)
		case <-s.workers.scaleKick:
			// Tasks were queued: scale now rather than at the next tick,
			// at most once a second.
			if wait := time.Second - time.Since(last); wait > 0 {
				if soon == nil {
					soon = time.After(wait)
				}
			} else {
				scaleNow(time.Now())
			}
		case now := <-soon:
			soon = nil
			scaleNow(now)
		}
	}
}
