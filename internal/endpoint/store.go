package endpoint

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
	"github.com/kiln-dev/kiln/internal/guest/task"
)

// RestartReason is the error of a task that was running when the endpoint died.
const RestartReason = "endpoint restarted while the task was running"

// ErrNotFound is returned for an unknown (or expired) function or task.
var ErrNotFound = errors.New("not found")

// Function is a registered function: what to call, in which image, with which limits.
type Function struct {
	ID          string     `json:"id"`
	Name        string     `json:"name"`
	Kind        string     `json:"kind"` // source | pickle | ref
	Source      string     `json:"source,omitempty"`
	Entry       string     `json:"function,omitempty"` // name to call in Source
	Module      string     `json:"module,omitempty"`   // where Source was written: module, file, line
	Filename    string     `json:"filename,omitempty"`
	Lineno      int        `json:"lineno,omitempty"`
	Namespace   []task.Def `json:"namespace,omitempty"` // what the function uses from its module
	ExactTypes  bool       `json:"exact_types,omitempty"`
	Command     string     `json:"command,omitempty"` // a shell function's command template
	Walltime    float64    `json:"walltime,omitempty"`
	Ref         string     `json:"ref,omitempty"`
	Pickle      []byte     `json:"pickle,omitempty"`
	Pickler     string     `json:"pickler,omitempty"`
	Image       string     `json:"image"`        // as given at registration
	ImagePath   string     `json:"image_path"`   // resolved file
	ImageDigest string     `json:"image_digest"` // digest at registration
	TimeoutMS   int64      `json:"timeout_ms"`
	MemoryMiB   int        `json:"memory_mib"`
	MaxResult   int        `json:"max_result"`
	MaxRetries  int        `json:"max_retries"`
	Created     time.Time  `json:"created_at"`
}

// Timeout returns the function's per-task time limit.
func (f *Function) Timeout() time.Duration { return time.Duration(f.TimeoutMS) * time.Millisecond }

// TaskRecord is a task row.
type TaskRecord struct {
	Seq        int64
	ID         string
	FunctionID string
	State      string
	Args       json.RawMessage // a task.Value, or nil
	Kwargs     json.RawMessage
	Attempts   int
	// Completions counts guarded transitions out of running into a final
	// state; it is 1 for every finished task that ran.
	Completions int
	Created     time.Time
	Started     time.Time
	Finished    time.Time
	Result      json.RawMessage // a task.Result without its id, or nil
	Error       string
	ErrorCode   string
	TaskGroup   string
	EventSeq    int64  // the last state change's sequence number
	Worker      string // where it ran, when a provider's worker ran it
}

// Store keeps functions, tasks and results in SQLite (WAL mode).
type Store struct {
	db *sql.DB
	// The statements of every task's path, parsed once.
	markRunning, complete, requeue, task, groupEvents *sql.Stmt

	// Steps waiting for the writer (see Step), and the writer's state.
	stepMu     sync.Mutex
	stepCond   *sync.Cond
	steps      []Step
	stepsSince time.Time // when the oldest of steps was queued
	stepClosed bool
	writerDone chan struct{}
}

const schema = `
CREATE TABLE IF NOT EXISTS functions (
	id         TEXT PRIMARY KEY,
	created_ns INTEGER NOT NULL,
	body       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
	seq         INTEGER PRIMARY KEY AUTOINCREMENT,
	id          TEXT NOT NULL UNIQUE,
	function_id TEXT NOT NULL REFERENCES functions(id),
	state       TEXT NOT NULL,
	args        TEXT,
	kwargs      TEXT,
	attempts    INTEGER NOT NULL DEFAULT 0,
	completions INTEGER NOT NULL DEFAULT 0,
	created_ns  INTEGER NOT NULL,
	started_ns  INTEGER NOT NULL DEFAULT 0,
	finished_ns INTEGER NOT NULL DEFAULT 0,
	expires_ns  INTEGER NOT NULL DEFAULT 0,
	result      TEXT,
	error       TEXT NOT NULL DEFAULT '',
	error_code  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state, seq);
CREATE INDEX IF NOT EXISTS tasks_function ON tasks(function_id, seq);
CREATE INDEX IF NOT EXISTS tasks_expires ON tasks(expires_ns) WHERE expires_ns > 0;
`

// columns are added to the tasks table of stores made by an older kiln.
var columns = []struct{ name, decl string }{
	{"task_group", "TEXT NOT NULL DEFAULT ''"},
	// event_seq orders state changes (running, finished, requeued): a
	// group's waiters read what changed after the last one they saw.
	{"event_seq", "INTEGER NOT NULL DEFAULT 0"},
	// worker names where a task ran when a provider's worker ran it.
	{"worker", "TEXT NOT NULL DEFAULT ''"},
}

// migrate adds the columns an older store lacks, and their indexes.
func migrate(db *sql.DB) error {
	have := map[string]bool{}
	rows, err := db.Query(`SELECT name FROM pragma_table_info('tasks')`)
	if err != nil {
		return err
	}
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return err
		}
		have[n] = true
	}
	rows.Close()
	for _, c := range columns {
		if !have[c.name] {
			if _, err := db.Exec(`ALTER TABLE tasks ADD COLUMN ` + c.name + ` ` + c.decl); err != nil {
				return err
			}
		}
	}
	for _, ix := range []string{
		`CREATE INDEX IF NOT EXISTS tasks_group ON tasks(task_group, seq) WHERE task_group != ''`,
		`CREATE INDEX IF NOT EXISTS tasks_group_events ON tasks(task_group, event_seq) WHERE task_group != ''`,
		`CREATE INDEX IF NOT EXISTS tasks_events ON tasks(event_seq)`,
	} {
		if _, err := db.Exec(ix); err != nil {
			return err
		}
	}
	return nil
}

// nextEvent is the SQL expression of the next event sequence number.
const nextEvent = `(SELECT COALESCE(MAX(event_seq), 0) + 1 FROM tasks)`

// OpenStore opens (creating if needed) the database at path.
func OpenStore(path string) (*Store, error) {
	q := url.Values{}
	for _, p := range []string{"busy_timeout(10000)", "journal_mode(WAL)", "synchronous(NORMAL)", "foreign_keys(1)"} {
		q.Add("_pragma", p)
	}
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("opening task store %s: %w", path, err)
	}
	// One connection: SQLite serializes writers anyway, and a single
	// connection rules out SQLITE_BUSY on read-to-write upgrades.
	db.SetMaxOpenConns(1)
	var mode string
	if err := db.QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil {
		db.Close()
		return nil, fmt.Errorf("opening task store %s: %w", path, err)
	}
	if mode != "wal" {
		db.Close()
		return nil, fmt.Errorf("opening task store %s: journal mode is %q, want wal (is the state directory on a filesystem that supports shared memory?)", path, mode)
	}
	if _, err := db.Exec(schema); err != nil {
		db.Close()
		return nil, fmt.Errorf("creating task store schema in %s: %w", path, err)
	}
	if err := migrate(db); err != nil {
		db.Close()
		return nil, fmt.Errorf("upgrading task store %s: %w", path, err)
	}
	s := &Store{db: db, writerDone: make(chan struct{})}
	s.stepCond = sync.NewCond(&s.stepMu)
	for _, p := range []struct {
		dst **sql.Stmt
		sql string
	}{
		{&s.markRunning, markRunningSQL},
		{&s.complete, completeSQL},
		{&s.requeue, requeueSQL},
		{&s.task, `SELECT ` + taskCols + ` FROM tasks WHERE id = ?`},
		{&s.groupEvents, `SELECT ` + taskCols + ` FROM tasks WHERE task_group = ? AND event_seq > ? ORDER BY event_seq LIMIT ?`},
	} {
		if *p.dst, err = db.Prepare(p.sql); err != nil {
			db.Close()
			return nil, fmt.Errorf("preparing task store statements in %s: %w", path, err)
		}
	}
	go s.writer()
	return s, nil
}

// Close writes the steps still queued, then closes the database.
func (s *Store) Close() error {
	s.stepMu.Lock()
	s.stepClosed = true
	s.stepCond.Broadcast()
	s.stepMu.Unlock()
	<-s.writerDone
	return s.db.Close()
}

// Step is one task's end and the next one's start on a VM, as Advance
// does, queued to be written together with other steps in one
// transaction: a commit per task cost more than a small task.
type Step struct {
	Done    string     // the task that ended ("" for none)
	C       Completion // its outcome
	Requeue bool       // queue Done again (a retry) instead of completing it
	Next    string     // the queued task that starts ("" for none)
	Worker  string     // where Next runs, when a provider's worker runs it
	Now     time.Time
	TTL     time.Duration
	// Then, when set, is called with what was written, on the writer's
	// goroutine, in the order of the steps.
	Then func(StepResult)
}

// StepResult says what a Step changed: each change is guarded as on its own.
type StepResult struct {
	Completed, Requeued, Started bool
	Err                          error
}

// maxSteps bounds the steps of one transaction.
const maxSteps = 512

// Step queues st for the writer and returns at once. Steps are written in
// the order they were queued; a reader may see a step's effects only after
// its Then ran. Steps queued before Close are written before Close returns.
func (s *Store) Step(st Step) {
	s.stepMu.Lock()
	defer s.stepMu.Unlock()
	if s.stepClosed {
		if st.Then != nil {
			go st.Then(StepResult{Err: errors.New("the task store is closed")})
		}
		return
	}
	if len(s.steps) == 0 {
		s.stepsSince = time.Now()
	}
	s.steps = append(s.steps, st)
	s.stepCond.Signal()
}

// commitDelay is how long the writer lets steps gather before it writes
// fewer than a transaction's worth (Postgres's commit_delay): a stream of
// completions is then written a few hundred to a commit, sharing the
// pages each commit writes to the WAL, instead of one or two at a time.
const commitDelay = 2 * time.Millisecond

// writer writes the queued steps, as many per transaction as are waiting.
func (s *Store) writer() {
	defer close(s.writerDone)
	for {
		s.stepMu.Lock()
		for len(s.steps) == 0 && !s.stepClosed {
			s.stepCond.Wait()
		}
		if len(s.steps) == 0 {
			s.stepMu.Unlock()
			return
		}
		if wait := commitDelay - time.Since(s.stepsSince); wait > 0 && len(s.steps) < maxSteps && !s.stepClosed {
			s.stepMu.Unlock()
			time.Sleep(wait)
			s.stepMu.Lock()
		}
		n := min(len(s.steps), maxSteps)
		batch := slices.Clone(s.steps[:n])
		clear(s.steps[:n])
		s.steps = s.steps[n:]
		s.stepMu.Unlock()
		res := s.writeSteps(batch)
		for i, st := range batch {
			if st.Then != nil {
				st.Then(res[i])
			}
		}
	}
}

func (s *Store) writeSteps(batch []Step) []StepResult {
	res := make([]StepResult, len(batch))
	fail := func(err error) []StepResult {
		for i := range res {
			res[i] = StepResult{Err: err}
		}
		return res
	}
	ctx := context.Background()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fail(fmt.Errorf("writing task steps: %w", err))
	}
	defer tx.Rollback()
	complete, requeue, start := tx.Stmt(s.complete), tx.Stmt(s.requeue), tx.Stmt(s.markRunning)
	changed := func(r sql.Result, err error) (bool, error) {
		if err != nil {
			return false, err
		}
		n, err := r.RowsAffected()
		return n == 1, err
	}
	for i, st := range batch {
		r := &res[i]
		switch {
		case st.Done != "" && st.Requeue:
			r.Requeued, r.Err = changed(requeue.Exec(st.Done))
		case st.Done != "":
			c := st.C
			r.Completed, r.Err = changed(complete.Exec(c.State, nullJSON(c.Result), c.Error, c.ErrorCode, st.Now.UnixNano(), expiry(st.Now, st.TTL), st.Done))
		}
		if st.Next != "" && r.Err == nil {
			r.Started, r.Err = changed(start.Exec(st.Now.UnixNano(), st.Worker, st.Next))
		}
	}
	if err := tx.Commit(); err != nil {
		return fail(fmt.Errorf("writing task steps: %w", err))
	}
	return res
}

// PutFunction stores f; a function with the same ID is kept as it is
// (function IDs are content addresses).
func (s *Store) PutFunction(ctx context.Context, f *Function) error {
	b, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("encoding function: %w", err)
	}
	_, err = s.db.ExecContext(ctx, `INSERT OR IGNORE INTO functions(id, created_ns, body) VALUES(?, ?, ?)`, f.ID, f.Created.UnixNano(), string(b))
	if err != nil {
		return fmt.Errorf("storing function: %w", err)
	}
	return nil
}

// Function returns the function with id, or ErrNotFound.
func (s *Store) Function(ctx context.Context, id string) (*Function, error) {
	var body string
	err := s.db.QueryRowContext(ctx, `SELECT body FROM functions WHERE id = ?`, id).Scan(&body)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("reading function: %w", err)
	}
	var f Function
	if err := json.Unmarshal([]byte(body), &f); err != nil {
		return nil, fmt.Errorf("decoding stored function %s: %w", id, err)
	}
	return &f, nil
}

// Functions lists every function, oldest first.
func (s *Store) Functions(ctx context.Context) ([]*Function, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT body FROM functions ORDER BY created_ns, id`)
	if err != nil {
		return nil, fmt.Errorf("listing functions: %w", err)
	}
	defer rows.Close()
	var out []*Function
	for rows.Next() {
		var body string
		if err := rows.Scan(&body); err != nil {
			return nil, fmt.Errorf("listing functions: %w", err)
		}
		var f Function
		if err := json.Unmarshal([]byte(body), &f); err != nil {
			return nil, fmt.Errorf("decoding stored function: %w", err)
		}
		out = append(out, &f)
	}
	return out, rows.Err()
}

// NewTask is a task to insert.
type NewTask struct {
	ID         string
	FunctionID string
	Args       json.RawMessage
	Kwargs     json.RawMessage
	TaskGroup  string
}

// InsertTasks adds queued tasks in one transaction and returns their
// sequence numbers.
func (s *Store) InsertTasks(ctx context.Context, now time.Time, ts []NewTask) ([]int64, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("inserting tasks: %w", err)
	}
	defer tx.Rollback()
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO tasks(id, function_id, state, args, kwargs, created_ns, task_group) VALUES(?, ?, 'queued', ?, ?, ?, ?)`)
	if err != nil {
		return nil, fmt.Errorf("inserting tasks: %w", err)
	}
	defer stmt.Close()
	seqs := make([]int64, len(ts))
	for i, t := range ts {
		r, err := stmt.ExecContext(ctx, t.ID, t.FunctionID, nullJSON(t.Args), nullJSON(t.Kwargs), now.UnixNano(), t.TaskGroup)
		if err != nil {
			return nil, fmt.Errorf("inserting task: %w", err)
		}
		if seqs[i], err = r.LastInsertId(); err != nil {
			return nil, fmt.Errorf("inserting task: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("inserting tasks: %w", err)
	}
	return seqs, nil
}

func nullJSON(b json.RawMessage) any {
	if len(b) == 0 {
		return nil
	}
	return string(b)
}

const taskCols = `seq, id, function_id, state, args, kwargs, attempts, completions, created_ns, started_ns, finished_ns, result, error, error_code, task_group, event_seq, worker`

type scanner interface{ Scan(...any) error }

func scanTask(r scanner) (*TaskRecord, error) {
	var t TaskRecord
	var args, kwargs, result sql.NullString
	var created, started, finished int64
	if err := r.Scan(&t.Seq, &t.ID, &t.FunctionID, &t.State, &args, &kwargs, &t.Attempts, &t.Completions, &created, &started, &finished, &result, &t.Error, &t.ErrorCode, &t.TaskGroup, &t.EventSeq, &t.Worker); err != nil {
		return nil, err
	}
	if args.Valid {
		t.Args = json.RawMessage(args.String)
	}
	if kwargs.Valid {
		t.Kwargs = json.RawMessage(kwargs.String)
	}
	if result.Valid {
		t.Result = json.RawMessage(result.String)
	}
	t.Created = fromNS(created)
	t.Started = fromNS(started)
	t.Finished = fromNS(finished)
	return &t, nil
}

func fromNS(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// Task returns the task with id, or ErrNotFound.
func (s *Store) Task(ctx context.Context, id string) (*TaskRecord, error) {
	t, err := scanTask(s.task.QueryRowContext(ctx, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("reading task: %w", err)
	}
	return t, nil
}

// TaskFilter selects tasks for Tasks.
type TaskFilter struct {
	State      string
	FunctionID string
	TaskGroup  string
	After      int64 // sequence number to continue after
	Limit      int
}

// Tasks lists tasks in submission order.
func (s *Store) Tasks(ctx context.Context, f TaskFilter) ([]*TaskRecord, error) {
	var where []string
	var args []any
	if f.State != "" {
		where = append(where, "state = ?")
		args = append(args, f.State)
	}
	if f.FunctionID != "" {
		where = append(where, "function_id = ?")
		args = append(args, f.FunctionID)
	}
	if f.TaskGroup != "" {
		where = append(where, "task_group = ?")
		args = append(args, f.TaskGroup)
	}
	where = append(where, "seq > ?")
	args = append(args, f.After)
	if f.Limit <= 0 {
		f.Limit = 100
	}
	args = append(args, f.Limit)
	rows, err := s.db.QueryContext(ctx, `SELECT `+taskCols+` FROM tasks WHERE `+strings.Join(where, " AND ")+` ORDER BY seq LIMIT ?`, args...)
	if err != nil {
		return nil, fmt.Errorf("listing tasks: %w", err)
	}
	defer rows.Close()
	var out []*TaskRecord
	for rows.Next() {
		t, err := scanTask(rows)
		if err != nil {
			return nil, fmt.Errorf("listing tasks: %w", err)
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

// Counts returns the number of tasks in each state.
func (s *Store) Counts(ctx context.Context) (map[string]int, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT state, COUNT(*) FROM tasks GROUP BY state`)
	if err != nil {
		return nil, fmt.Errorf("counting tasks: %w", err)
	}
	defer rows.Close()
	out := map[string]int{}
	for _, st := range apitype.States {
		out[st] = 0
	}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return nil, fmt.Errorf("counting tasks: %w", err)
		}
		out[st] = n
	}
	return out, rows.Err()
}

// The guarded state changes of a task starting and finishing.
const (
	markRunningSQL = `UPDATE tasks SET state = 'running', attempts = attempts + 1, started_ns = ?, worker = ?, event_seq = ` + nextEvent + ` WHERE id = ? AND state = 'queued'`
	completeSQL    = `UPDATE tasks SET state = ?, result = ?, error = ?, error_code = ?, finished_ns = ?, expires_ns = ?, completions = completions + 1, event_seq = ` + nextEvent + `
		WHERE id = ? AND state = 'running'`
	requeueSQL = `UPDATE tasks SET state = 'queued', started_ns = 0, event_seq = ` + nextEvent + ` WHERE id = ? AND state = 'running'`
)

// MarkRunning moves a queued task to running and counts the attempt. It
// reports false when the task was not queued (cancelled meanwhile).
func (s *Store) MarkRunning(ctx context.Context, id string, now time.Time) (bool, error) {
	r, err := s.markRunning.ExecContext(ctx, now.UnixNano(), "", id)
	if err != nil {
		return false, fmt.Errorf("starting task: %w", err)
	}
	n, err := r.RowsAffected()
	return n == 1, err
}

// Completion is the final outcome of a running task.
type Completion struct {
	State     string          // succeeded, failed or cancelled
	Result    json.RawMessage // may be nil
	Error     string
	ErrorCode string
}

// Complete writes a running task's outcome exactly once: the update is
// guarded by state = 'running', so a second completion reports false and
// changes nothing.
func (s *Store) Complete(ctx context.Context, id string, c Completion, now time.Time, ttl time.Duration) (bool, error) {
	r, err := s.complete.ExecContext(ctx, c.State, nullJSON(c.Result), c.Error, c.ErrorCode, now.UnixNano(), expiry(now, ttl), id)
	if err != nil {
		return false, fmt.Errorf("completing task: %w", err)
	}
	n, err := r.RowsAffected()
	return n == 1, err
}

func expiry(now time.Time, ttl time.Duration) int64 {
	if ttl <= 0 {
		return 0
	}
	return now.Add(ttl).UnixNano()
}

// Requeue moves a running task back to queued (a retry after a VM failure,
// or a task interrupted by a shutdown).
func (s *Store) Requeue(ctx context.Context, id string) (bool, error) {
	r, err := s.requeue.ExecContext(ctx, id)
	if err != nil {
		return false, fmt.Errorf("requeueing task: %w", err)
	}
	n, err := r.RowsAffected()
	return n == 1, err
}

// CancelQueued cancels a queued task; it reports false when the task was
// not queued.
func (s *Store) CancelQueued(ctx context.Context, id string, now time.Time, ttl time.Duration) (bool, error) {
	r, err := s.db.ExecContext(ctx, `UPDATE tasks SET state = 'cancelled', error = 'cancelled before it ran', error_code = 'cancelled', finished_ns = ?, expires_ns = ?, event_seq = `+nextEvent+` WHERE id = ? AND state = 'queued'`,
		now.UnixNano(), expiry(now, ttl), id)
	if err != nil {
		return false, fmt.Errorf("cancelling task: %w", err)
	}
	n, err := r.RowsAffected()
	return n == 1, err
}

// Recover handles the tasks a dead endpoint left running: each is queued
// again when its function allows another attempt (attempts <= max_retries),
// and failed with RestartReason otherwise. It returns how many tasks were
// requeued and failed.
func (s *Store) Recover(ctx context.Context, now time.Time, ttl time.Duration) (requeued, failed int, err error) {
	rows, err := s.db.QueryContext(ctx, `SELECT t.id, t.attempts, f.body FROM tasks t JOIN functions f ON f.id = t.function_id WHERE t.state = 'running'`)
	if err != nil {
		return 0, 0, fmt.Errorf("recovering running tasks: %w", err)
	}
	type rt struct {
		id       string
		attempts int
		retries  int
	}
	var ts []rt
	for rows.Next() {
		var x rt
		var body string
		if err := rows.Scan(&x.id, &x.attempts, &body); err != nil {
			rows.Close()
			return 0, 0, fmt.Errorf("recovering running tasks: %w", err)
		}
		var f Function
		if json.Unmarshal([]byte(body), &f) == nil {
			x.retries = f.MaxRetries
		}
		ts = append(ts, x)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, 0, fmt.Errorf("recovering running tasks: %w", err)
	}
	for _, x := range ts {
		if x.attempts <= x.retries {
			if _, err := s.Requeue(ctx, x.id); err != nil {
				return requeued, failed, err
			}
			requeued++
			continue
		}
		if _, err := s.Complete(ctx, x.id, Completion{State: apitype.StateFailed, Error: RestartReason, ErrorCode: apitype.CodeEndpointRestarted}, now, ttl); err != nil {
			return requeued, failed, err
		}
		failed++
	}
	return requeued, failed, nil
}

// GroupEvents returns the tasks of group whose state changed after the
// event sequence number after, in event order, at most limit.
func (s *Store) GroupEvents(ctx context.Context, group string, after int64, limit int) ([]*TaskRecord, error) {
	rows, err := s.groupEvents.QueryContext(ctx, group, after, limit)
	if err != nil {
		return nil, fmt.Errorf("reading task group events: %w", err)
	}
	defer rows.Close()
	var out []*TaskRecord
	for rows.Next() {
		t, err := scanTask(rows)
		if err != nil {
			return nil, fmt.Errorf("reading task group events: %w", err)
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

// QueuedTask is a queued task as the scheduler needs it.
type QueuedTask struct {
	Seq        int64
	ID         string
	FunctionID string
	Created    time.Time
}

// Queued lists every queued task in submission order.
func (s *Store) Queued(ctx context.Context) ([]QueuedTask, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT seq, id, function_id, created_ns FROM tasks WHERE state = 'queued' ORDER BY seq`)
	if err != nil {
		return nil, fmt.Errorf("listing queued tasks: %w", err)
	}
	defer rows.Close()
	var out []QueuedTask
	for rows.Next() {
		var q QueuedTask
		var ns int64
		if err := rows.Scan(&q.Seq, &q.ID, &q.FunctionID, &ns); err != nil {
			return nil, fmt.Errorf("listing queued tasks: %w", err)
		}
		q.Created = fromNS(ns)
		out = append(out, q)
	}
	return out, rows.Err()
}

// Expire deletes finished tasks whose results expired before now.
func (s *Store) Expire(ctx context.Context, now time.Time) (int64, error) {
	r, err := s.db.ExecContext(ctx, `DELETE FROM tasks WHERE expires_ns > 0 AND expires_ns <= ?`, now.UnixNano())
	if err != nil {
		return 0, fmt.Errorf("expiring results: %w", err)
	}
	return r.RowsAffected()
}

// TasksByID returns the tasks with the given ids that exist, by id.
func (s *Store) TasksByID(ctx context.Context, ids []string) (map[string]*TaskRecord, error) {
	out := make(map[string]*TaskRecord, len(ids))
	for len(ids) > 0 {
		n := min(len(ids), 500)
		chunk := ids[:n]
		ids = ids[n:]
		args := make([]any, len(chunk))
		for i, id := range chunk {
			args[i] = id
		}
		rows, err := s.db.QueryContext(ctx, `SELECT `+taskCols+` FROM tasks WHERE id IN (?`+strings.Repeat(",?", len(chunk)-1)+`)`, args...)
		if err != nil {
			return nil, fmt.Errorf("reading tasks: %w", err)
		}
		for rows.Next() {
			t, err := scanTask(rows)
			if err != nil {
				rows.Close()
				return nil, fmt.Errorf("reading tasks: %w", err)
			}
			out[t.ID] = t
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("reading tasks: %w", err)
		}
	}
	return out, nil
}
