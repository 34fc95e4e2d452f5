// Package apitype holds the wire types of kiln serve's HTTP API: request and response bodies, task states and error codes, shared by the server and its clients.
//
// docs/api.md describes the same API for people; python/kiln mirrors these
// names, and a test holds the SDK's error codes to ErrorCodes.
package apitype

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/task"
)

// Version is the API version prefix.
const Version = "v1"

// Error codes of JSON error bodies (ErrorBody.Code).
const (
	ErrCodeBadRequest      = "bad_request"
	ErrCodeUnauthorized    = "unauthorized"
	ErrCodeNotFound        = "not_found"
	ErrCodeUnknownFunction = "unknown_function"
	ErrCodeUnknownImage    = "unknown_image"
	ErrCodeUnknownTask     = "unknown_task"
	ErrCodeBadImage        = "bad_image"
	ErrCodeTooLarge        = "too_large"
	ErrCodeQueueFull       = "queue_full"
	ErrCodeInternal        = "internal"
)

// ErrorBody is the JSON body of every error response.
type ErrorBody struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// Task states.
const (
	StateQueued    = "queued"
	StateRunning   = "running"
	StateSucceeded = "succeeded"
	StateFailed    = "failed"
	StateCancelled = "cancelled"
)

// States lists every task state, in lifecycle order.
var States = []string{StateQueued, StateRunning, StateSucceeded, StateFailed, StateCancelled}

// Finished reports whether a task in state will not change any more.
func Finished(state string) bool {
	return state == StateSucceeded || state == StateFailed || state == StateCancelled
}

// Error codes of failed or cancelled tasks (TaskView.ErrorCode) beyond the
// task failure kinds of package task, which are error codes too.
const (
	CodeCancelled         = StateCancelled       // cancelled while running
	CodeEndpointRestarted = "endpoint_restarted" // the endpoint stopped while the task ran
	CodeImageChanged      = "image_changed"      // the image file changed since registration
	CodeInternal          = ErrCodeInternal      // the endpoint failed (its log says why)
	CodeWorkerLost        = "worker_lost"        // the worker running it stopped answering, and no retry was left
)

// ErrorCodes lists every TaskView.ErrorCode: the task failure kinds, then
// the endpoint's own codes.
var ErrorCodes = append(append([]string(nil), task.ErrorKinds...), CodeCancelled, CodeEndpointRestarted, CodeImageChanged, CodeInternal, CodeWorkerLost)

// Duration is a JSON duration: a Go duration string ("30s", "1m30s") or a
// number of seconds.
type Duration time.Duration

// UnmarshalJSON accepts "30s" or 30.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("duration %q: want e.g. \"30s\" or a number of seconds", s)
		}
		*d = Duration(v)
		return nil
	}
	var f float64
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("duration %s: want e.g. \"30s\" or a number of seconds", b)
	}
	if f > float64(1<<62)/1e9 || f < -float64(1<<62)/1e9 {
		return fmt.Errorf("duration %s is out of range", b)
	}
	*d = Duration(time.Duration(f * float64(time.Second)))
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// RegisterRequest is the body of POST /v1/functions. Exactly one of
// Source, Pickle, Ref and Command says what to run.
type RegisterRequest struct {
	Name     string `json:"name,omitempty"`
	Image    string `json:"image"`
	Kind     string `json:"kind,omitempty"` // source | pickle | ref | shell; default: whichever is set
	Source   string `json:"source,omitempty"`
	Function string `json:"function,omitempty"` // the function to call in source (default: the only one it defines)
	// Module, Filename and Lineno say where Source was written; Namespace
	// is what the function uses from its module (see task.Def).
	Module     string     `json:"module,omitempty"`
	Filename   string     `json:"filename,omitempty"`
	Lineno     int        `json:"lineno,omitempty"`
	Namespace  []task.Def `json:"namespace,omitempty"`
	ExactTypes bool       `json:"exact_types,omitempty"` // pickle results JSON would change (tuples)
	Ref        string     `json:"ref,omitempty"`         // "module:function" importable in the image
	Pickle     []byte     `json:"pickle,omitempty"`      // base64
	Pickler    string     `json:"pickler,omitempty"`     // cloudpickle | dill | pickle
	// Command is a shell function's command, formatted with each call's
	// keyword arguments (Python str.format) and run with /bin/sh -c;
	// Walltime (seconds) ends it with returncode 124.
	Command    string   `json:"command,omitempty"`
	Walltime   float64  `json:"walltime,omitempty"`
	Timeout    Duration `json:"timeout,omitempty"`
	MemoryMiB  int      `json:"memory_mib,omitempty"`
	MaxResult  int      `json:"max_result,omitempty"`
	MaxRetries int      `json:"max_retries,omitempty"`
}

// SubmitRequest is the body of POST /v1/tasks and an item of a batch.
type SubmitRequest struct {
	FunctionID string      `json:"function_id,omitempty"`
	Args       *task.Value `json:"args,omitempty"`       // a list
	Kwargs     *task.Value `json:"kwargs,omitempty"`     // a dict
	TaskGroup  string      `json:"task_group,omitempty"` // a client's tag for its tasks (Executor.reload_tasks)
}

// SubmitResponse is the answer to POST /v1/tasks.
type SubmitResponse struct {
	TaskID string `json:"task_id"`
	State  string `json:"state"`
}

// BatchRequest is the body of POST /v1/tasks/batch.
type BatchRequest struct {
	FunctionID string          `json:"function_id,omitempty"` // for items that name none
	TaskGroup  string          `json:"task_group,omitempty"`  // for items that name none
	Tasks      []SubmitRequest `json:"tasks"`
}

// BatchResponse is the answer to POST /v1/tasks/batch.
type BatchResponse struct {
	TaskIDs []string `json:"task_ids"`
}

// WaitRequest is the body of POST /v1/tasks/wait: either task ids, or a
// task group and the Cursor of the previous answer (0 at first), which
// returns the group's tasks that changed state (started running, finished,
// went back to the queue) since then, waiting up to Timeout for one.
type WaitRequest struct {
	TaskIDs   []string `json:"task_ids,omitempty"`
	TaskGroup string   `json:"task_group,omitempty"`
	Cursor    int64    `json:"cursor,omitempty"`
	Timeout   Duration `json:"timeout,omitempty"`
	// Running also returns the ids of the tasks asked for that are running,
	// and returns early when one starts that is not in KnownRunning.
	Running      bool     `json:"running,omitempty"`
	KnownRunning []string `json:"known_running,omitempty"`
}

// WaitResponse is the answer to POST /v1/tasks/wait: the finished tasks
// among those asked for, the ids the endpoint does not know, and (when
// asked) the ids of those that are running.
type WaitResponse struct {
	Tasks   []TaskView `json:"tasks"`
	Unknown []string   `json:"unknown"`
	Running []string   `json:"running,omitempty"`
	// Cursor, for a group wait, is what the next wait passes on.
	Cursor int64 `json:"cursor,omitempty"`
}

// TaskList is a page of GET /v1/tasks; NextAfter, when set, is the after=
// of the next page.
type TaskList struct {
	Tasks     []TaskView `json:"tasks"`
	NextAfter int64      `json:"next_after,omitempty"`
}

// FunctionView is a function as the API shows it.
type FunctionView struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	Kind        string    `json:"kind"`
	Function    string    `json:"function,omitempty"`
	Module      string    `json:"module,omitempty"`
	Filename    string    `json:"filename,omitempty"`
	Command     string    `json:"command,omitempty"`
	Ref         string    `json:"ref,omitempty"`
	Pickler     string    `json:"pickler,omitempty"`
	SourceBytes int       `json:"source_bytes,omitempty"`
	PickleBytes int       `json:"pickle_bytes,omitempty"`
	Image       string    `json:"image"`
	ImageDigest string    `json:"image_digest"`
	Timeout     Duration  `json:"timeout"`
	MemoryMiB   int       `json:"memory_mib"`
	MaxResult   int       `json:"max_result"`
	MaxRetries  int       `json:"max_retries"`
	CreatedAt   time.Time `json:"created_at"`
}

// FunctionList is the answer to GET /v1/functions.
type FunctionList struct {
	Functions []FunctionView `json:"functions"`
}

// TaskView is a task as the API shows it.
type TaskView struct {
	ID         string          `json:"id"`
	FunctionID string          `json:"function_id"`
	TaskGroup  string          `json:"task_group,omitempty"`
	State      string          `json:"state"`
	Attempts   int             `json:"attempts"`
	CreatedAt  time.Time       `json:"created_at"`
	StartedAt  *time.Time      `json:"started_at,omitempty"`
	FinishedAt *time.Time      `json:"finished_at,omitempty"`
	Result     json.RawMessage `json:"result,omitempty"` // the agent's result: ok, value, error, stdout, stderr, timings
	Error      string          `json:"error,omitempty"`
	ErrorCode  string          `json:"error_code,omitempty"`
	// Worker says where the task ran (or runs) when a worker of a
	// provider ran it: "node (Slurm job 123, block b1)". Empty: the
	// endpoint's own VMs.
	Worker string `json:"worker,omitempty"`
}

// ImageInfo describes an image file the endpoint can run.
type ImageInfo struct {
	Name      string   `json:"name"`
	Path      string   `json:"path"`
	Digest    string   `json:"digest"`
	Size      int64    `json:"size"`
	Python    string   `json:"python,omitempty"`
	MemoryMiB int      `json:"memory_mib"`
	Preload   []string `json:"preload,omitempty"`
	// Modules are the top-level modules of the image's packages (the SDK
	// sends their functions by reference).
	Modules []string `json:"modules,omitempty"`
}

// ImageList is the answer to GET /v1/images.
type ImageList struct {
	Images []ImageInfo `json:"images"`
}

// Health is the answer to GET /v1/health.
type Health struct {
	Status string `json:"status"` // "ok"
	API    string `json:"api"`    // Version
}

// The worker protocol: how a kiln worker on a compute node (started by a
// provider's pilot job) registers with the endpoint, pulls tasks and hands
// back their outcomes, with no inbound connection to the node. See the
// "Workers" section of docs/api.md.

// Worker timing, shared by both sides: a worker sends a request (a poll or a
// report) at least every WorkerHeartbeat; the endpoint marks a worker lost
// after WorkerLostAfter without one.
const (
	WorkerHeartbeat = 5 * time.Second
	WorkerLostAfter = 3 * WorkerHeartbeat
)

// Worker states (WorkerView.State).
const (
	WorkerActive   = "active"   // polling for tasks
	WorkerDraining = "draining" // stopping: finishing its tasks, taking no more
	WorkerGone     = "gone"     // deregistered
	WorkerLost     = "lost"     // missed its heartbeats
)

// WorkerRegister is the body of POST /v1/workers: who the worker is and
// what it can run.
type WorkerRegister struct {
	Node       string `json:"node"`                   // host name of the compute node
	SlurmJobID string `json:"slurm_job_id,omitempty"` // $SLURM_JOB_ID
	BlockID    string `json:"block_id,omitempty"`     // $KILN_BLOCK_ID: the provider's block
	CPUs       int    `json:"cpus"`
	MemoryMiB  int    `json:"memory_mib"`
	Accel      string `json:"accel"` // kvm or tcg
	Slots      int    `json:"slots"` // tasks it runs at once (its VMs)
	Version    string `json:"version,omitempty"`
}

// WorkerRegistered answers POST /v1/workers.
type WorkerRegistered struct {
	ID          string `json:"id"`
	HeartbeatMS int64  `json:"heartbeat_ms"` // send a request at least this often
	LostAfterMS int64  `json:"lost_after_ms"`
}

// WorkerPoll is the body of POST /v1/workers/{id}/poll, a long poll for
// tasks that returns when there are some, when the endpoint has something
// to say (cancel, stop), or after WaitMS. Capacity is the most tasks the
// worker holds at once: the endpoint hands out tasks while the worker holds
// fewer (a result reported during the poll frees a place).
type WorkerPoll struct {
	Capacity int   `json:"capacity"`
	WaitMS   int64 `json:"wait_ms"`
	// Held lists every task the worker was handed and has not reported
	// finished: a lease it does not hold (an answer lost on the way) is
	// given back to the queue.
	Held []string `json:"held,omitempty"`
	// Draining says the worker is stopping (SIGTERM): it takes no tasks.
	Draining bool `json:"draining,omitempty"`
}

// WorkerTask is one task handed to a worker. The task stays queued at the
// endpoint until the worker reports it started.
type WorkerTask struct {
	ID         string          `json:"id"`
	FunctionID string          `json:"function_id"`
	Args       json.RawMessage `json:"args,omitempty"`
	Kwargs     json.RawMessage `json:"kwargs,omitempty"`
}

// WorkerWork answers a poll. Functions holds the definitions (as the
// endpoint stores them) of the tasks' functions the worker has not been
// sent yet.
type WorkerWork struct {
	Tasks     []WorkerTask      `json:"tasks,omitempty"`
	Functions []json.RawMessage `json:"functions,omitempty"`
	Cancel    []string          `json:"cancel,omitempty"` // stop these tasks: they were cancelled
	Stop      bool              `json:"stop,omitempty"`   // drain and exit
}

// WorkerReport is the body of POST /v1/workers/{id}/report: tasks that
// started, and outcomes of tasks that ended.
type WorkerReport struct {
	Started []string       `json:"started,omitempty"`
	Results []WorkerResult `json:"results,omitempty"`
}

// WorkerResult is the outcome of one task on a worker.
type WorkerResult struct {
	ID        string          `json:"id"`
	State     string          `json:"state"` // succeeded, failed or cancelled
	Result    json.RawMessage `json:"result,omitempty"`
	Error     string          `json:"error,omitempty"`
	ErrorCode string          `json:"error_code,omitempty"`
	// Retry asks the endpoint to run the task again under its function's
	// max_retries (its VM died or could not start).
	Retry bool `json:"retry,omitempty"`
}

// WorkerReportAnswer answers a report: the started tasks the worker must
// stop because they were cancelled (or handed to another worker) meanwhile.
type WorkerReportAnswer struct {
	Cancel []string `json:"cancel,omitempty"`
}

// WorkerRelease is the body of DELETE /v1/workers/{id}: a draining worker
// hands back the tasks it did not finish; they run again elsewhere.
type WorkerRelease struct {
	Release []string `json:"release,omitempty"`
}

// WorkerView describes a worker in GET /v1/workers.
type WorkerView struct {
	ID          string    `json:"id"`
	Node        string    `json:"node"`
	SlurmJobID  string    `json:"slurm_job_id,omitempty"`
	BlockID     string    `json:"block_id,omitempty"`
	CPUs        int       `json:"cpus"`
	MemoryMiB   int       `json:"memory_mib"`
	Accel       string    `json:"accel"`
	Slots       int       `json:"slots"`
	State       string    `json:"state"`
	Running     int       `json:"running"` // tasks it reported started
	Leased      int       `json:"leased"`  // tasks handed to it, not started yet
	Done        int       `json:"done"`    // tasks it finished
	Registered  time.Time `json:"registered_at"`
	LastSeen    time.Time `json:"last_seen_at"`
	LostAt      time.Time `json:"lost_at,omitzero"`
	LostTaskIDs []string  `json:"lost_task_ids,omitempty"`
	Version     string    `json:"version,omitempty"`
	BlockState  string    `json:"block_state,omitempty"` // the provider's view of its block
}

// WorkerList answers GET /v1/workers.
type WorkerList struct {
	Workers []WorkerView `json:"workers"`
	Blocks  []BlockView  `json:"blocks,omitempty"`
}

// BlockView is one of a provider's blocks (pilot jobs).
type BlockView struct {
	ID        string    `json:"id"`
	JobID     string    `json:"job_id"`
	State     string    `json:"state"`
	Nodes     string    `json:"nodes,omitempty"`
	Reason    string    `json:"reason,omitempty"`
	Submitted time.Time `json:"submitted_at"`
}
