// Package endpoint serves registered Python functions over HTTP, running each task in a warm kiln VM from per-image pools, with queues and results kept in SQLite.
//
// The HTTP API is documented in docs/api.md. The pieces:
//   - Store: functions, tasks and results in SQLite (WAL); state changes
//     are guarded in SQL so that a result is written exactly once.
//   - scheduler: one FIFO per function, served round robin; per image (and
//     memory size) a pool of sandboxes that grows while tasks wait, up to
//     global caps on VMs and guest memory, and shrinks after an idle timeout.
//   - Server: the HTTP handlers, bearer-token auth, long-poll waits, metrics.
package endpoint

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
	"github.com/kiln-dev/kiln/internal/endpoint/slurm"
	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/vm"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// Defaults for Config.
const (
	DefaultListen       = "127.0.0.1:8470"
	DefaultIdleTimeout  = 5 * time.Minute
	DefaultMaxQueued    = 100_000
	DefaultMaxBatch     = 10_000
	DefaultMaxBody      = 32 << 20
	DefaultResultTTL    = 24 * time.Hour
	DefaultTimeout      = 5 * time.Minute
	DefaultMaxTimeout   = 24 * time.Hour
	DefaultMaxResult    = task.DefaultMaxResult
	DefaultMaxResultCap = 256 << 20
	DefaultMaxWait      = 5 * time.Minute
	TokenFile           = "token"
	DBFile              = "kiln.db"
)

// Config configures a Server. The zero value (plus a StateDir) is usable.
type Config struct {
	ImagesDir string // where image names are resolved
	StateDir  string // holds the database and the token file
	// Token is the bearer token; empty: read StateDir/token, creating it
	// on first start. NoAuth turns authentication off (loopback only).
	Token  string
	NoAuth bool

	MaxVMs       int // concurrent VMs; 0: the number of CPUs
	MaxMemoryMiB int // total guest memory; 0: 3/4 of the host's RAM
	PoolMax      int // VMs per image pool; 0: MaxVMs
	MinIdle      int // idle VMs a pool keeps past the idle timeout
	IdleTimeout  time.Duration

	MaxQueued int   // queued tasks before submissions get 429; 0: DefaultMaxQueued
	MaxBatch  int   // tasks per batch request
	MaxBody   int64 // request body bytes before 413
	ResultTTL time.Duration
	MaxWait   time.Duration // longest long-poll

	DefaultTimeout   time.Duration // a function's timeout when it gives none
	MaxTimeout       time.Duration
	DefaultMaxResult int // a function's max_result when it gives none
	MaxResultCap     int // the largest max_result a function may ask for

	// ShutdownGrace is how long Close lets running tasks finish before it
	// stops them (they are queued again and run after a restart).
	ShutdownGrace time.Duration
	// Paused accepts and stores tasks but dispatches none (maintenance).
	Paused bool

	VM  vm.Config // VM options; Image and MemoryMiB are set per pool
	Log *slog.Logger

	// Provider says where tasks run (ProviderLocal, ProviderSlurm,
	// ProviderWorkers); "" is ProviderLocal. With a remote provider the
	// endpoint starts no VMs: workers lease its tasks (docs/slurm.md).
	Provider string
	// Slurm configures ProviderSlurm (the [slurm] table of serve.toml).
	Slurm         slurm.Config
	SlurmCommands slurm.Commands // sbatch, squeue, sacct, scancel; "": on PATH
	// WorkerCommand is what a pilot job runs: kiln worker --endpoint URL
	// --token-file FILE (kiln serve builds it).
	WorkerCommand []string
	ConfigFile    string        // named in the pilot script's header
	ScaleInterval time.Duration // how often blocks are polled and scaled; 0: DefaultScaleInterval
	// WorkerHeartbeat and WorkerLostAfter: see apitype.WorkerHeartbeat
	// (tests shorten them).
	WorkerHeartbeat, WorkerLostAfter time.Duration

	// onChange, when set, is told of every task state change the
	// scheduler makes (the worker bridge's feed).
	onChange func(id string)
}

// remote reports whether workers run the tasks.
func (c *Config) remote() bool { return c.Provider == ProviderSlurm || c.Provider == ProviderWorkers }

func (c *Config) defaults() {
	if c.MaxVMs <= 0 {
		c.MaxVMs = runtime.NumCPU()
	}
	if c.MaxMemoryMiB <= 0 {
		c.MaxMemoryMiB = vmm.HostMemoryMiB() * 3 / 4
		if c.MaxMemoryMiB <= 0 {
			c.MaxMemoryMiB = 4096
		}
	}
	if c.PoolMax <= 0 || c.PoolMax > c.MaxVMs {
		c.PoolMax = c.MaxVMs
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.MaxQueued <= 0 {
		c.MaxQueued = DefaultMaxQueued
	}
	if c.MaxBatch <= 0 {
		c.MaxBatch = DefaultMaxBatch
	}
	if c.MaxBody <= 0 {
		c.MaxBody = DefaultMaxBody
	}
	if c.ResultTTL <= 0 {
		c.ResultTTL = DefaultResultTTL
	}
	if c.MaxWait <= 0 {
		c.MaxWait = DefaultMaxWait
	}
	if c.MaxTimeout <= 0 {
		c.MaxTimeout = DefaultMaxTimeout
	}
	if c.DefaultTimeout <= 0 {
		c.DefaultTimeout = min(DefaultTimeout, c.MaxTimeout)
	}
	if c.MaxResultCap <= 0 {
		c.MaxResultCap = DefaultMaxResultCap
	}
	if c.DefaultMaxResult <= 0 {
		c.DefaultMaxResult = min(DefaultMaxResult, c.MaxResultCap)
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Provider == "" {
		c.Provider = ProviderLocal
	}
	if c.ScaleInterval <= 0 {
		c.ScaleInterval = DefaultScaleInterval
	}
	if c.WorkerHeartbeat <= 0 {
		c.WorkerHeartbeat = apitype.WorkerHeartbeat
	}
	if c.WorkerLostAfter <= 0 {
		c.WorkerLostAfter = apitype.WorkerLostAfter
	}
	if c.ImagesDir != "" {
		if abs, err := filepath.Abs(c.ImagesDir); err == nil {
			c.ImagesDir = abs
		}
	}
}

// Server is a running endpoint: store, scheduler and HTTP handlers.
type Server struct {
	cfg    Config
	store  *Store
	sched  *scheduler
	images *images
	m      *metrics
	w      *waiters
	token  string
	stop   chan struct{}
	done   chan struct{}
	closed sync.Once

	workers    *workers
	provider   *blockManager // ProviderSlurm's blocks, else nil
	remoteDone chan struct{} // closed when remoteLoop ends; nil when local
}

// New opens the store in cfg.StateDir, handles the tasks a previous
// endpoint left running (see Store.Recover), queues the queued ones again
// and starts the scheduler.
func New(cfg Config) (_ *Server, err error) {
	cfg.defaults()
	if cfg.StateDir == "" {
		return nil, errors.New("endpoint: no state directory given (set --state or $KILN_STATE)")
	}
	if !slices.Contains(Providers, cfg.Provider) {
		return nil, fmt.Errorf("provider %q: want one of %s", cfg.Provider, strings.Join(Providers, ", "))
	}
	if err := privateStateDir(cfg.StateDir); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, images: newImages(cfg.ImagesDir), m: newMetrics(), w: newWaiters(), stop: make(chan struct{}), done: make(chan struct{})}
	if !cfg.NoAuth {
		s.token = cfg.Token
		if s.token == "" {
			if s.token, _, err = LoadOrCreateToken(cfg.StateDir); err != nil {
				return nil, err
			}
		}
	}
	s.store, err = OpenStore(filepath.Join(cfg.StateDir, DBFile))
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			s.store.Close()
		}
	}()
	ctx := context.Background()
	req, failed, err := s.store.Recover(ctx, time.Now(), cfg.ResultTTL)
	if err != nil {
		return nil, err
	}
	if req+failed > 0 {
		cfg.Log.Warn("the endpoint had stopped while tasks were running", "requeued", req, "failed", failed)
	}
	if _, err := s.store.Expire(ctx, time.Now()); err != nil {
		return nil, err
	}
	s.sched = newScheduler(&s.cfg, s.store, s.images, s.m, s.notify)
	s.workers = newWorkers(s)
	if cfg.remote() {
		s.sched.remote = s.workers.signal
	}
	s.m.watch(s.gauges)
	queued, err := s.store.Queued(ctx)
	if err != nil {
		return nil, err
	}
	fns := map[string]*Function{}
	for _, q := range queued {
		fn := fns[q.FunctionID]
		if fn == nil {
			if fn, err = s.store.Function(ctx, q.FunctionID); err != nil {
				return nil, fmt.Errorf("loading function %s of queued task %s: %w", q.FunctionID, q.ID, err)
			}
			fns[q.FunctionID] = fn
		}
		s.sched.enqueueLocked(fn, qitem{id: q.ID, enq: q.Created})
	}
	if len(queued) > 0 {
		cfg.Log.Info("queued tasks from before the restart", "tasks", len(queued))
	}
	if cfg.Provider == ProviderSlurm {
		if s.provider, err = startSlurm(ctx, s); err != nil {
			return nil, err
		}
	}
	s.sched.start()
	s.sched.poke()
	go s.janitor()
	if cfg.remote() {
		s.remoteDone = make(chan struct{})
		go s.remoteLoop()
	}
	return s, nil
}

// privateStateDir creates dir (0700) or makes an existing one private, and
// its files 0600: the database holds function sources, arguments and
// results, and the token file the key to all of it. SQLite creates its -wal
// and -shm files with the database file's mode, so the database file is
// created (or fixed) before the store opens it.
func privateStateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("making state directory %s private: %w", dir, err)
	}
	db := filepath.Join(dir, DBFile)
	f, err := os.OpenFile(db, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("creating task store: %w", err)
	}
	f.Close()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("reading state directory: %w", err)
	}
	for _, e := range ents {
		if e.Type().IsRegular() {
			if err := os.Chmod(filepath.Join(dir, e.Name()), 0o600); err != nil {
				return fmt.Errorf("making %s private: %w", e.Name(), err)
			}
		}
	}
	return nil
}

// notify wakes the waiters of task id (and the worker bridge).
func (s *Server) notify(id string) {
	s.w.notify(id)
	if s.cfg.onChange != nil {
		s.cfg.onChange(id)
	}
}

// Token returns the bearer token clients must send ("" with NoAuth).
func (s *Server) Token() string { return s.token }

// Config returns the effective configuration (defaults filled in).
func (s *Server) Config() Config { return s.cfg }

// Store returns the server's task store.
func (s *Server) Store() *Store { return s.store }

func (s *Server) janitor() {
	defer close(s.done)
	t := time.NewTicker(min(time.Minute, max(s.cfg.ResultTTL/4, time.Second)))
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			if n, err := s.store.Expire(context.Background(), now); err != nil {
				s.cfg.Log.Error("expiring results", "error", err)
			} else if n > 0 {
				s.cfg.Log.Debug("expired results", "tasks", n)
			}
		}
	}
}

// Close stops the scheduler (see Config.ShutdownGrace), closes every VM and
// the store.
func (s *Server) Close() error {
	var err error
	s.closed.Do(func() {
		close(s.stop)
		<-s.done
		if s.remoteDone != nil {
			<-s.remoteDone
		}
		if s.provider != nil {
			s.provider.close()
		}
		s.sched.close(s.cfg.ShutdownGrace)
		s.w.closeAll()
		err = s.store.Close()
	})
	return err
}

// Serve serves the API on ln until ctx is done, then shuts the HTTP server
// down (waiting up to 5 s for requests) and returns. It does not Close s.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 30 * time.Second, ErrorLog: slog.NewLogLogger(s.cfg.Log.Handler(), slog.LevelWarn)}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.w.closeAll() // end long polls
	if err := hs.Shutdown(sctx); err != nil {
		hs.Close()
	}
	<-errc
	return nil
}

// CheckListen refuses to serve without authentication on an address that
// is not loopback.
func CheckListen(addr string, auth bool) error {
	if auth {
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("listen address %q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("refusing to listen on %s without a token: any host could run code; drop --insecure-no-auth or listen on 127.0.0.1", addr)
	}
	return nil
}

// LoadOrCreateToken reads dir/token, or creates it (mode 0600) with a new
// random token; created says which.
func LoadOrCreateToken(dir string) (token string, created bool, err error) {
	p := filepath.Join(dir, TokenFile)
	if b, err := os.ReadFile(p); err == nil {
		st, err := os.Stat(p)
		if err != nil {
			return "", false, fmt.Errorf("reading token file: %w", err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			return "", false, fmt.Errorf("token file %s is readable by other users (mode %o): run chmod 600 %s", p, st.Mode().Perm(), p)
		}
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", false, fmt.Errorf("token file %s is empty: delete it to get a new token", p)
		}
		return tok, false, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", false, fmt.Errorf("reading token file: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", false, fmt.Errorf("creating state directory: %w", err)
	}
	var b [32]byte
	rand.Read(b[:])
	tok := hex.EncodeToString(b[:])
	f, err := os.CreateTemp(dir, ".token-*")
	if err != nil {
		return "", false, fmt.Errorf("creating token file: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return "", false, fmt.Errorf("creating token file: %w", err)
	}
	if _, err := f.WriteString(tok + "\n"); err != nil {
		f.Close()
		return "", false, fmt.Errorf("writing token file: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", false, fmt.Errorf("writing token file: %w", err)
	}
	// Link, not rename: a concurrent first start keeps the winner's token.
	if err := os.Link(tmp, p); err != nil {
		if errors.Is(err, os.ErrExist) {
			return LoadOrCreateToken(dir)
		}
		return "", false, fmt.Errorf("creating token file: %w", err)
	}
	return tok, true, nil
}

// waiters wakes long polls when tasks finish.
type waiters struct {
	mu     sync.Mutex
	m      map[string]map[*waiter]struct{}
	closed bool
}

type waiter struct {
	ch   chan struct{}
	once sync.Once
}

func (w *waiter) fire() { w.once.Do(func() { close(w.ch) }) }

func newWaiters() *waiters { return &waiters{m: map[string]map[*waiter]struct{}{}} }

// add registers one waiter for ids; it fires when any of them finishes.
func (ws *waiters) add(ids []string) (*waiter, func()) {
	w := &waiter{ch: make(chan struct{})}
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if ws.closed {
		w.fire()
		return w, func() {}
	}
	for _, id := range ids {
		set := ws.m[id]
		if set == nil {
			set = map[*waiter]struct{}{}
			ws.m[id] = set
		}
		set[w] = struct{}{}
	}
	return w, func() {
		ws.mu.Lock()
		defer ws.mu.Unlock()
		for _, id := range ids {
			if set := ws.m[id]; set != nil {
				delete(set, w)
				if len(set) == 0 {
					delete(ws.m, id)
				}
			}
		}
	}
}

// anyTask is the key of waiters woken by every task's state change (group
// waits, which then read what changed).
const anyTask = "*"

func (ws *waiters) notify(id string) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	for w := range ws.m[id] {
		w.fire()
	}
	for w := range ws.m[anyTask] {
		w.fire()
	}
}

func (ws *waiters) closeAll() {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	ws.closed = true
	for _, set := range ws.m {
		for w := range set {
			w.fire()
		}
	}
}
