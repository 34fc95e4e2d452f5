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
)

// ErrorCodes lists every TaskView.ErrorCode: the task failure kinds, then
// the endpoint's own codes.
var ErrorCodes = append(append([]string(nil), task.ErrorKinds...), CodeCancelled, CodeEndpointRestarted, CodeImageChanged, CodeInternal)

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
