package agent

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/guest/task"
)

// python is Debian's interpreter, the kind images carry (python3 on PATH may be another one).
const python = "/usr/bin/python3"

// ioTimeout bounds each read or write on the agent's channel; generous for a loaded machine.
const ioTimeout = 2 * time.Minute

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// agentProc is a running agent.py talking over a socketpair (its fd 3).
type agentProc struct {
	t        *testing.T
	cmd      *exec.Cmd
	conn     net.Conn
	r        *proto.Reader
	stderr   *syncBuffer
	waitDone chan struct{}
	waitErr  error
	wantCode int
}

// startAgent runs the embedded agent with extra arguments and environment.
// It does not read Ready.
func startAgent(t *testing.T, env []string, args ...string) *agentProc {
	t.Helper()
	if _, err := os.Stat(python); err != nil {
		t.Fatalf("%s not found: install python3 and python3-numpy (apt-get install python3 python3-numpy)", python)
	}
	script := filepath.Join(t.TempDir(), "agent.py")
	if err := os.WriteFile(script, Source, 0o644); err != nil {
		t.Fatal(err)
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	host := os.NewFile(uintptr(fds[0]), "agent-host")
	guest := os.NewFile(uintptr(fds[1]), "agent-guest")
	defer guest.Close()
	defer host.Close()

	cmd := exec.Command(python, append([]string{"-u", script, "--fd", "3"}, args...)...)
	cmd.ExtraFiles = []*os.File{guest}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PYTHON") { // a pyenv PYTHONPATH must not leak into Debian's python
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "KILN_AGENT_NO_CLOCK=1") // never touch the host's clock
	cmd.Env = append(cmd.Env, env...)
	a := &agentProc{t: t, cmd: cmd, stderr: &syncBuffer{}, waitDone: make(chan struct{})}
	cmd.Stdout = a.stderr
	cmd.Stderr = a.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting agent: %v", err)
	}
	go func() {
		a.waitErr = cmd.Wait()
		close(a.waitDone)
	}()
	conn, err := net.FileConn(host)
	if err != nil {
		_ = cmd.Process.Kill()
		<-a.waitDone
		t.Fatalf("wrapping socket: %v", err)
	}
	a.conn = conn
	a.r = proto.NewReader(conn, 128<<20)
	t.Cleanup(a.close)
	return a
}

// close ends the stream (EOF for the agent) and checks the exit code.
func (a *agentProc) close() {
	a.t.Helper()
	_ = a.conn.Close()
	select {
	case <-a.waitDone:
	case <-time.After(ioTimeout):
		_ = a.cmd.Process.Kill()
		<-a.waitDone
		a.t.Errorf("agent did not exit after its channel closed; output:\n%s", a.stderr.String())
		return
	}
	code := a.cmd.ProcessState.ExitCode()
	if code != a.wantCode {
		a.t.Errorf("agent exit code = %d (%v), want %d; output:\n%s", code, a.waitErr, a.wantCode, a.stderr.String())
	}
}

// logContains waits (bounded) for the agent's output to contain s: the
// output reaches the test through a pipe copied by another goroutine, so a
// line the agent wrote before a frame may arrive after it.
func (a *agentProc) logContains(s string) bool {
	deadline := time.Now().Add(ioTimeout)
	for !strings.Contains(a.stderr.String(), s) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

func (a *agentProc) next() proto.Frame {
	a.t.Helper()
	_ = a.conn.SetReadDeadline(time.Now().Add(ioTimeout))
	f, err := a.r.Next()
	if err != nil {
		a.t.Fatalf("reading frame from agent: %v; agent output:\n%s", err, a.stderr.String())
	}
	return f
}

func (a *agentProc) send(typ proto.Type, payload []byte) {
	a.t.Helper()
	_ = a.conn.SetWriteDeadline(time.Now().Add(ioTimeout))
	if err := proto.Write(a.conn, typ, payload); err != nil {
		a.t.Fatalf("writing to agent: %v; agent output:\n%s", err, a.stderr.String())
	}
}

func (a *agentProc) ready() proto.ReadyMsg {
	a.t.Helper()
	f := a.next()
	if f.Type != proto.Ready {
		a.t.Fatalf("first frame is %v, want ready; payload %.200s", f.Type, f.Payload)
	}
	var m proto.ReadyMsg
	if err := json.Unmarshal(f.Payload, &m); err != nil {
		a.t.Fatalf("decoding ready %s: %v", f.Payload, err)
	}
	return m
}

// result reads one Result frame and decodes it.
func (a *agentProc) result() (*task.Result, int) {
	a.t.Helper()
	f := a.next()
	if f.Type != proto.Result {
		a.t.Fatalf("got %v frame, want result; payload %.300s", f.Type, f.Payload)
	}
	r, err := task.DecodeResult(f.Payload)
	if err != nil {
		a.t.Fatalf("DecodeResult(%.500s) = %v", f.Payload, err)
	}
	return r, len(f.Payload)
}

// run sends tk and returns its result and the size of the Result payload.
func (a *agentProc) run(tk task.Task) (*task.Result, int) {
	a.t.Helper()
	b, err := json.Marshal(tk)
	if err != nil {
		a.t.Fatal(err)
	}
	a.send(proto.Task, b)
	r, n := a.result()
	if r.ID != tk.ID {
		a.t.Fatalf("result id = %q, want %q", r.ID, tk.ID)
	}
	return r, n
}

func jsonVal(t *testing.T, v any) *task.Value {
	t.Helper()
	val, err := task.JSONValue(v)
	if err != nil {
		t.Fatal(err)
	}
	return &val
}

func src(s string, args ...any) task.Task {
	tk := task.Task{Kind: task.KindSource, Source: s}
	if args != nil {
		b, _ := json.Marshal(args)
		tk.Args = &task.Value{Enc: task.EncJSON, Data: b}
	}
	return tk
}

func compactJSON(t *testing.T, b []byte) string {
	t.Helper()
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		t.Fatalf("compacting %s: %v", b, err)
	}
	return buf.String()
}

func TestReady(t *testing.T) {
	a := startAgent(t, nil, "--preload", "json,nonexistent_mod")
	m := a.ready()
	if !regexp.MustCompile(`^3\.\d+\.\d+$`).MatchString(m.Python) {
		t.Errorf("ready python = %q, want a version like 3.11.2", m.Python)
	}
	if diff := cmp.Diff([]string{"json"}, m.Preloaded); diff != "" {
		t.Errorf("ready preloaded mismatch (-want +got):\n%s", diff)
	}
	if e := m.Errors["nonexistent_mod"]; !strings.Contains(e, "No module named 'nonexistent_mod'") {
		t.Errorf("ready errors[nonexistent_mod] = %q, want a ModuleNotFoundError; errors: %v", e, m.Errors)
	}
	if len(m.Errors) != 1 {
		t.Errorf("ready errors = %v, want only nonexistent_mod", m.Errors)
	}
	if m.PreloadMS < 0 {
		t.Errorf("ready preload_ms = %v, want >= 0", m.PreloadMS)
	}
	// The agent keeps serving after a failed preload.
	tk := task.Task{ID: "after", Kind: task.KindRef, Ref: "json:dumps", Args: jsonVal(t, []any{[]int{1}})}
	if r, _ := a.run(tk); !r.OK || string(r.Value.Data) != `"[1]"` {
		t.Errorf("json:dumps([1]) = %+v, want ok \"[1]\"", r)
	}
}

func TestTasks(t *testing.T) {
	a := startAgent(t, nil)
	a.ready()

	type want struct {
		ok        bool
		json      string // compact JSON value, when enc is json
		repr      string // repr, when enc is pickle
		kind      string
		errType   string
		inMessage string
		inTB      []string
		stdout    string
		stderr    string
	}
	tests := []struct {
		name string
		task task.Task
		want want
	}{
		{"ref", task.Task{Kind: task.KindRef, Ref: "math:factorial", Args: jsonVal(t, []int{5})}, want{ok: true, json: "120"}},
		{"ref nested attribute", task.Task{Kind: task.KindRef, Ref: "os:path.join", Args: jsonVal(t, []string{"a", "b"})}, want{ok: true, json: `"a/b"`}},
		{"ref kwargs", task.Task{Kind: task.KindRef, Ref: "builtins:int", Args: jsonVal(t, []string{"ff"}), Kwargs: jsonVal(t, map[string]int{"base": 16})}, want{ok: true, json: "255"}},
		{"source numpy", src("def f(n):\n    import numpy as np\n    return int(np.arange(n).sum())\n", 10), want{ok: true, json: "45"}},
		{"source named among several", task.Task{Kind: task.KindSource, Source: "def a(): return 1\ndef b(): return 2\n", Name: "b"}, want{ok: true, json: "2"}},
		{"source imports do not count as functions", src("from os.path import join\ndef f(): return join('x', 'y')\n"), want{ok: true, json: `"x/y"`}},
		{"module level code runs", src("X = [1, 2]\ndef f(): return X + [3]\n"), want{ok: true, json: "[1,2,3]"}},
		{"tuple becomes list", src("def f(): return (1, 'a', None, True, 2.5, {'k': [()]})"), want{ok: true, json: `[1,"a",null,true,2.5,{"k":[[]]}]`}},
		{"output", src("import sys\ndef f():\n    print('hello')\n    print('warn', file=sys.stderr)\n"), want{ok: true, json: "null", stdout: "hello\n", stderr: "warn\n"}},
		{"bytes", src("def f(): return b'abc'"), want{ok: true, repr: "b'abc'"}},
		{"numpy scalar", src("def f():\n    import numpy as np\n    return np.int64(7)\n"), want{ok: true, repr: "7"}},
		{"int keys", src("def f(): return {1: 2}"), want{ok: true, repr: "{1: 2}"}},
		{"nan", src("def f(): return float('nan')"), want{ok: true, repr: "nan"}},
		{"set", src("def f(): return {3}"), want{ok: true, repr: "{3}"}},
		{"value error", src("def f(x):\n    y = x + 1\n    raise ValueError('bad input %d' % y)\n", 1),
			want{kind: task.ErrorException, errType: "ValueError", inMessage: "bad input 2", inTB: []string{"ValueError: bad input 2", "raise ValueError('bad input %d' % y)", "line 3, in f"}}},
		{"qualified exception type", src("def f():\n    import numpy as np\n    np.linalg.inv(np.zeros((2, 2)))\n"),
			want{kind: task.ErrorException, errType: "numpy.linalg.LinAlgError", inMessage: "Singular matrix"}},
		{"system exit", src("import sys\ndef f(): sys.exit(3)"), want{kind: task.ErrorException, errType: "SystemExit", inMessage: "3"}},
		{"keyboard interrupt", src("def f(): raise KeyboardInterrupt"), want{kind: task.ErrorException, errType: "KeyboardInterrupt"}},
		{"output kept on exception", src("def f():\n    print('before')\n    1/0\n"), want{kind: task.ErrorException, errType: "ZeroDivisionError", stdout: "before\n"}},
		{"syntax error", src("def f(:\n    pass\n"), want{kind: task.ErrorBadTask, errType: "SyntaxError", inTB: []string{"def f(:"}}},
		{"missing name", task.Task{Kind: task.KindSource, Source: "def f(): pass", Name: "g"}, want{kind: task.ErrorBadTask, errType: "NameError", inMessage: "'g'"}},
		{"ambiguous source", src("def f(): pass\ndef g(): pass\n"), want{kind: task.ErrorBadTask, inMessage: "defines 2 functions (f, g)"}},
		{"missing module", task.Task{Kind: task.KindRef, Ref: "no_such_mod_kiln:f"}, want{kind: task.ErrorBadTask, errType: "ModuleNotFoundError"}},
		{"missing attribute", task.Task{Kind: task.KindRef, Ref: "math:nope"}, want{kind: task.ErrorBadTask, errType: "AttributeError"}},
		{"bad ref", task.Task{Kind: task.KindRef, Ref: "math"}, want{kind: task.ErrorBadTask, inMessage: "module:function"}},
		{"not callable", task.Task{Kind: task.KindRef, Ref: "math:pi"}, want{kind: task.ErrorBadTask, inMessage: "not a callable"}},
		{"unknown kind", task.Task{Kind: "magic"}, want{kind: task.ErrorBadTask, inMessage: "unknown task kind"}},
		{"args not a list", task.Task{Kind: task.KindRef, Ref: "math:factorial", Args: jsonVal(t, 5)}, want{kind: task.ErrorBadTask, inMessage: "args must be a list"}},
		{"undecodable pickle args", task.Task{Kind: task.KindRef, Ref: "math:factorial", Args: &task.Value{Enc: task.EncPickle, Data: json.RawMessage(`"bm90IGEgcGlja2xl"`)}}, want{kind: task.ErrorBadTask}},
		{"pickled function", task.Task{Kind: task.KindPickle, Pickler: "pickle", Pickle: []byte("coperator\nadd\n."), Args: jsonVal(t, []int{2, 3})}, want{ok: true, json: "5"}},
		{"unknown pickler", task.Task{Kind: task.KindPickle, Pickler: "marshal", Pickle: []byte("x")}, want{kind: task.ErrorBadTask, inMessage: "unknown pickler"}},
		{"unserializable", src("def f(): return lambda: 1"), want{kind: task.ErrorUnserializable, inMessage: "cannot be serialized"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a.t = t
			tk := tt.task
			tk.ID = "t" + strconv.Itoa(i)
			r, _ := a.run(tk)
			w := tt.want
			if r.OK != w.ok {
				t.Fatalf("ok = %v, want %v; result %+v error %+v", r.OK, w.ok, r, r.Error)
			}
			if r.Stdout != w.stdout || r.Stderr != w.stderr {
				t.Errorf("stdout, stderr = %q, %q, want %q, %q", r.Stdout, r.Stderr, w.stdout, w.stderr)
			}
			if r.Timings.DeserializeMS <= 0 {
				t.Errorf("timings = %+v, want a positive deserialize time", r.Timings)
			}
			if w.ok {
				switch {
				case w.repr != "":
					if r.Value.Enc != task.EncPickle || r.Value.Repr != w.repr {
						t.Errorf("value = %s %s repr %q, want pickle with repr %q", r.Value.Enc, r.Value.Data, r.Value.Repr, w.repr)
					}
					if p, err := r.Value.Pickle(); err != nil || len(p) == 0 || p[0] != 0x80 {
						t.Errorf("pickle bytes = %q, %v, want a protocol 2+ pickle", p, err)
					}
				default:
					if r.Value.Enc != task.EncJSON || compactJSON(t, r.Value.Data) != w.json {
						t.Errorf("value = %s %s, want json %s", r.Value.Enc, r.Value.Data, w.json)
					}
				}
				return
			}
			if r.ErrorKind != w.kind {
				t.Errorf("error kind = %q, want %q; error %+v", r.ErrorKind, w.kind, r.Error)
			}
			if w.errType != "" && r.Error.Type != w.errType {
				t.Errorf("error type = %q, want %q; error %+v", r.Error.Type, w.errType, r.Error)
			}
			if !strings.Contains(r.Error.Message, w.inMessage) {
				t.Errorf("error message = %q, want it to contain %q", r.Error.Message, w.inMessage)
			}
			for _, s := range w.inTB {
				if !strings.Contains(r.Error.Traceback, s) {
					t.Errorf("traceback = %q, want it to contain %q", r.Error.Traceback, s)
				}
			}
			if strings.Contains(r.Error.Traceback, "agent.py") {
				t.Errorf("traceback = %q, want no agent frames", r.Error.Traceback)
			}
		})
	}
	a.t = t
}

func TestPickleRoundTrip(t *testing.T) {
	a := startAgent(t, nil)
	a.ready()
	r, _ := a.run(task.Task{ID: "1", Kind: task.KindSource, Source: "def f(): return [b'abc', {2}]"})
	if !r.OK || r.Value.Enc != task.EncPickle {
		t.Fatalf("result = %+v, want a pickle value", r)
	}
	// The pickled list goes back as an argument list.
	r2, _ := a.run(task.Task{ID: "2", Kind: task.KindSource, Source: "def f(b, s): return [b.hex(), sorted(s)]", Args: r.Value})
	if !r2.OK || compactJSON(t, r2.Value.Data) != `["616263",[2]]` {
		t.Fatalf("result = %+v %+v, want [\"616263\",[2]]", r2, r2.Error)
	}
}

func TestCloudpickle(t *testing.T) {
	a := startAgent(t, nil)
	a.ready()
	r, _ := a.run(task.Task{ID: "1", Kind: task.KindRef, Ref: "importlib.util:find_spec", Args: jsonVal(t, []string{"cloudpickle"})})
	if !r.OK {
		t.Fatalf("find_spec: %+v", r.Error)
	}
	if string(r.Value.Data) == "null" {
		// Not installed (Debian's python3 has none by default): the agent says what to do.
		for _, pickler := range []string{"cloudpickle", ""} {
			r, _ := a.run(task.Task{ID: "2", Kind: task.KindPickle, Pickler: pickler, Pickle: []byte("ccloudpickle.cloudpickle\n_make_function\n.")})
			if r.ErrorKind != task.ErrorBadTask || !strings.Contains(r.Error.Message, "image has no cloudpickle: install python3-cloudpickle") {
				t.Errorf("pickler %q without cloudpickle: kind %q error %+v, want bad_task naming python3-cloudpickle", pickler, r.ErrorKind, r.Error)
			}
		}
		return
	}
	// Installed: a pickled lambda runs.
	r, _ = a.run(task.Task{ID: "dumps", Kind: task.KindSource, Source: "import base64, cloudpickle\ndef f(): return base64.b64encode(cloudpickle.dumps(lambda x: x * 2)).decode()"})
	if !r.OK {
		t.Fatalf("cloudpickle.dumps: %+v", r.Error)
	}
	var b64 string
	if err := r.Value.Decode(&b64); err != nil {
		t.Fatal(err)
	}
	fn, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		t.Fatal(err)
	}
	r, _ = a.run(task.Task{ID: "3", Kind: task.KindPickle, Pickler: "cloudpickle", Pickle: fn, Args: jsonVal(t, []int{21})})
	if !r.OK || string(r.Value.Data) != "42" {
		t.Errorf("cloudpickled lambda(21) = %+v %+v, want 42", r, r.Error)
	}
}

func TestLimits(t *testing.T) {
	a := startAgent(t, nil)
	a.ready()
	for _, s := range []string{
		"def f(): return 'x' * (50 << 20)",  // json
		"def f(): return b'x' * (50 << 20)", // pickle
	} {
		r, n := a.run(task.Task{ID: "big", Kind: task.KindSource, Source: s})
		if r.ErrorKind != task.ErrorTooLarge || !strings.Contains(r.Error.Message, "over the limit of 10485760 bytes") {
			t.Errorf("%s: kind %q error %+v, want too_large over the limit of 10485760 bytes", s, r.ErrorKind, r.Error)
		}
		if n > 4096 {
			t.Errorf("%s: result frame is %d bytes, want a small one", s, n)
		}
	}

	r, _ := a.run(task.Task{ID: "cap", Kind: task.KindSource, Source: "def f(): return 'x' * 100", MaxResult: 50})
	if r.ErrorKind != task.ErrorTooLarge || !strings.Contains(r.Error.Message, "result is 102 bytes, over the limit of 50 bytes") {
		t.Errorf("100-char string with max_result 50: kind %q error %+v, want too_large of 102 bytes", r.ErrorKind, r.Error)
	}

	tests := []struct {
		name, source string
		max          int
	}{
		{"plain", "def f():\n    print('x' * 5000)\n    import sys\n    print('y' * 5000, file=sys.stderr)\n    return 1\n", 1000},
		{"escaped", "def f():\n    import sys\n    sys.stdout.write('\\x00' * 5000)\n    sys.stderr.write('\"' * 5000)\n    return 1\n", 1000},
		{"multibyte", "def f():\n    import sys\n    for _ in range(3000):\n        sys.stdout.write('é')\n        sys.stderr.write('\\u20ac')\n    return 1\n", 1001},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a.t = t
			tk := task.Task{ID: tt.name, Kind: task.KindSource, Source: tt.source, MaxOutput: tt.max}
			r, n := a.run(tk)
			if !r.OK || !r.StdoutTruncated || !r.StderrTruncated {
				t.Fatalf("result ok %v, truncated %v %v, want ok and both truncated; error %+v", r.OK, r.StdoutTruncated, r.StderrTruncated, r.Error)
			}
			for name, s := range map[string]string{"stdout": r.Stdout, "stderr": r.Stderr} {
				b, _ := json.Marshal(s)
				if len(s) == 0 || len(b)-2 > tt.max {
					t.Errorf("%s is %d bytes, %d as JSON, want 1..%d as JSON", name, len(s), len(b)-2, tt.max)
				}
			}
			if max := tk.MaxFrame(); uint32(n) > max {
				t.Errorf("result frame is %d bytes, over MaxFrame %d", n, max)
			}
		})
	}
	a.t = t
	if r, _ := a.run(task.Task{ID: "plain", Kind: task.KindSource, Source: "def f(): print('x' * 1000)", MaxOutput: 2000}); r.StdoutTruncated || len(r.Stdout) != 1001 {
		t.Errorf("1001 bytes under max_output 2000: stdout %d bytes truncated %v, want 1001 and not truncated", len(r.Stdout), r.StdoutTruncated)
	}
}

func TestProtocol(t *testing.T) {
	a := startAgent(t, nil, "--max-frame", "1000")
	a.ready()

	// Not JSON: a bad_task result without id.
	a.send(proto.Task, []byte("not json"))
	if r, _ := a.result(); r.ID != "" || r.ErrorKind != task.ErrorBadTask {
		t.Errorf("task %q: id %q kind %q, want empty id and bad_task", "not json", r.ID, r.ErrorKind)
	}
	// Over the agent's frame limit: dropped, reported, stream stays in sync.
	a.send(proto.Task, bytes.Repeat([]byte(" "), 2000))
	if r, _ := a.result(); r.ErrorKind != task.ErrorBadTask || !strings.Contains(r.Error.Message, "task is 2000 bytes, over the agent's limit of 1000 bytes") {
		t.Errorf("2000-byte task: kind %q error %+v, want bad_task over the limit", r.ErrorKind, r.Error)
	}
	// Unknown frame types are ignored.
	a.send(proto.Type(0x7f), []byte("whatever"))
	a.send(proto.Stdout, nil)
	if r, _ := a.run(task.Task{ID: "ok", Kind: task.KindRef, Ref: "math:factorial", Args: jsonVal(t, []int{3})}); !r.OK || string(r.Value.Data) != "6" {
		t.Errorf("task after ignored frames = %+v, want ok 6", r)
	}
	if !a.logContains("ignoring frame of type 0x7f") {
		t.Errorf("agent log = %q, want a note about the ignored frame", a.stderr.String())
	}
}

func TestBadStream(t *testing.T) {
	a := startAgent(t, nil)
	a.ready()
	a.wantCode = 2
	_ = a.conn.SetWriteDeadline(time.Now().Add(ioTimeout))
	if _, err := a.conn.Write([]byte("GET / HTTP/1.1\r\n")); err != nil {
		t.Fatal(err)
	}
	// The agent gives up on a stream that is not kiln frames: it exits (code
	// checked at cleanup), closing its end.
	_ = a.conn.SetReadDeadline(time.Now().Add(ioTimeout))
	if f, err := a.r.Next(); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("Next after garbage = %v, %v, want io.EOF or a reset", f.Type, err)
	}
	if !a.logContains("bad frame magic") {
		t.Errorf("agent log = %q, want it to name the bad magic", a.stderr.String())
	}
}

func TestUsage(t *testing.T) {
	script := filepath.Join(t.TempDir(), "agent.py")
	if err := os.WriteFile(script, Source, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{nil, {"--fd"}, {"--fd", "3", "--port", "/x"}, {"--bogus"}} {
		out, err := exec.Command(python, append([]string{script}, args...)...).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "usage:") {
			t.Errorf("agent.py %q: %v, output %q; want exit 2 with usage", args, err, out)
		}
	}
}

func TestReseed(t *testing.T) {
	a := startAgent(t, nil)
	a.ready()
	// Seed random deterministically; a reseed must break the sequence.
	seed := src("import random\ndef f(): random.seed(1)")
	seed.ID = "seed"
	if r, _ := a.run(seed); !r.OK {
		t.Fatalf("seeding: %+v", r.Error)
	}
	entropy := bytes.Repeat([]byte{0x5a}, 32)
	b, _ := json.Marshal(proto.ReseedMsg{Entropy: entropy, TimeNS: time.Now().UnixNano()})
	a.send(proto.Reseed, b)
	f := a.next()
	if f.Type != proto.Reseeded {
		t.Fatalf("got %v frame, want reseeded", f.Type)
	}
	var m proto.ReseededMsg
	if err := json.Unmarshal(f.Payload, &m); err != nil {
		t.Fatal(err)
	}
	if hasSysAdmin(t) {
		if !m.OK || m.Error != "" {
			t.Errorf("reseeded = %+v, want ok with CAP_SYS_ADMIN", m)
		}
	} else if m.OK || !strings.Contains(m.Error, "kernel RNG") {
		t.Errorf("reseeded = %+v, want not ok with a kernel RNG error without CAP_SYS_ADMIN", m)
	}
	draw := src("import random\ndef f(): return random.random()")
	draw.ID = "draw"
	r, _ := a.run(draw)
	// random.seed(1); random.random() is 0.13436424411240122.
	if !r.OK || string(r.Value.Data) == "0.13436424411240122" {
		t.Errorf("random.random() after reseed = %s, want it to differ from the seed(1) sequence", r.Value.Data)
	}

	a.send(proto.Reseed, []byte(`{"entropy":"!!"}`))
	if f := a.next(); f.Type != proto.Reseeded || !bytes.Contains(f.Payload, []byte(`"ok":false`)) {
		t.Errorf("bad reseed answered %v %s, want reseeded not ok", f.Type, f.Payload)
	}
}

// hasSysAdmin reports whether this process has CAP_SYS_ADMIN (which the agent's
// child inherits as root).
func hasSysAdmin(t *testing.T) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^CapEff:\s*([0-9a-f]+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no CapEff in /proc/self/status")
	}
	caps, err := strconv.ParseUint(string(m[1]), 16, 64)
	if err != nil {
		t.Fatal(err)
	}
	const capSysAdmin = 21
	return caps&(1<<capSysAdmin) != 0
}

func TestEOF(t *testing.T) {
	a := startAgent(t, nil)
	a.ready()
	_ = a.conn.Close()
	select {
	case <-a.waitDone:
	case <-time.After(ioTimeout):
		t.Fatalf("agent still running %v after EOF", ioTimeout)
	}
	if code := a.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("agent exit code after EOF = %d, want 0; output:\n%s", code, a.stderr.String())
	}
}

// TestFactsMatchHost holds agent.py's copies of the host's facts (limits
// and failure kinds, defined in package task) to the Go definitions.
func TestFactsMatchHost(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "agent.py"), Source, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(python, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); import agent; print(json.dumps({'max_output': agent.DEFAULT_MAX_OUTPUT, 'max_result': agent.DEFAULT_MAX_RESULT, 'kinds': list(agent.ERROR_KINDS)}))", dir).Output()
	if err != nil {
		t.Fatalf("importing agent.py: %v", err)
	}
	var got struct {
		MaxOutput int      `json:"max_output"`
		MaxResult int      `json:"max_result"`
		Kinds     []string `json:"kinds"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	if got.MaxOutput != task.DefaultMaxOutput || got.MaxResult != task.DefaultMaxResult {
		t.Errorf("agent.py limits = output %d, result %d; want task.DefaultMaxOutput %d, task.DefaultMaxResult %d", got.MaxOutput, got.MaxResult, task.DefaultMaxOutput, task.DefaultMaxResult)
	}
	if diff := cmp.Diff(task.AgentErrorKinds, got.Kinds); diff != "" {
		t.Errorf("agent.py ERROR_KINDS differ from task.AgentErrorKinds (-go +python):\n%s", diff)
	}
}

// TestFDLevelOutput: what a task writes to fd 1 and 2 directly (C code,
// os.write, subprocesses) is captured like print's output, and streamed
// as Stdout/Stderr frames when the task asks for it.
func TestFDLevelOutput(t *testing.T) {
	a := startAgent(t, nil)
	a.ready()
	const code = "def f():\n    import os, subprocess, sys\n    print('print-line')\n    os.write(1, b'fd-line\\n')\n    subprocess.run(['/bin/echo', 'sub-line'], check=True)\n    os.write(2, b'err-line\\n')\n    return 1\n"
	r, _ := a.run(task.Task{ID: "fd", Kind: task.KindSource, Source: code})
	if !r.OK {
		t.Fatalf("result = %+v, want ok", r.Error)
	}
	for _, w := range []string{"print-line\n", "fd-line\n", "sub-line\n"} {
		if !strings.Contains(r.Stdout, w) {
			t.Errorf("stdout = %q, want it to contain %q", r.Stdout, w)
		}
	}
	if r.Stderr != "err-line\n" {
		t.Errorf("stderr = %q, want %q", r.Stderr, "err-line\n")
	}

	// Streamed: the frames come before the result, and carry the same bytes.
	b, _ := json.Marshal(task.Task{ID: "st", Kind: task.KindSource, Source: code, Stream: true})
	a.send(proto.Task, b)
	var out, errb bytes.Buffer
	for {
		f := a.next()
		if f.Type == proto.Stdout {
			out.Write(f.Payload)
			continue
		}
		if f.Type == proto.Stderr {
			errb.Write(f.Payload)
			continue
		}
		if f.Type != proto.Result {
			t.Fatalf("got a %v frame, want stdout, stderr or result", f.Type)
		}
		r, err := task.DecodeResult(f.Payload)
		if err != nil || !r.OK {
			t.Fatalf("streamed result = %+v, %v", r, err)
		}
		if out.String() != r.Stdout || errb.String() != r.Stderr {
			t.Errorf("streamed stdout, stderr = %q, %q; want the captured %q, %q", out.String(), errb.String(), r.Stdout, r.Stderr)
		}
		break
	}
	// The agent's own log is not the task's stderr.
	r, _ = a.run(task.Task{ID: "after", Kind: task.KindSource, Source: "def f():\n    return 2\n"})
	if !r.OK || r.Stderr != "" {
		t.Errorf("next task = %+v, stderr %q; want ok with empty stderr", r.Error, r.Stderr)
	}
}

// runTask sends a run task with stdin, streams, and returns stdout and the
// exit code.
func runTask(t *testing.T, a *agentProc, id string, argv []string, stdin []string) (string, string, int) {
	t.Helper()
	b, _ := json.Marshal(task.Task{ID: id, Kind: task.KindRun, Argv: argv, Stream: true, Stdin: stdin != nil})
	a.send(proto.Task, b)
	for _, s := range stdin {
		a.send(proto.Stdin, []byte(s))
	}
	if stdin != nil {
		a.send(proto.Stdin, nil)
	}
	var out, errb bytes.Buffer
	for {
		f := a.next()
		switch f.Type {
		case proto.Stdout:
			out.Write(f.Payload)
		case proto.Stderr:
			errb.Write(f.Payload)
		case proto.Result:
			r, err := task.DecodeResult(f.Payload)
			if err != nil || !r.OK {
				t.Fatalf("run %v = %+v, %v", argv, r, err)
			}
			var v struct{ Code int }
			if err := r.Value.Decode(&v); err != nil {
				t.Fatal(err)
			}
			return out.String(), errb.String(), v.Code
		default:
			t.Fatalf("got a %v frame during a run task", f.Type)
		}
	}
}

// TestRunKind: commands run with streamed output, stdin with EOF, and their
// exit status, both forked from the agent (python3 -c) and as a child.
func TestRunKind(t *testing.T) {
	a := startAgent(t, nil)
	a.ready()
	tests := []struct {
		name     string
		argv     []string
		stdin    []string
		stdout   string
		stderr   string
		wantCode int
	}{
		{"python -c with stdin", []string{python, "-c", "import sys; print(len(sys.stdin.read().split()))"}, []string{"a\n", "b\n"}, "2\n", "", 0},
		{"exit status and both streams", []string{python, "-c", "import os, sys; print('out'); os.write(2, b'err\\n'); sys.exit(3)"}, nil, "out\n", "err\n", 3},
		{"no stdin is /dev/null", []string{python, "-c", "import sys; print(repr(sys.stdin.read()))"}, nil, "''\n", "", 0},
		{"a child process reads stdin", []string{"/bin/cat"}, []string{"x", "y"}, "xy", "", 0},
		{"killed by a signal", []string{python, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"}, nil, "", "", 128 + 9},
		{"missing program", []string{"/no/such/program"}, nil, "", "kiln: /no/such/program: No such file or directory\n", 127},
	}
	for i, tt := range tests {
		out, errb, code := runTask(t, a, strconv.Itoa(i), tt.argv, tt.stdin)
		if out != tt.stdout || errb != tt.stderr || code != tt.wantCode {
			t.Errorf("%s: run = stdout %q, stderr %q, code %d; want %q, %q, %d", tt.name, out, errb, code, tt.stdout, tt.stderr, tt.wantCode)
		}
	}
	// Output is not capped when streamed: 200,000 lines in order.
	out, _, code := runTask(t, a, "big", []string{python, "-c", "for i in range(200000): print(i)"}, nil)
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if code != 0 || len(lines) != 200000 || lines[0] != "0" || lines[199999] != "199999" {
		t.Errorf("200,000 lines: code %d, %d lines (first %q, last %q); want 0 and every line", code, len(lines), lines[0], lines[len(lines)-1])
	}
}

// TestBatch: a Tasks frame runs its items in order, each answered by its
// own Result with its own output, value or exception; a function that
// cannot be resolved fails every item on its own; and the results of the
// short tasks before a long one reach the host while it runs.
func TestBatch(t *testing.T) {
	a := startAgent(t, nil)
	if r := a.ready(); !r.Batch {
		t.Fatalf("ready = %+v, want batch: true", r)
	}
	batch := func(tk task.Task, items ...task.BatchItem) {
		t.Helper()
		b, err := json.Marshal(task.Batch{Task: &tk, Items: items})
		if err != nil {
			t.Fatal(err)
		}
		a.send(proto.Tasks, b)
	}
	item := func(id string, args ...any) task.BatchItem {
		return task.BatchItem{ID: id, Args: src("", args...).Args}
	}
	type outcome struct {
		ID, Value, Stdout, ErrorType, Kind string
	}
	got := func(n int) []outcome {
		t.Helper()
		var out []outcome
		for range n {
			r, _ := a.result()
			o := outcome{ID: r.ID, Stdout: r.Stdout, Kind: r.ErrorKind}
			if r.Value != nil {
				o.Value = string(r.Value.Data)
			}
			if r.Error != nil {
				o.ErrorType = r.Error.Type
			}
			out = append(out, o)
		}
		return out
	}

	fn := src("def f(n):\n    print('n', n)\n    if n == 0:\n        raise KeyError(n)\n    return n * 2\n")
	fn.Name, fn.CacheKey = "f", "f-key"
	batch(fn, item("a", 1), item("b", 0), item("c", 3))
	want := []outcome{
		{ID: "a", Value: "2", Stdout: "n 1\n"},
		{ID: "b", Stdout: "n 0\n", ErrorType: "KeyError", Kind: task.ErrorException},
		{ID: "c", Value: "6", Stdout: "n 3\n"},
	}
	if diff := cmp.Diff(want, got(3)); diff != "" {
		t.Errorf("batch results (-want +got):\n%s", diff)
	}

	missing := src("def g():\n    return 1\n")
	missing.Name = "nope"
	batch(missing, item("d"), item("e"))
	for _, o := range got(2) {
		if o.Kind != task.ErrorBadTask || o.ErrorType != "NameError" {
			t.Errorf("item %s of a batch whose function is missing: %+v, want a bad_task NameError", o.ID, o)
		}
	}

	// The long task waits for a file that the test creates only once it
	// has the short task's result: that result came while the long one ran.
	dir := t.TempDir()
	gate := filepath.Join(dir, "gate")
	wait := src("import os, time\ndef w(path):\n    while not os.path.exists(path):\n        time.sleep(0.01)\n    return 'waited'\n")
	wait.Name, wait.CacheKey = "w", "w-key"
	batch(wait, item("short", dir), item("long", gate))
	r, _ := a.result()
	if r.ID != "short" {
		t.Fatalf("first result is %q, want short", r.ID)
	}
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r, _ = a.result()
	if r.ID != "long" || !r.OK || string(r.Value.Data) != `"waited"` {
		t.Errorf("long task result = %+v, want long, ok, \"waited\"", r)
	}
}

// TestBadBatch: a Tasks frame that is not a batch ends the agent (exit 2)
// with a log line naming it; no task of it runs.
func TestBadBatch(t *testing.T) {
	for _, payload := range []string{`{`, `[]`, `{"task": 1, "items": []}`, `{"task": {}, "items": {}}`} {
		t.Run(payload, func(t *testing.T) {
			a := startAgent(t, nil)
			a.ready()
			a.wantCode = 2
			a.send(proto.Tasks, []byte(payload))
			_ = a.conn.SetReadDeadline(time.Now().Add(ioTimeout))
			if f, err := a.r.Next(); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("Next after a bad batch = %v, %v, want io.EOF or a reset", f.Type, err)
			}
			if !a.logContains("undecodable batch") {
				t.Errorf("agent log = %q, want it to name the undecodable batch", a.stderr.String())
			}
		})
	}
}
