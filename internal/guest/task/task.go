// Package task defines the JSON task and result messages exchanged with the guest agent.
package task

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
)

// Value encodings.
const (
	EncJSON   = "json"
	EncPickle = "pickle"
)

// Task kinds.
const (
	KindRef    = "ref"
	KindSource = "source"
	KindPickle = "pickle"
	// KindRun runs a command (Argv, Env) with the task's fds and returns
	// {"code": exit status}: kiln run from a snapshot.
	KindRun = "run"
	// KindShell runs Command, formatted with the call's arguments as
	// Python's str.format does, with /bin/sh -c and returns
	// {"returncode", "cmd"}; the output is the Result's stdout and stderr.
	// Past Walltime the command is killed and its returncode is
	// WalltimeExit.
	KindShell = "shell"
)

// WalltimeExit is a shell task's returncode when it ran past its walltime
// (as GNU timeout reports it).
const WalltimeExit = 124

// Def is one entry of a source task's namespace: what the function's module
// held that the function uses, captured by the client (the Python SDK) and
// defined by the agent, in order, before the function's own source. Exactly
// one of Import, Ref, Value and Source is set.
type Def struct {
	Name string `json:"name"`
	// Module is the client module whose namespace Name is defined in ("":
	// the task's module): functions of another of the client's modules
	// live in a module of their own, so pickle finds them under it.
	Module string `json:"module,omitempty"`
	// Import binds Name to the module Import (importing Submodules too;
	// with Top, Name is the top-level package, as "import a.b" binds a).
	Import     string   `json:"import,omitempty"`
	Submodules []string `json:"submodules,omitempty"`
	Top        bool     `json:"top,omitempty"`
	// Ref binds Name to "module:qualname", importable in the image.
	Ref string `json:"ref,omitempty"`
	// Value binds Name to a value.
	Value *Value `json:"value,omitempty"`
	// Source is the text of a def or class statement that defines Name,
	// standing at line Lineno of Filename in the client's file.
	Source   string `json:"source,omitempty"`
	Filename string `json:"filename,omitempty"`
	Lineno   int    `json:"lineno,omitempty"`
}

// Failure kinds: why a task failed. They are written once, here. The agent
// reports the first four in Result.ErrorKind (agent.py spells the same
// strings; a test holds it to these); the host adds the rest for failures
// outside the function (package sandbox's Kind); the endpoint returns all
// of them as a task's error_code, beside its own codes (package apitype),
// and the Python SDK mirrors that list (checked by a test).
const (
	// ErrorException: the function raised (SystemExit and KeyboardInterrupt included).
	ErrorException = "exception"
	// ErrorBadTask: bad source, missing function or library, undecodable arguments.
	ErrorBadTask = "bad_task"
	// ErrorTooLarge: the serialized result or a frame was over its cap.
	ErrorTooLarge = "too_large"
	// ErrorUnserializable: the function returned a value that neither JSON nor pickle can encode.
	ErrorUnserializable = "unserializable"
	// ErrorTimeout: the task ran past its time limit; its VM was replaced.
	ErrorTimeout = "timeout"
	// ErrorOOM: the guest ran out of memory (MemoryError, or the kernel's OOM killer).
	ErrorOOM = "out_of_memory"
	// ErrorVMDied: the guest crashed, powered off or stopped answering.
	ErrorVMDied = "vm_died"
	// ErrorStart: no VM could be booted or restored for the task.
	ErrorStart = "vm_start_failed"
)

// AgentErrorKinds are the kinds the agent itself reports.
var AgentErrorKinds = []string{ErrorException, ErrorBadTask, ErrorTooLarge, ErrorUnserializable}

// ErrorKinds are every failure kind of a task, in the order above.
var ErrorKinds = append(append([]string(nil), AgentErrorKinds...), ErrorTimeout, ErrorOOM, ErrorVMDied, ErrorStart)

// Default limits the agent applies when a Task leaves them zero.
const (
	DefaultMaxOutput = 1 << 20
	DefaultMaxResult = 10 << 20
	// FrameSlack bounds everything in a Result frame besides the value and
	// the captured output: a Result payload is always under
	// MaxResult + 2*MaxOutput + FrameSlack bytes plus the JSON-escaped ID.
	FrameSlack = 64 << 10
)

// Value is an argument list, keyword dict or return value.
type Value struct {
	Enc string `json:"enc"` // "json" | "pickle"
	// Data is the JSON value itself (enc json), or a JSON string holding the
	// base64 of the pickle bytes (enc pickle).
	Data json.RawMessage `json:"data"`
	// Repr is Python's repr() of a pickled result, at most 1000 characters.
	Repr string `json:"repr,omitempty"`
}

// JSONValue encodes v as a JSON Value.
func JSONValue(v any) (Value, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return Value{}, fmt.Errorf("encoding value as json: %w", err)
	}
	return Value{Enc: EncJSON, Data: b}, nil
}

// PickleValue wraps pickle bytes as a Value.
func PickleValue(pickled []byte) Value {
	b, _ := json.Marshal(pickled) // a []byte always marshals, as a base64 string
	return Value{Enc: EncPickle, Data: b}
}

// Pickle returns the pickle bytes of a pickle Value.
func (v Value) Pickle() ([]byte, error) {
	if v.Enc != EncPickle {
		return nil, fmt.Errorf("value is %q-encoded, not pickle", v.Enc)
	}
	var b []byte
	if err := json.Unmarshal(v.Data, &b); err != nil {
		return nil, fmt.Errorf("decoding pickle value: %w", err)
	}
	return b, nil
}

// Decode unmarshals a JSON Value into dst.
func (v Value) Decode(dst any) error {
	if v.Enc != EncJSON {
		return fmt.Errorf("value is %q-encoded, not json: decode it in Python (repr: %s)", v.Enc, v.Repr)
	}
	if err := json.Unmarshal(v.Data, dst); err != nil {
		return fmt.Errorf("decoding json value: %w", err)
	}
	return nil
}

func (v *Value) validate() error {
	switch v.Enc {
	case EncJSON:
		if len(v.Data) == 0 || !json.Valid(v.Data) {
			return errors.New("json value carries no valid json data")
		}
	case EncPickle:
		var s string
		if err := json.Unmarshal(v.Data, &s); err != nil {
			return fmt.Errorf("pickle value data is not a string: %w", err)
		}
		if _, err := base64.StdEncoding.DecodeString(s); err != nil {
			return fmt.Errorf("pickle value data is not base64: %w", err)
		}
	default:
		return fmt.Errorf("unknown value encoding %q", v.Enc)
	}
	return nil
}

// Batch is the payload of a Tasks frame: tasks of one function, with
// what they share written once. The agent runs the items in order, each
// as the Task that is Task with the item's ID, Args and Kwargs, and
// answers each with its own Result frame. A batch's tasks neither stream
// nor read stdin.
type Batch struct {
	Task  *Task       `json:"task"`
	Items []BatchItem `json:"items"`
}

// BatchItem is what one task of a Batch has of its own.
type BatchItem struct {
	ID     string `json:"id"`
	Args   *Value `json:"args,omitempty"`
	Kwargs *Value `json:"kwargs,omitempty"`
}

// NewBatch returns the Batch of ts, which must share a CacheKey (see
// Batchable): the fields of ts[0] but its ID, Args and Kwargs, and an
// item for each task.
func NewBatch(ts []*Task) *Batch {
	common := *ts[0]
	common.ID, common.Args, common.Kwargs = "", nil, nil
	b := &Batch{Task: &common, Items: make([]BatchItem, len(ts))}
	for i, t := range ts {
		b.Items[i] = BatchItem{ID: t.ID, Args: t.Args, Kwargs: t.Kwargs}
	}
	return b
}

// Batchable reports whether a and b may share a Batch: functions called
// by value (source, ref, pickle) with the same CacheKey, which names the
// function and its settings exactly, and neither streaming nor reading
// stdin.
func Batchable(a, b *Task) bool {
	switch a.Kind {
	case KindSource, KindRef, KindPickle:
	default:
		return false
	}
	return a.CacheKey != "" && a.CacheKey == b.CacheKey && a.Kind == b.Kind &&
		!a.Stream && !b.Stream && !a.Stdin && !b.Stdin &&
		a.MaxOutput == b.MaxOutput && a.MaxResult == b.MaxResult
}

// Task is the payload of a Task frame.
type Task struct {
	ID      string `json:"id"`
	Kind    string `json:"kind"`             // "ref" | "source" | "pickle"
	Ref     string `json:"ref,omitempty"`    // "module:function", nested attributes allowed ("mod:Class.method")
	Source  string `json:"source,omitempty"` // text of a def (or module source) ...
	Name    string `json:"name,omitempty"`   // ... and the name to call (empty: the only function it defines)
	Pickle  []byte `json:"pickle,omitempty"` // cloudpickle/dill/pickle bytes of the function
	Pickler string `json:"pickler,omitempty"`
	Args    *Value `json:"args,omitempty"`   // a list
	Kwargs  *Value `json:"kwargs,omitempty"` // a dict
	// Argv and Env are a run task's command and the variables added to the
	// image's environment.
	Argv []string          `json:"argv,omitempty"`
	Env  map[string]string `json:"env,omitempty"`
	// Stream asks the agent to send the task's fd 1 and fd 2 output as
	// Stdout and Stderr frames while it runs (it is captured all the same,
	// up to MaxOutput).
	Stream bool `json:"stream,omitempty"`
	// Stdin makes the task's fd 0 the host's Stdin frames (an empty frame
	// ends the input) instead of /dev/null.
	Stdin bool `json:"stdin,omitempty"`
	// Module, Filename and Lineno say where a source task's function was
	// written (the client's module name, file and first line), so that
	// tracebacks point there and pickle finds the module's classes;
	// Namespace holds what the function uses from its module.
	Module    string `json:"module,omitempty"`
	Filename  string `json:"filename,omitempty"`
	Lineno    int    `json:"lineno,omitempty"`
	Namespace []Def  `json:"namespace,omitempty"`
	// ExactTypes pickles a result that JSON would give back with other
	// types (a tuple), instead of sending it as JSON.
	ExactTypes bool `json:"exact_types,omitempty"`
	// Command and Walltime (seconds; 0: none) make a shell task.
	Command  string  `json:"command,omitempty"`
	Walltime float64 `json:"walltime,omitempty"`
	// CacheKey, when set, names the function exactly (the endpoint's
	// content address of it): a source task's function and the modules its
	// source ran in are kept under it by the agent, and later tasks with
	// the same key reuse them, as a pool's worker reuses what it imported.
	CacheKey string `json:"cache_key,omitempty"`
	// MaxOutput caps the captured stdout and stderr, each, in bytes (0: DefaultMaxOutput).
	MaxOutput int `json:"max_output,omitempty"`
	// MaxResult caps the serialized value in bytes (0: DefaultMaxResult).
	MaxResult int `json:"max_result,omitempty"`
}

// Validate reports a task the agent would reject before running anything.
func (t *Task) Validate() error {
	switch t.Kind {
	case KindRef:
		if t.Ref == "" {
			return errors.New("ref task needs a ref (\"module:function\")")
		}
	case KindSource:
		if t.Source == "" {
			return errors.New("source task needs source text")
		}
	case KindRun:
		if len(t.Argv) == 0 || t.Argv[0] == "" {
			return errors.New("run task needs a command (argv)")
		}
	case KindShell:
		if t.Command == "" {
			return errors.New("shell task needs a command")
		}
		if t.Walltime < 0 {
			return errors.New("shell task walltime must not be negative")
		}
	case KindPickle:
		if len(t.Pickle) == 0 {
			return errors.New("pickle task needs pickle bytes")
		}
		switch t.Pickler {
		case "", "cloudpickle", "dill", "pickle":
		default:
			return fmt.Errorf("unknown pickler %q (want cloudpickle, dill or pickle)", t.Pickler)
		}
	default:
		return fmt.Errorf("unknown task kind %q (want ref, source, pickle, run or shell)", t.Kind)
	}
	for _, v := range []*Value{t.Args, t.Kwargs} {
		if v != nil {
			if err := v.validate(); err != nil {
				return err
			}
		}
	}
	for i, d := range t.Namespace {
		if err := d.validate(); err != nil {
			return fmt.Errorf("namespace entry %d: %w", i, err)
		}
	}
	if t.MaxOutput < 0 || t.MaxResult < 0 {
		return errors.New("max_output and max_result must not be negative")
	}
	return nil
}

func (d *Def) validate() error {
	if d.Name == "" {
		return errors.New("no name")
	}
	n := 0
	for _, set := range []bool{d.Import != "", d.Ref != "", d.Value != nil, d.Source != ""} {
		if set {
			n++
		}
	}
	if n != 1 {
		return fmt.Errorf("%s: want exactly one of import, ref, value and source", d.Name)
	}
	if d.Value != nil {
		return d.Value.validate()
	}
	return nil
}

// MaxFrame is the largest Result payload the agent can send for t.
func (t *Task) MaxFrame() uint32 {
	out, res := t.MaxOutput, t.MaxResult
	if out <= 0 {
		out = DefaultMaxOutput
	}
	if res <= 0 {
		res = DefaultMaxResult
	}
	n := int64(res) + 2*int64(out) + FrameSlack + 6*int64(len(t.ID))
	if n > math.MaxUint32 {
		return math.MaxUint32
	}
	return uint32(n)
}

// Error describes why a task failed.
type Error struct {
	Type      string `json:"type"` // qualified exception type, "ValueError", "numpy.linalg.LinAlgError"
	Message   string `json:"message"`
	Traceback string `json:"traceback"` // the user's frames only
	// Module, Qualname, Args and State describe the raised exception well
	// enough for the SDK to raise one of the same type.
	Module   string `json:"module,omitempty"`
	Qualname string `json:"qualname,omitempty"`
	Args     *Value `json:"args,omitempty"`
	State    *Value `json:"state,omitempty"`
}

// Timings splits a task's time in the agent.
type Timings struct {
	DeserializeMS float64 `json:"deserialize_ms"` // resolving the function and decoding arguments
	CallMS        float64 `json:"call_ms"`
	SerializeMS   float64 `json:"serialize_ms"`
}

// Result is the payload of a Result frame.
type Result struct {
	ID              string  `json:"id"`
	OK              bool    `json:"ok"`
	Value           *Value  `json:"value,omitempty"`
	Error           *Error  `json:"error,omitempty"`
	ErrorKind       string  `json:"error_kind,omitempty"`
	Stdout          string  `json:"stdout"`
	Stderr          string  `json:"stderr"`
	StdoutTruncated bool    `json:"stdout_truncated,omitempty"`
	StderrTruncated bool    `json:"stderr_truncated,omitempty"`
	Timings         Timings `json:"timings"`
}

// DecodeResult parses a Result payload and checks that it is consistent: a
// successful result carries a well-formed value and no error, a failed one
// an error of a known kind and no value. Unknown fields are ignored so newer
// agents stay readable. The ID may be empty only for a bad_task result (the
// agent could not read the task's ID).
func DecodeResult(b []byte) (*Result, error) {
	var r Result
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("decoding result: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("decoding result: trailing data after the JSON object")
	}
	if r.OK {
		if r.Value == nil {
			return nil, errors.New("decoding result: ok result has no value")
		}
		if r.Error != nil || r.ErrorKind != "" {
			return nil, errors.New("decoding result: ok result carries an error")
		}
		if err := r.Value.validate(); err != nil {
			return nil, fmt.Errorf("decoding result: %w", err)
		}
	} else {
		if r.Error == nil {
			return nil, errors.New("decoding result: failed result has no error")
		}
		if r.Value != nil {
			return nil, errors.New("decoding result: failed result carries a value")
		}
		if !slices.Contains(AgentErrorKinds, r.ErrorKind) {
			return nil, fmt.Errorf("decoding result: unknown error kind %q", r.ErrorKind)
		}
	}
	if r.ID == "" && (r.OK || r.ErrorKind != ErrorBadTask) {
		return nil, errors.New("decoding result: result has no id")
	}
	t := r.Timings
	if t.DeserializeMS < 0 || t.CallMS < 0 || t.SerializeMS < 0 {
		return nil, errors.New("decoding result: negative timing")
	}
	return &r, nil
}
