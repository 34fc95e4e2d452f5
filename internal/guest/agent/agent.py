"""kiln guest agent: runs Python tasks sent by the host over a framed byte stream.

Runs inside the guest as root, under the image's interpreter, standard library
only (Python 3.9+). The frame protocol and the task/result messages are
described in docs/design.md and docs/agent.md.

    agent.py --port /dev/vportNpM [--preload mod1,mod2]
    agent.py --fd N [--preload mod1,mod2]

Logs go to the real stderr (kiln-init relays them as Log frames). The agent
exits 0 when the stream ends, 2 on bad usage or a desynchronised stream.
"""

import binascii
import json
import os
import struct
import sys
import time

VERSION = "1"

# Frame header: magic 'K', version 1, type, flags, big-endian payload length.
MAGIC = 0x4B
PROTO_VERSION = 1
HEADER = struct.Struct(">BBBBI")

T_STDOUT = 0x03  # agent→host: a chunk of the task's fd 1 (streamed tasks)
T_STDERR = 0x04  # agent→host: a chunk of the task's fd 2 (streamed tasks)
T_LOG = 0x07
T_STDIN = 0x08  # host→agent: a chunk of the task's fd 0; empty means end of input
T_READY = 0x10
T_TASK = 0x11
T_RESULT = 0x12
T_RESEED = 0x13
T_RESEEDED = 0x14

# Limits and failure kinds are defined by the host (Go package
# internal/guest/task); a test holds these copies to them.
DEFAULT_MAX_OUTPUT = 1 << 20  # bytes of stdout and of stderr, each
DEFAULT_MAX_RESULT = 10 << 20  # bytes of the serialized value

# error_kind of a failed result.
E_EXCEPTION = "exception"  # the function raised
E_BAD_TASK = "bad_task"  # bad source, missing function, undecodable arguments
E_TOO_LARGE = "too_large"  # the serialized result is over max_result
E_UNSERIALIZABLE = "unserializable"  # the value cannot be encoded
ERROR_KINDS = (E_EXCEPTION, E_BAD_TASK, E_TOO_LARGE, E_UNSERIALIZABLE)
DEFAULT_MAX_FRAME = 1 << 30  # largest incoming frame the agent accepts

# Bounds on error fields, as JSON-encoded bytes, so a Result frame always
# stays under max_result + 2*max_output + 64 KiB.
MAX_TYPE = 512
MAX_MESSAGE = 8 << 10
MAX_TRACEBACK = 24 << 10
MAX_REPR = 1000  # characters (then also bounded as JSON bytes)
MAX_REPR_JSON = 6 << 10

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

TASK_MODULE = "__kiln_task__"


B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def b64decode(s):
    """Strict standard base64 decoding without importing base64 (which imports re)."""
    if not isinstance(s, str):
        raise ValueError("base64 data must be a string")
    b = s.encode("ascii", "strict")
    if b.translate(None, B64_ALPHABET):
        raise ValueError("invalid character in base64 data")
    return binascii.a2b_base64(b)


def b64encode(b):
    return binascii.b2a_base64(b, newline=False).decode("ascii")


# LOG_FD is a copy of the agent's original stderr (relayed by kiln-init as
# Log frames): while a task runs, fds 1 and 2 are the task's.
LOG_FD = 2


def log(msg):
    """Writes one line to the agent's log."""
    try:
        os.write(LOG_FD, ("kiln-agent: %s\n" % msg).encode("utf-8", "replace"))
    except Exception:
        pass


AGENT_FILE = log.__code__.co_filename


class StreamClosed(Exception):
    """The peer closed the stream in the middle of a frame."""


class ProtocolError(Exception):
    """The stream does not carry kiln frames (bad magic or version)."""


class Transport:
    """A blocking byte stream on one file descriptor.

    Everything that knows how bytes reach the host lives here, so another
    transport (vsock) only needs another constructor.
    """

    def __init__(self, fd):
        self.fd = fd
        # _thread is built in and costs nothing to import; task code may
        # start threads, so frames are written under one lock.
        import _thread

        self._lock = _thread.allocate_lock()

    @classmethod
    def open_port(cls, path):
        """Opens a virtio-serial port (or any character device) read+write, unbuffered."""
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
        return cls(os.open(path, flags))

    @classmethod
    def from_fd(cls, fd):
        """Uses an inherited socket or pipe."""
        os.set_inheritable(fd, False)
        return cls(fd)

    def read_exact(self, n, eof_ok=False):
        """Reads exactly n bytes. Returns None at a clean end of stream when
        eof_ok and nothing was read; raises StreamClosed on a short read."""
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = os.read(self.fd, min(n - len(buf), 1 << 20))
            except InterruptedError:
                continue
            if not chunk:
                if eof_ok and not buf:
                    return None
                raise StreamClosed("stream ended after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def discard(self, n):
        """Reads and drops n bytes."""
        while n > 0:
            got = self.read_exact(min(n, 1 << 20))
            n -= len(got)

    def write(self, data):
        """Writes all of data, with one os.write loop, under the writer lock."""
        view = memoryview(data)
        with self._lock:
            while view:
                try:
                    n = os.write(self.fd, view)
                except InterruptedError:
                    continue
                view = view[n:]

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


class Conn:
    """Frames on top of a Transport."""

    def __init__(self, transport, max_frame=DEFAULT_MAX_FRAME):
        self.t = transport
        self.max_frame = max_frame

    def send(self, ftype, payload):
        self.t.write(HEADER.pack(MAGIC, PROTO_VERSION, ftype, 0, len(payload)) + payload)

    def send_json(self, ftype, obj):
        self.send(ftype, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))

    def recv(self):
        """Returns (type, payload), (type, None) for a frame over max_frame
        (already discarded), or None at a clean end of stream."""
        hdr = self.t.read_exact(HEADER.size, eof_ok=True)
        if hdr is None:
            return None
        magic, version, ftype, _flags, length = HEADER.unpack(hdr)
        if magic != MAGIC:
            raise ProtocolError("bad frame magic 0x%02x" % magic)
        if version != PROTO_VERSION:
            raise ProtocolError("unsupported frame version %d (want %d)" % (version, PROTO_VERSION))
        if length > self.max_frame:
            self.t.discard(length)
            return ftype, None, length
        return ftype, self.t.read_exact(length), length


# ---------------------------------------------------------------- helpers


def json_len(s):
    """Length of s as the body of a JSON string (without quotes) in UTF-8, as send_json writes it."""
    return len(json.dumps(s, ensure_ascii=False).encode("utf-8", "surrogatepass")) - 2


def bound_json(s, limit, keep_tail=False):
    """Cuts s until its JSON encoding (without quotes) is at most limit bytes.
    Returns (string, truncated)."""
    if len(s) <= limit // 6 or json_len(s) <= limit:
        return s, False
    while s:
        n = json_len(s)
        if n <= limit:
            break
        keep = max(0, min(len(s) - 1, int(len(s) * limit / n)))
        s = s[len(s) - keep:] if keep_tail else s[:keep]
    return s, True


def qualname(exc_type):
    mod = getattr(exc_type, "__module__", None) or ""
    name = getattr(exc_type, "__qualname__", None) or getattr(exc_type, "__name__", "?")
    if mod in ("builtins", "__main__", ""):
        return name
    return mod + "." + name


def error_fields(exc):
    """Bounded type/message/traceback of exc. The traceback leaves out the
    agent's own leading frames, so it starts at the task's code."""
    try:
        message = str(exc)
    except BaseException as e:  # a broken __str__
        message = "<unprintable %s: %s>" % (type(exc).__name__, type(e).__name__)
    try:
        import traceback

        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == AGENT_FILE:
            tb = tb.tb_next
        tb = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:
        tb = ""
    return {
        "type": bound_json(qualname(type(exc)), MAX_TYPE)[0],
        "message": bound_json(message, MAX_MESSAGE)[0],
        "traceback": bound_json(tb, MAX_TRACEBACK, keep_tail=True)[0],
    }


def safe_repr(v):
    try:
        r = repr(v)
    except BaseException as e:
        r = "<%s object; repr failed: %s>" % (type(v).__name__, type(e).__name__)
    if len(r) > MAX_REPR:
        r = r[: MAX_REPR - 3] + "..."
    return bound_json(r, MAX_REPR_JSON)[0]


class OutputPump:
    """Reads one of a task's output pipes in a thread: keeps the first
    `limit` bytes for the result (none when limit is 0) and, when conn is
    set, streams every chunk to the host as frames of type ftype."""

    def __init__(self, read_fd, limit, conn=None, ftype=0):
        import threading

        self.fd = read_fd
        self.limit = limit
        self.conn = conn
        self.ftype = ftype
        self.parts = []
        self.size = 0
        self.truncated = False
        self.thread = threading.Thread(target=self._run, name="kiln-output", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                data = os.read(self.fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                return  # the read end was closed by finish()
            if not data:
                return
            if self.conn is not None:
                try:
                    self.conn.send(self.ftype, data)
                except OSError:
                    self.conn = None
            if self.limit <= 0:
                continue  # streamed only
            room = self.limit - self.size
            if len(data) > room:
                self.truncated = True
                data = data[: max(room, 0)]
            if data:
                self.parts.append(data)
                self.size += len(data)

    def finish(self, timeout):
        """Waits for the end of the output: every writer closed its end. A
        process that escaped the task's process tree can hold a pipe open,
        so after timeout the read end is closed and what came is kept."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            log("task output still open %.0f s after the task (a process outside the task holds it); closing it" % timeout)
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.thread.join(1.0)

    def value(self):
        """Returns (text, truncated), text bounded as JSON to `limit` bytes."""
        text = b"".join(self.parts).decode("utf-8", "replace")
        text, cut = bound_json(text, self.limit)
        return text, self.truncated or cut


class InputPipe:
    """Feeds the Stdin frames of the running task into its fd 0."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()

    def feed(self, data):
        """Writes a Stdin frame's payload; an empty one ends the input."""
        if self.write_fd is None:
            return
        if not data:
            self.close()
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.write_fd, view)
                view = view[n:]
        except OSError:  # the task closed its stdin or exited
            self.close()

    def close(self):
        fd, self.write_fd = self.write_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


# OUTPUT_GRACE bounds the wait for a task's output pipes to reach EOF once
# its processes are gone.
OUTPUT_GRACE = 2.0


class TaskIO:
    """A task's fds 0, 1 and 2 for as long as it runs: fd 0 is /dev/null or
    the host's Stdin frames, fds 1 and 2 are pipes read by OutputPumps, so
    that what C code, os.write and subprocesses write is kept like print's
    output. sys.stdin/stdout/stderr are line-buffered text files on them.

    Everything the task starts inherits these fds; finish() restores the
    agent's own after the task's processes are killed (reap_children)."""

    def __init__(self, conn, limit, stream, stdin, router):
        self.router = router
        self.input = InputPipe() if stdin else None
        # The read end ends up only on fd 0: dup2 below, then closed here.
        in_fd = self.input.read_fd if stdin else os.open(os.devnull, os.O_RDONLY)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.saved = [os.dup(0), os.dup(1), os.dup(2)]
        self.saved_sys = sys.stdin, sys.stdout, sys.stderr
        for fd, target in ((in_fd, 0), (out_w, 1), (err_w, 2)):
            os.dup2(fd, target)
            os.close(fd)
        stream_conn = conn if stream else None
        self.out = OutputPump(out_r, limit, stream_conn, T_STDOUT)
        self.err = OutputPump(err_r, limit, stream_conn, T_STDERR)
        if self.input is not None:
            router.attach(self.input)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")

    def finish(self):
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        sys.stdin, sys.stdout, sys.stderr = self.saved_sys
        for i, fd in enumerate(self.saved):
            os.dup2(fd, i)
            os.close(fd)
        reap_children()
        if self.input is not None:
            # It stays attached to the router until the host's end of input.
            self.input.close()
        self.out.finish(OUTPUT_GRACE)
        self.err.finish(OUTPUT_GRACE)

    def fill(self, res):
        """Sets the result's stdout, stderr and truncation flags."""
        res["stdout"], so_cut = self.out.value()
        res["stderr"], se_cut = self.err.value()
        if so_cut:
            res["stdout_truncated"] = True
        if se_cut:
            res["stderr_truncated"] = True


class BadTask(Exception):
    """A task that cannot be run: bad source, missing function, undecodable arguments."""


def ms(t0, t1):
    return round((t1 - t0) * 1000.0, 4)


# ---------------------------------------------------------------- tasks


def decode_value(v, what):
    """Decodes a task Value {"enc": "json"|"pickle", "data": …}."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise BadTask("%s is not a value object" % what)
    enc = v.get("enc")
    data = v.get("data")
    if enc == "json":
        return data
    if enc == "pickle":
        if not isinstance(data, str):
            raise BadTask("%s: pickle data must be a base64 string" % what)
        raw = b64decode(data)
        return load_pickle(raw, "")
    raise BadTask("%s: unknown encoding %r (want \"json\" or \"pickle\")" % (what, enc))


def missing_lib(name):
    return BadTask(
        "image has no %s: install python3-%s (or add %s to the image's requirements) or send the function by source"
        % (name, name, name)
    )


def load_pickle(raw, pickler):
    """Unpickles raw with the named pickler ("" and "pickle" use pickle.loads,
    which also loads cloudpickle and dill payloads when those are installed)."""
    import pickle

    if pickler in ("cloudpickle", "dill"):
        try:
            lib = __import__(pickler)
        except ImportError:
            raise missing_lib(pickler) from None
        loads = lib.loads
    elif pickler in ("", "pickle"):
        loads = pickle.loads
    else:
        raise BadTask("unknown pickler %r (want cloudpickle, dill or pickle)" % pickler)
    try:
        return loads(raw)
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root in ("cloudpickle", "dill"):
            raise missing_lib(root) from None
        raise


class Task:
    """One parsed task and the state needed to clean up after it."""

    def __init__(self, msg):
        self.msg = msg
        self.id = msg.get("id", "") if isinstance(msg, dict) else ""
        if not isinstance(self.id, str):
            self.id = str(self.id)
        self.module = None
        self.filename = None

    def resolve(self):
        """Returns the callable the task names."""
        m = self.msg
        kind = m.get("kind")
        if kind == "ref":
            return self._resolve_ref(m.get("ref") or "")
        if kind == "source":
            return self._resolve_source(m.get("source"), m.get("name") or "")
        if kind == "pickle":
            raw = m.get("pickle")
            if not isinstance(raw, str) or not raw:
                raise BadTask("pickle task without pickle bytes")
            fn = load_pickle(b64decode(raw), m.get("pickler") or "")
            if not callable(fn):
                raise BadTask("unpickled object of type %s is not callable" % type(fn).__name__)
            return fn
        raise BadTask("unknown task kind %r (want ref, source, pickle or run)" % (kind,))

    def _resolve_ref(self, ref):
        import importlib

        if ":" in ref:
            modname, _, attr = ref.partition(":")
        else:
            modname, _, attr = ref.rpartition(".")
        if not modname or not attr:
            raise BadTask("bad ref %r: want \"module:function\"" % ref)
        obj = importlib.import_module(modname)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise BadTask("%s is a %s, not a callable" % (ref, type(obj).__name__))
        return obj

    def _resolve_source(self, source, name):
        if not isinstance(source, str):
            raise BadTask("source task without source text")
        import linecache
        import types

        self.filename = "<kiln-task %s>" % self.id
        # Register the text so tracebacks show the task's source lines.
        linecache.cache[self.filename] = (len(source), None, source.splitlines(True), self.filename)
        mod = types.ModuleType(TASK_MODULE)
        mod.__file__ = self.filename
        sys.modules[TASK_MODULE] = mod
        self.module = mod
        code = compile(source, self.filename, "exec")
        exec(code, mod.__dict__)
        ns = mod.__dict__
        if name:
            obj = ns
            parts = name.split(".")
            if parts[0] not in ns:
                raise NameError("name %r is not defined by the task source" % parts[0])
            obj = ns[parts[0]]
            for part in parts[1:]:
                obj = getattr(obj, part)
        else:
            fns = sorted(
                k
                for k, v in ns.items()
                if isinstance(v, types.FunctionType) and getattr(v, "__module__", None) == TASK_MODULE
            )
            if len(fns) != 1:
                raise BadTask(
                    "task has no name and its source defines %d functions (%s): say which one to call"
                    % (len(fns), ", ".join(fns) or "none")
                )
            obj = ns[fns[0]]
        if not callable(obj):
            raise BadTask("%s is a %s, not a callable" % (name, type(obj).__name__))
        return obj

    def run_spec(self):
        """(argv, env) of a run task."""
        argv, env = self.msg.get("argv"), self.msg.get("env") or {}
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise BadTask("run task needs argv, a non-empty list of strings")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise BadTask("run task env must map strings to strings")
        return argv, env

    def args(self):
        args = decode_value(self.msg.get("args"), "args")
        kwargs = decode_value(self.msg.get("kwargs"), "kwargs")
        if args is None:
            args = []
        if kwargs is None:
            kwargs = {}
        if not isinstance(args, (list, tuple)):
            raise BadTask("args must be a list, got %s" % type(args).__name__)
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise BadTask("kwargs must be a dict with string keys")
        return args, kwargs

    def cleanup(self):
        if self.module is not None:
            if sys.modules.get(TASK_MODULE) is self.module:
                del sys.modules[TASK_MODULE]
            self.module = None
        if self.filename is not None:
            import linecache

            linecache.cache.pop(self.filename, None)


def limit(msg, key, default):
    v = msg.get(key) if isinstance(msg, dict) else None
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    return default


def json_exact(v, depth=0):
    """True when json.dumps(v) round-trips to an equal value of the same types
    (a tuple becoming a list is accepted)."""
    t = type(v)
    if t is str or t is bool or t is int or v is None:
        return True
    if t is float:
        return v == v and v not in (float("inf"), float("-inf"))
    if depth > 200:
        return False
    if t is list or t is tuple:
        for x in v:
            if not json_exact(x, depth + 1):
                return False
        return True
    if t is dict:
        for k, x in v.items():
            if type(k) is not str or not json_exact(x, depth + 1):
                return False
        return True
    return False


class TooLarge(Exception):
    pass


def encode_value(v, max_result):
    """Returns the Value dict for v, raising TooLarge over max_result bytes of data."""
    ok = False
    try:
        ok = json_exact(v)
    except RecursionError:
        ok = False
    if ok:
        try:
            data = json.dumps(v, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (ValueError, TypeError, RecursionError):
            data = None
        if data is not None:
            size = len(data.encode("utf-8", "surrogatepass"))
            if size > max_result:
                raise TooLarge(size)
            # Embedded as raw JSON by the caller.
            return {"enc": "json", "data": RawJSON(data)}
    import pickle

    raw = pickle.dumps(v, protocol=pickle.DEFAULT_PROTOCOL)
    size = (len(raw) + 2) // 3 * 4
    if size > max_result:
        raise TooLarge(size)
    return {"enc": "pickle", "data": b64encode(raw), "repr": safe_repr(v)}


class RawJSON:
    """JSON text to splice into a message unchanged."""

    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text


def dumps_result(res):
    """Encodes a result dict, splicing a RawJSON value in without re-parsing it."""
    val = res.get("value")
    raw = None
    if val is not None and isinstance(val.get("data"), RawJSON):
        raw = val["data"].text
        res = dict(res)
        res["value"] = dict(val, data=None)
    text = json.dumps(res, ensure_ascii=False, separators=(",", ":"))
    if raw is not None:
        marker = '"value":{"enc":"json","data":null}'
        i = text.find(marker)
        text = text[:i] + '"value":{"enc":"json","data":' + raw + "}" + text[i + len(marker):]
    return text.encode("utf-8", "surrogatepass")


def serialize(value, max_result):
    """Returns the result fields for a returned value: ok+value, or an error."""
    try:
        return {"ok": True, "value": encode_value(value, max_result)}
    except TooLarge as e:
        return {
            "error": {
                "type": "ResultTooLarge",
                "message": "result is %d bytes, over the limit of %d bytes" % (e.args[0], max_result),
                "traceback": "",
            },
            "error_kind": E_TOO_LARGE,
        }
    except BaseException as e:
        err = error_fields(e)
        err["message"] = bound_json(
            "result of type %s cannot be serialized: %s" % (type(value).__name__, err["message"]), MAX_MESSAGE
        )[0]
        return {"error": err, "error_kind": E_UNSERIALIZABLE}


def bad_result(e, task_id=""):
    return dumps_result(
        {
            "id": task_id,
            "ok": False,
            "error": error_fields(e),
            "error_kind": E_BAD_TASK,
            "stdout": "",
            "stderr": "",
            "timings": {"deserialize_ms": 0.0, "call_ms": 0.0, "serialize_ms": 0.0},
        }
    )


def run_task(payload, conn=None, router=None):
    """Runs one Task frame payload and returns the Result payload bytes.
    conn and router are the host channel (for streamed output and stdin);
    without them the task's output is only captured."""
    t_start = time.perf_counter()
    try:
        msg = json.loads(payload)
        if not isinstance(msg, dict):
            raise BadTask("task is not a JSON object")
    except BaseException as e:
        return bad_result(e)
    task = Task(msg)
    max_output = limit(msg, "max_output", DEFAULT_MAX_OUTPUT)
    max_result = limit(msg, "max_result", DEFAULT_MAX_RESULT)
    stream = bool(msg.get("stream")) and conn is not None
    stdin = bool(msg.get("stdin")) and router is not None
    if msg.get("kind") == "run" and stream:
        max_output = 0  # a streamed command's output is not kept in its result
    res = {"id": task.id, "ok": False}
    timings = {"deserialize_ms": 0.0, "call_ms": 0.0, "serialize_ms": 0.0}
    try:
        tio = TaskIO(conn, max_output, stream, stdin, router or Router(None))
    except OSError as e:
        return bad_result(e, task.id)
    try:
        t1 = t2 = None
        try:
            if msg.get("kind") == "run":
                fn, args, kwargs = run_command, [task.run_spec()], {}
            else:
                fn = task.resolve()
                args, kwargs = task.args()
        except BaseException as e:
            res["error"] = error_fields(e)
            res["error_kind"] = E_BAD_TASK
        else:
            t1 = time.perf_counter()
            try:
                value = fn(*args, **kwargs)
            except BaseException as e:
                res["error"] = error_fields(e)
                res["error_kind"] = E_EXCEPTION
            else:
                t2 = time.perf_counter()
                res.update(serialize(value, max_result))
                value = None
            finally:
                fn = args = kwargs = None
    finally:
        tio.finish()
        task.cleanup()
    t3 = time.perf_counter()
    if t1 is None:
        timings["deserialize_ms"] = ms(t_start, t3)
    else:
        timings["deserialize_ms"] = ms(t_start, t1)
        if t2 is None:
            timings["call_ms"] = ms(t1, t3)
        else:
            timings["call_ms"] = ms(t1, t2)
            timings["serialize_ms"] = ms(t2, t3)
    tio.fill(res)
    res["timings"] = timings
    return dumps_result(res)


# ---------------------------------------------------------------- run


def python_form(argv):
    """(kind, target, rest) for python3 -c CODE / -m MOD / SCRIPT, else None."""
    exe = os.path.basename(argv[0])
    if exe not in ("python", "python3") and not exe.startswith("python3."):
        return None
    rest = argv[1:]
    if len(rest) >= 2 and rest[0] in ("-c", "-m"):
        return rest[0], rest[1], rest[2:]
    if rest and not rest[0].startswith("-"):
        return "file", rest[0], rest[1:]
    return None


def run_python(form, env):
    """Runs a python3 -c/-m/script command in this (forked) process and
    exits with its status; never returns."""
    kind, target, rest = form
    code = 0
    try:
        os.environ.update(env)
        import runpy

        if kind == "-c":
            import types

            sys.argv = ["-c"] + list(rest)
            sys.path.insert(0, "")
            # A real __main__ module, as python3 -c has: pickle (and so
            # multiprocessing) finds the command's functions through it.
            main = types.ModuleType("__main__")
            main.__builtins__ = __builtins__
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
        elif kind == "-m":
            sys.argv = [target] + list(rest)
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target] + list(rest)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def run_command(spec):
    """The "run" task: runs argv with the task's fds (kiln run from a
    snapshot) and returns {"code": exit status}, 128+N for signal N.
    python3 -c/-m/script commands run in a fork of the agent, so the
    modules it preloaded are imported already; others run as a child
    process with the image's environment plus env."""
    argv, env = spec
    form = python_form(argv)
    if form is not None:
        pid = os.fork()
        if pid == 0:
            try:
                # Only fds 0, 1 and 2 are the command's: an inherited copy
                # of the stdin pipe's write end would keep its input open.
                os.closerange(3, 1 << 16)
                run_python(form, env)
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    else:
        import subprocess

        penv = dict(os.environ)
        penv.update(env)
        try:
            proc = subprocess.Popen(argv, env=penv)
        except OSError as e:
            os.write(2, ("kiln: %s: %s\n" % (argv[0], e.strerror)).encode())
            return {"code": 127}
        code = proc.wait()
    if code < 0:
        code = 128 - code
    return {"code": code}


# ---------------------------------------------------------------- reseed


def reseed(payload):
    """Handles a Reseed frame: kernel entropy, Python's random, the clock."""
    errors = []
    try:
        msg = json.loads(payload)
        if not isinstance(msg, dict):
            raise ValueError("reseed message is not a JSON object")
        entropy = b64decode(msg.get("entropy") or "")
        time_ns = msg.get("time_ns") or 0
    except Exception as e:
        return {"ok": False, "error": "bad reseed message: %s" % e}
    if entropy:
        try:
            import fcntl

            fd = os.open("/dev/urandom", os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                # Mixing in needs no privilege; crediting and reseeding need CAP_SYS_ADMIN.
                os.write(fd, entropy)
                info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
                fcntl.ioctl(fd, RNDADDENTROPY, info)
                fcntl.ioctl(fd, RNDRESEEDCRNG, 0)
            finally:
                os.close(fd)
        except OSError as e:
            errors.append("reseeding the kernel RNG: %s (the agent needs root)" % e)
    else:
        errors.append("reseed message carries no entropy")
    if "random" in sys.modules:
        sys.modules["random"].seed(os.urandom(32))
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        try:
            np_random.seed()
        except Exception as e:
            errors.append("reseeding numpy.random: %s" % e)
    if time_ns and os.environ.get("KILN_AGENT_NO_CLOCK") != "1":
        try:
            if hasattr(time, "clock_settime_ns"):
                time.clock_settime_ns(time.CLOCK_REALTIME, int(time_ns))
            else:
                time.clock_settime(time.CLOCK_REALTIME, time_ns / 1e9)
        except (OSError, OverflowError, ValueError) as e:
            errors.append("setting the clock: %s" % e)
    return {"ok": not errors, "error": "; ".join(errors)}


# ---------------------------------------------------------------- main


def preload(mods):
    import importlib

    done, errs = [], {}
    t0 = time.perf_counter()
    for name in mods:
        try:
            importlib.import_module(name)
            done.append(name)
        except BaseException as e:
            errs[name] = "%s: %s" % (qualname(type(e)), e)
            log("preloading %s failed: %s" % (name, errs[name]))
    return done, errs, ms(t0, time.perf_counter())


USAGE = "usage: agent.py (--port PATH | --fd N) [--preload mod1,mod2] [--max-frame BYTES]"


def parse_args(argv):
    opts = {"port": None, "fd": None, "preload": [], "max_frame": DEFAULT_MAX_FRAME}
    i = 0
    while i < len(argv):
        a = argv[i]
        if "=" in a and a.startswith("--"):
            a, val = a.split("=", 1)
        else:
            val = None
        if a not in ("--port", "--fd", "--preload", "--max-frame"):
            raise ValueError("unknown argument %r" % a)
        if val is None:
            i += 1
            if i >= len(argv):
                raise ValueError("%s needs a value" % a)
            val = argv[i]
        if a == "--port":
            opts["port"] = val
        elif a == "--fd":
            opts["fd"] = int(val)
        elif a == "--preload":
            opts["preload"] += [m.strip() for m in val.split(",") if m.strip()]
        else:
            opts["max_frame"] = int(val)
        i += 1
    if (opts["port"] is None) == (opts["fd"] is None):
        raise ValueError("give exactly one of --port and --fd")
    return opts


def children(pid):
    """Direct children of pid, from /proc/PID/task/*/children."""
    kids = []
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return kids
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                kids.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
    return kids


def reap_children():
    """Kill what a task left running: a task's processes do not outlive it
    (a fork bomb or a forgotten background process would otherwise hold the
    warm VM's memory and pids for every later task)."""
    direct = children(os.getpid())
    if not direct:
        return
    import signal

    todo, seen = list(direct), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children(pid))
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in direct:
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass


class Router:
    """Reads the host channel in a thread: Stdin frames go to the input of
    the task that asked for stdin, every other frame to the main loop's
    queue (None at the end of the stream, or the exception that ended it).

    The host sends a stdin task's input right after its Task frame and
    always ends it with one empty Stdin frame, even when the task finished
    first. Stdin frames that come before the task has attached its input
    wait in order; an input stays attached until its empty frame arrives,
    so input the task did not read is dropped, never given to the next."""

    def __init__(self, conn):
        import queue
        import threading

        self.conn = conn
        self.frames = queue.Queue()
        self.lock = threading.Lock()
        self.input = None  # the attached input, until its end of input
        self.pending = []  # Stdin payloads that came before it attached
        if conn is not None:
            threading.Thread(target=self._run, name="kiln-reader", daemon=True).start()

    def attach(self, inp):
        """Makes inp the receiver of the next task input on the stream."""
        with self.lock:
            self.input = inp
            while self.pending and self.input is not None:
                self._deliver(self.pending.pop(0))

    def _deliver(self, data):
        # Called with the lock held.
        self.input.feed(data)
        if not data:
            self.input = None

    def _run(self):
        try:
            while True:
                frame = self.conn.recv()
                if frame is None:
                    self.frames.put(None)
                    return
                if frame[0] == T_STDIN:
                    data = frame[1] if frame[1] is not None else b""
                    with self.lock:
                        if self.input is None:
                            self.pending.append(data)
                        else:
                            self._deliver(data)
                    continue
                self.frames.put(frame)
        except BaseException as e:
            self.frames.put(e)


def too_large_result(length, max_frame):
    return dumps_result(
        {
            "id": "",
            "ok": False,
            "error": {
                "type": "TaskTooLarge",
                "message": "task is %d bytes, over the agent's limit of %d bytes" % (length, max_frame),
                "traceback": "",
            },
            "error_kind": E_BAD_TASK,
            "stdout": "",
            "stderr": "",
            "timings": {"deserialize_ms": 0.0, "call_ms": 0.0, "serialize_ms": 0.0},
        }
    )


def serve(conn):
    router = Router(conn)
    while True:
        frame = router.frames.get()
        if frame is None:
            return
        if isinstance(frame, BaseException):
            raise frame
        ftype, payload, length = frame
        if payload is None:
            log("dropped a type 0x%02x frame of %d bytes (limit %d)" % (ftype, length, conn.max_frame))
            if ftype == T_TASK:
                conn.send(T_RESULT, too_large_result(length, conn.max_frame))
            continue
        if ftype == T_TASK:
            conn.send(T_RESULT, run_task(payload, conn, router))
        elif ftype == T_RESEED:
            conn.send_json(T_RESEEDED, reseed(payload))
        else:
            log("ignoring frame of type 0x%02x (%d bytes)" % (ftype, length))


def main(argv):
    global LOG_FD
    try:
        LOG_FD = os.dup(2)
        os.set_inheritable(LOG_FD, False)
    except OSError:
        pass
    try:
        opts = parse_args(argv)
    except ValueError as e:
        log("%s\n%s" % (e, USAGE))
        return 2
    try:
        if opts["port"] is not None:
            transport = Transport.open_port(opts["port"])
        else:
            transport = Transport.from_fd(opts["fd"])
    except OSError as e:
        log("opening the host channel: %s" % e)
        return 1
    conn = Conn(transport, opts["max_frame"])
    done, errs, preload_ms = preload(opts["preload"])
    ready = {
        "python": "%d.%d.%d" % sys.version_info[:3],
        "agent": VERSION,
        "pid": os.getpid(),
        "preloaded": done,
        "preload_ms": preload_ms,
    }
    if errs:
        ready["errors"] = errs
    try:
        conn.send_json(T_READY, ready)
        serve(conn)
    except (StreamClosed, ProtocolError) as e:
        log("host channel: %s" % e)
        return 2
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
