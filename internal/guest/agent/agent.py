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

VERSION = "2"

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
T_TASKS = 0x15  # host→agent: several tasks of one function (a batch)

# A batch's results are written together: between tasks the main thread
# writes what has waited FLUSH_AFTER seconds, and while a long task runs a
# thread writes what has waited FLUSH_BACKSTOP (it wakes that often during
# a batch, no more, so that it seldom takes the GIL from the tasks).
FLUSH_AFTER = 0.002
FLUSH_BACKSTOP = 0.02

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
        # Frames written later (write_later), oldest first, and when the
        # oldest of them was ready; guarded by _lock.
        self._later = []
        self._later_since = 0.0
        # Bytes read ahead: one read often holds several frames. One reader
        # at a time (the Router sees to that).
        self._buf = bytearray()

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
        buf = self._buf
        while len(buf) < n:
            try:
                chunk = os.read(self.fd, min(max(n - len(buf), 65536), 1 << 20))
            except InterruptedError:
                continue
            if not chunk:
                if eof_ok and not buf:
                    return None
                raise StreamClosed("stream ended after %d of %d bytes" % (len(buf), n))
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def discard(self, n):
        """Reads and drops n bytes."""
        while n > 0:
            got = self.read_exact(min(n, 1 << 20))
            n -= len(got)

    def buffered(self, header):
        """Whether a whole frame is already read ahead (header: the frame
        header's struct), so that reading it will not block."""
        buf = self._buf
        if len(buf) < header.size:
            return False
        return len(buf) >= header.size + header.unpack_from(buf)[-1]

    def write_later(self, data):
        """Queues data to be written with the next write or flush."""
        with self._lock:
            if not self._later:
                self._later_since = time.monotonic()
            self._later.append(data)

    def later_age(self):
        """Seconds the oldest queued frame has waited (0: none waits)."""
        with self._lock:
            return time.monotonic() - self._later_since if self._later else 0.0

    def flush(self):
        """Writes the queued frames."""
        self.write(b"")

    def write(self, data):
        """Writes the queued frames and then all of data, with one os.write
        loop, under the writer lock."""
        with self._lock:
            if self._later:
                self._later.append(data)
                data = b"".join(self._later)
                self._later.clear()
            view = memoryview(data)
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
        """Writes a frame, after the frames queued by send_later."""
        self.t.write(HEADER.pack(MAGIC, PROTO_VERSION, ftype, 0, len(payload)) + payload)

    def send_later(self, ftype, payload):
        """Queues a frame for the next send or flush."""
        self.t.write_later(HEADER.pack(MAGIC, PROTO_VERSION, ftype, 0, len(payload)) + payload)

    def flush(self):
        self.t.flush()

    def buffered(self):
        """Whether the next frame is already read (reading it will not block)."""
        return self.t.buffered(HEADER)

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


def error_fields(exc, details=False):
    """Bounded type/message/traceback of exc. The traceback leaves out the
    agent's own frames, so it starts at the task's code. With details, the
    exception's module, qualname, args and instance state are added (the
    SDK rebuilds an exception of the same type from them)."""
    try:
        message = str(exc)
    except BaseException as e:  # a broken __str__
        message = "<unprintable %s: %s>" % (type(exc).__name__, type(e).__name__)
    try:
        import traceback

        tb = "".join(traceback.format_exception(type(exc), exc, user_frames(exc.__traceback__)))
    except BaseException:
        tb = ""
    out = {
        "type": bound_json(qualname(type(exc)), MAX_TYPE)[0],
        "message": bound_json(message, MAX_MESSAGE)[0],
        "traceback": bound_json(tb, MAX_TRACEBACK, keep_tail=True)[0],
    }
    if details:
        t = type(exc)
        out["module"] = bound_json(getattr(t, "__module__", "") or "", MAX_TYPE)[0]
        out["qualname"] = bound_json(getattr(t, "__qualname__", "") or t.__name__, MAX_TYPE)[0]
        for key, val in (("args", tuple(getattr(exc, "args", ()))), ("state", dict(getattr(exc, "__dict__", {}) or {}))):
            if key == "state" and not val:
                continue
            try:
                enc = encode_value(val, MAX_ERROR_VALUE, exact=True)
            except BaseException:
                continue
            if isinstance(enc.get("data"), RawJSON):
                enc = {"enc": "json", "data": json.loads(enc["data"].text)}
            out[key] = enc
    return out


# MAX_ERROR_VALUE bounds the encoded args and state of a raised exception.
MAX_ERROR_VALUE = 64 << 10


def user_frames(tb):
    """The traceback from the first frame that is not the agent's own: what
    a user sees is their code, not kiln's."""
    while tb is not None and tb.tb_frame.f_code.co_filename == AGENT_FILE:
        tb = tb.tb_next
    return tb


def safe_repr(v):
    try:
        r = repr(v)
    except BaseException as e:
        r = "<%s object; repr failed: %s>" % (type(v).__name__, type(e).__name__)
    if len(r) > MAX_REPR:
        r = r[: MAX_REPR - 3] + "..."
    return bound_json(r, MAX_REPR_JSON)[0]


class Sink:
    """What a task wrote to fd 1 or fd 2: keeps the first `limit` bytes for
    the result (none when limit is 0) and, when conn is set, streams every
    chunk to the host as frames of type ftype."""

    def __init__(self, limit, conn=None, ftype=0):
        self.limit = limit
        self.conn = conn
        self.ftype = ftype
        self.parts = []
        self.size = 0
        self.truncated = False

    def feed(self, data):
        if self.conn is not None:
            try:
                self.conn.send(self.ftype, data)
            except OSError:
                self.conn = None
        if self.limit <= 0:
            return  # streamed only
        room = self.limit - self.size
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        if data:
            self.parts.append(data)
            self.size += len(data)

    def value(self):
        """Returns (text, truncated), text bounded as JSON to `limit` bytes."""
        text = b"".join(self.parts).decode("utf-8", "replace")
        text, cut = bound_json(text, self.limit)
        return text, self.truncated or cut


class Output:
    """The agent's fds 1 and 2: two pipes, made once, that every task (and
    all it starts) writes to. A thread reads them while tasks run, so a
    writer never blocks on a full pipe; at the end of a task the main
    thread reads what is left (the task's processes are gone by then) and
    takes the Sinks. Nothing is made or started per task: a task that
    writes nothing costs two non-blocking reads."""

    def __init__(self):
        import select
        import threading

        self.lock = threading.Lock()  # held while a chunk is read and fed
        self.read_fds = []
        self.write_fds = []
        for _ in (1, 2):
            r, w = os.pipe()
            os.set_blocking(r, False)
            self.read_fds.append(r)
            self.write_fds.append(w)
        # Between tasks what reaches the pipes is dropped (a Sink(0) keeps
        # nothing and holds no state, so one pair serves every time).
        self.idle = {fd: Sink(0) for fd in self.read_fds}
        self.sinks = self.idle
        self.poller = select.poll()  # the thread's
        self.drainer = select.poll()  # the main thread's (a poll object is not shared)
        for fd in self.read_fds:
            self.poller.register(fd, select.POLLIN)
            self.drainer.register(fd, select.POLLIN)
        threading.Thread(target=self._run, name="kiln-output", daemon=True).start()

    def _run(self):
        while True:
            try:
                events = self.poller.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                with self.lock:
                    self._read(fd)

    def _read(self, fd):
        """Reads one chunk of fd into its sink (the lock is held); reports
        whether there was one."""
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:
            return False
        self.sinks[fd].feed(data)
        return True

    def begin(self, out, err):
        """Points fds 1 and 2 at the pipes and makes out and err their sinks."""
        with self.lock:
            self.sinks = dict(zip(self.read_fds, (out, err)))
        os.dup2(self.write_fds[0], 1)
        os.dup2(self.write_fds[1], 2)

    def end(self):
        """Reads what the task left in the pipes into its sinks and stops
        feeding them. The task's processes must be gone: what they wrote
        is in the pipes, and nothing more comes."""
        with self.lock:
            for _ in range(1 << 12):  # bounded: a stray writer cannot hold us here
                ready = self.drainer.poll(0)
                if not ready:
                    break
                for fd, _ in ready:
                    self._read(fd)
            self.sinks = self.idle


OUTPUT = None  # the Output, made by the first task


class Pids:
    """Tells whether any process or thread was created since the last
    look, from the last pid the kernel handed out (/proc/loadavg), so that
    a task that started nothing costs no walk of /proc."""

    def __init__(self):
        try:
            self.fd = os.open("/proc/loadavg", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self.fd = None
        self.last = None

    def mark(self):
        """Notes the last pid; the look changed() took serves when nothing
        ran since (the agent starts no process between tasks)."""
        if self.last is None:
            self.last = self._read()

    def changed(self):
        now = self._read()
        was, self.last = self.last, now
        return now is None or now != was

    def _read(self):
        if self.fd is None:
            return None
        try:
            return os.pread(self.fd, 128, 0).split()[-1]
        except (OSError, IndexError):
            return None


PIDS = None


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


class TaskIO:
    """A task's fds 0, 1 and 2 for as long as it runs: fd 0 is /dev/null or
    the host's Stdin frames, fds 1 and 2 are the agent's output pipes
    (Output), so that what C code, os.write and subprocesses write is kept
    like print's output. sys.stdin/stdout/stderr are line-buffered text
    files on them.

    Everything the task starts inherits these fds; finish() kills what the
    task left running (reap_children) before it takes the output, so a
    task's output is all of it and never another task's."""

    # From the first task on, fd 0 is /dev/null and fds 1 and 2 are the
    # output pipes, between tasks too (the agent logs to LOG_FD; what else
    # reaches fds 1 and 2 between tasks is dropped). null_fd is /dev/null,
    # files the text files on fds 0-2, agent_sys the agent's own
    # sys.stdout and sys.stderr (on LOG_FD), all made once.
    null_fd = None
    files = None
    agent_sys = None

    def __init__(self, conn, limit, stream, stdin, router):
        global OUTPUT, PIDS
        cls = TaskIO
        if cls.null_fd is None:
            cls.null_fd = os.open(os.devnull, os.O_RDONLY)
            os.set_inheritable(cls.null_fd, False)
            os.dup2(cls.null_fd, 0)
            log_file = open(LOG_FD, "w", buffering=1, closefd=False, errors="backslashreplace")
            cls.agent_sys = (sys.stdin, log_file, log_file)
            OUTPUT = Output()
            PIDS = Pids()
        self.router = router
        self.input = InputPipe() if stdin else None
        if stdin:
            # The read end ends up only on fd 0.
            os.dup2(self.input.read_fd, 0)
            os.close(self.input.read_fd)
        stream_conn = conn if stream else None
        self.out = Sink(limit, stream_conn, T_STDOUT)
        self.err = Sink(limit, stream_conn, T_STDERR)
        PIDS.mark()
        OUTPUT.begin(self.out, self.err)
        if self.input is not None:
            router.attach(self.input)
        files = cls.files
        if files is None or any(f.closed for f in files):
            files = cls.files = (
                open(0, "r", closefd=False),
                open(1, "w", buffering=1, closefd=False, errors="backslashreplace"),
                open(2, "w", buffering=1, closefd=False, errors="backslashreplace"),
            )
        sys.stdin, sys.stdout, sys.stderr = files

    def finish(self):
        files = TaskIO.files
        if sys.stdout is files[1] and sys.stderr is files[2]:
            outs = files[1:]  # as the task found them: flushed once each
        else:
            outs = (sys.stdout, sys.stderr) + files[1:]
        for f in outs:
            try:
                f.flush()
            except Exception:
                pass
        sys.stdin, sys.stdout, sys.stderr = TaskIO.agent_sys
        if PIDS.changed():
            reap_children()
        if self.input is not None:
            os.dup2(TaskIO.null_fd, 0)
            # It stays attached to the router until the host's end of input.
            self.input.close()
        OUTPUT.end()

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
    return (t1 - t0) * 1000.0


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


# CODE_CACHE keeps compiled task sources: a warm VM runs the same function
# many times, and compiling it again each time cost more than a small call.
CODE_CACHE = {}
CODE_CACHE_MAX = 256

# FN_CACHE keeps, by the task's cache_key (the host's content address of a
# registered function: same source, names and module), the function and
# the modules its source was run in, oldest first. A warm VM's later tasks
# of that function reuse them, as a pool's worker process reuses what it
# imported: module-level state one task leaves is seen by the next task of
# the same function on that VM.
FN_CACHE = {}
FN_CACHE_MAX = 64


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
        raise BadTask("unknown task kind %r (want ref, source, pickle, run or shell)" % (kind,))

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

        m = self.msg
        key = m.get("cache_key")
        if not isinstance(key, str) or not key:
            key = None
        hit = FN_CACHE.get(key) if key else None
        if hit is not None:
            # The same function (same source, names and module) ran here
            # before: its module is put back as it was left.
            obj, modules, main, lines, self.filename = hit
            self.saved_modules = {}
            self.modules = {}
            for modname, mod in modules.items():
                self._install(modname, mod)
            self.module = main
            self.lines = lines
            self._cache_lines()
            return obj
        obj = self._resolve_source_fresh(source, name)
        if key:
            if len(FN_CACHE) >= FN_CACHE_MAX:
                FN_CACHE.pop(next(iter(FN_CACHE)))
            FN_CACHE[key] = (obj, dict(self.modules), self.module, self.lines, self.filename)
        return obj

    def _cache_lines(self):
        import linecache

        for fn, lines in self.lines.items():
            linecache.cache[fn] = (sum(len(x) for x in lines), None, lines, fn)

    def _resolve_source_fresh(self, source, name):
        import types

        m = self.msg
        modname = m.get("module") or TASK_MODULE
        if not isinstance(modname, str) or not all(p.isidentifier() for p in modname.split(".")):
            raise BadTask("bad module name %r" % (modname,))
        self.filename = m.get("filename") or "<kiln-task %s>" % self.id
        if not isinstance(self.filename, str):
            raise BadTask("filename must be a string")
        # During the task the module is importable under the client's own
        # module name (with stand-in parent packages), so that pickle finds
        # what it defines: arguments of the client's classes decode, and
        # results of them decode on the client.
        self.saved_modules = {}
        self.modules = {}
        mod = self._module(modname)
        self.module = mod
        self.lines = {}
        ns = mod.__dict__
        for entry in m.get("namespace") or []:
            self._define(entry, ns)
        exec(self._compile(source, self.filename, m.get("lineno") or 1), ns)
        self._cache_lines()
        if name:
            parts = name.split(".")
            if parts[0] not in ns:
                raise NameError("name %r is not defined by the task source" % parts[0])
            obj = ns[parts[0]]
            for part in parts[1:]:
                obj = getattr(obj, part)
        else:
            fns = sorted(
                k for k, v in ns.items() if isinstance(v, types.FunctionType) and getattr(v, "__module__", None) == modname
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

    def _compile(self, source, filename, lineno):
        """Compiles source as if it stood at line lineno of filename, so that
        tracebacks name the client's file and line, and records its lines
        for linecache."""
        if not isinstance(lineno, int) or lineno < 1:
            lineno = 1
        lines = self.lines.setdefault(filename, [])
        text = source.splitlines(True)
        if len(lines) < lineno - 1 + len(text):
            lines.extend(["\n"] * (lineno - 1 + len(text) - len(lines)))
        lines[lineno - 1 : lineno - 1 + len(text)] = text
        key = (source, filename, lineno)
        code = CODE_CACHE.get(key)
        if code is None:
            if len(CODE_CACHE) >= CODE_CACHE_MAX:
                CODE_CACHE.clear()
            code = CODE_CACHE[key] = compile("\n" * (lineno - 1) + source, filename, "exec")
        return code

    def _module(self, modname):
        """The task's module called modname, created (and made importable,
        with stand-in parent packages) on first use."""
        import types

        mod = self.modules.get(modname)
        if mod is not None:
            return mod
        if not all(p.isidentifier() for p in modname.split(".")):
            raise BadTask("bad module name %r" % (modname,))
        mod = types.ModuleType(modname)
        mod.__file__ = self.filename
        mod.__builtins__ = __builtins__
        self._install(modname, mod)
        return mod

    def _install(self, modname, mod):
        """Makes mod importable as modname for the task (with stand-in
        parent packages); cleanup() puts back what was there."""
        import types

        parts = modname.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in self.saved_modules:
                self.saved_modules[name] = sys.modules.get(name)
            if i < len(parts) and name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
        sys.modules[modname] = mod
        self.modules[modname] = mod

    def _define(self, e, ns):
        """Defines one entry of a task's namespace (what the function refers
        to in its module, captured by the SDK): an import, a reference to an
        importable object, a value, or the source of a function or class."""
        import importlib

        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise BadTask("bad namespace entry %r" % (e,))
        name = e["name"]
        target = e.get("module")
        if target:
            # A name of another of the client's modules: it lives in a
            # module of that name (created once per task).
            ns = self._module(target).__dict__
        if "import" in e:
            mod = importlib.import_module(e["import"])
            for sub in e.get("submodules") or []:
                importlib.import_module(sub)
            if e.get("top"):
                mod = sys.modules[e["import"].split(".")[0]]
            ns[name] = mod
        elif "ref" in e:
            ns[name] = self._resolve_ref(e["ref"])
        elif "value" in e:
            ns[name] = decode_value(e["value"], "value of %s" % name)
        elif "source" in e:
            exec(self._compile(e["source"], e.get("filename") or self.filename, e.get("lineno") or 1), ns)
            if name not in ns:
                raise BadTask("the source sent for %s does not define it" % name)
        else:
            raise BadTask("namespace entry %s has no import, ref, value or source" % name)

    def shell_spec(self):
        """(command, walltime) of a shell task: its command template
        formatted with the task's keyword arguments, as str.format does."""
        cmd, walltime = self.msg.get("command"), self.msg.get("walltime") or 0
        if not isinstance(cmd, str) or not cmd:
            raise BadTask("shell task needs a command")
        if not isinstance(walltime, (int, float)) or isinstance(walltime, bool) or walltime < 0:
            raise BadTask("shell task walltime must be a non-negative number of seconds")
        args, kwargs = self.args()
        try:
            cmd = cmd.format(*args, **kwargs)
        except (KeyError, IndexError, ValueError) as e:
            raise BadTask("formatting the shell command %r with the call's arguments: %s: %s" % (cmd, type(e).__name__, e)) from None
        return cmd, walltime

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
            for name, prev in getattr(self, "saved_modules", {}).items():
                if prev is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = prev
            self.module = None
        if self.filename is not None:
            import linecache

            for fn in list(getattr(self, "lines", {})) or [self.filename]:
                linecache.cache.pop(fn, None)


def limit(msg, key, default):
    v = msg.get(key) if isinstance(msg, dict) else None
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    return default


def json_exact(v, depth=0, tuples=True):
    """True when json.dumps(v) round-trips to an equal value of the same types
    (a tuple becoming a list is accepted unless tuples is False)."""
    t = type(v)
    if t is str or t is bool or t is int or v is None:
        return True
    if t is float:
        return v == v and v not in (float("inf"), float("-inf"))
    if depth > 200:
        return False
    if t is list or (t is tuple and tuples):
        for x in v:
            if not json_exact(x, depth + 1, tuples):
                return False
        return True
    if t is dict:
        for k, x in v.items():
            if type(k) is not str or not json_exact(x, depth + 1, tuples):
                return False
        return True
    return False


class TooLarge(Exception):
    pass


def encode_value(v, max_result, exact=False):
    """Returns the Value dict for v, raising TooLarge over max_result bytes
    of data. With exact, a value JSON would give back with other types (a
    tuple) is pickled instead."""
    if v is None:
        return {"enc": "json", "data": RawJSON("null")}
    ok = False
    try:
        ok = json_exact(v, tuples=not exact)
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


def serialize(value, max_result, exact=False):
    """Returns the result fields for a returned value: ok+value, or an error."""
    try:
        return {"ok": True, "value": encode_value(value, max_result, exact)}
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
        err = error_fields(e, True)
        err["message"] = bound_json(
            "result of type %s cannot be serialized: %s" % (type(value).__name__, err["message"]), MAX_MESSAGE
        )[0]
        return {"error": err, "error_kind": E_UNSERIALIZABLE}


def bad_result(e, task_id=""):
    return dumps_result(
        {
            "id": task_id,
            "ok": False,
            "error": error_fields(e, True),
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
    return run_msg(msg, t_start, conn, router)


def task_limits(msg):
    """(max_output, max_result, exact_types) of a task message."""
    return (
        limit(msg, "max_output", DEFAULT_MAX_OUTPUT),
        limit(msg, "max_result", DEFAULT_MAX_RESULT),
        bool(msg.get("exact_types")),
    )


def run_msg(msg, t_start, conn=None, router=None, fn=None, limits=None):
    """Runs one decoded task (begun at t_start, perf_counter) and returns
    the Result payload bytes. With fn, the task is an item of a batch: fn
    is its function, already resolved, limits its batch's task_limits, and
    msg only its id, args and kwargs."""
    task = Task(msg)
    if fn is None:
        max_output, max_result, exact = task_limits(msg)
        stream = bool(msg.get("stream")) and conn is not None
        stdin = bool(msg.get("stdin")) and router is not None
        kind = msg.get("kind")
        if kind == "run" and stream:
            max_output = 0  # a streamed command's output is not kept in its result
    else:
        max_output, max_result, exact = limits
        stream = stdin = False
        kind = None
    res = {"id": task.id, "ok": False}
    timings = {"deserialize_ms": 0.0, "call_ms": 0.0, "serialize_ms": 0.0}
    try:
        tio = TaskIO(conn, max_output, stream, stdin, router)
    except OSError as e:
        return bad_result(e, task.id)
    try:
        t1 = t2 = None
        try:
            if kind == "run":
                fn, args, kwargs = run_command, [task.run_spec()], {}
            elif kind == "shell":
                fn, args, kwargs = shell_command, [task.shell_spec()], {}
            else:
                if fn is None:
                    fn = task.resolve()
                args, kwargs = task.args()
        except BaseException as e:
            res["error"] = error_fields(e, True)
            res["error_kind"] = E_BAD_TASK
        else:
            t1 = time.perf_counter()
            try:
                value = fn(*args, **kwargs)
            except BaseException as e:
                res["error"] = error_fields(e, True)
                res["error_kind"] = E_EXCEPTION
            else:
                t2 = time.perf_counter()
                res.update(serialize(value, max_result, exact))
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


# ---------------------------------------------------------------- shell

# WALLTIME_EXIT is a shell task's return code when it ran past its
# walltime, as GNU timeout (and Globus Compute's ShellFunction) reports it.
WALLTIME_EXIT = 124


def shell_command(spec):
    """The "shell" task: runs the command with /bin/sh -c and the task's
    fds, in a session of its own that is killed at the walltime (0: none).
    Returns {"returncode", "cmd"}; the output is the task's stdout and
    stderr."""
    cmd, walltime = spec
    import signal
    import subprocess

    try:
        proc = subprocess.Popen(["/bin/sh", "-c", cmd], start_new_session=True)
    except OSError as e:
        os.write(2, ("kiln: /bin/sh: %s (the image has no shell: rebuild it with this kiln)\n" % e.strerror).encode())
        return {"returncode": 127, "cmd": cmd}
    try:
        code = proc.wait(timeout=walltime or None)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        code = WALLTIME_EXIT
    if code < 0:
        code = 128 - code
    return {"returncode": code, "cmd": cmd}


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
    except BaseException as e:
        import traceback

        traceback.print_exception(type(e), e, user_frames(e.__traceback__))
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
    return {"ok": not errors, "error": "; ".join(errors), "batch": True}


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


def process_table():
    """{pid: ppid} of every process, from /proc/PID/stat (a kernel need not
    have /proc/PID/task/TID/children)."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        try:
            table[int(name)] = int(fields[1])
        except (IndexError, ValueError):
            pass
    return table


def reap_children():
    """Kill what a task left running: a task's processes do not outlive it
    (a fork bomb or a forgotten background process would otherwise hold the
    warm VM's memory and pids for every later task, and write into its
    output). In a kiln VM that includes orphans that escaped the agent's
    tree (a double fork): PID 1 there starts the agent and nothing else, so
    any other child of PID 1 is a task's."""
    import signal

    me = os.getpid()
    for _ in range(8):
        table = process_table()
        kids = {}
        for pid, ppid in table.items():
            kids.setdefault(ppid, []).append(pid)
        direct = kids.get(me, [])
        roots = list(direct)
        if IN_VM:
            roots += [p for p in kids.get(1, []) if p != me]
        if not roots:
            return
        todo, seen = roots, set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo.extend(kids.get(pid, []))
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in direct:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


# IN_VM is set when the agent runs as the child of a kiln VM's PID 1 (it
# was given a virtio port): only then are PID 1's other children a task's.
IN_VM = False


class Router:
    """Reads the host channel. Between tasks the main loop reads the next
    frame itself (next()). While a stdin task runs, a reader thread reads
    instead: its Stdin frames go to the task's input, any other frame is
    queued for the main loop.

    The host sends a stdin task's input right after its Task frame and
    always ends it with one empty Stdin frame, even when the task finished
    first: the reader stops there, and the main loop reads again. An input
    stays attached until its empty frame arrives, so input the task did not
    read is dropped, never given to the next; Stdin frames of a task that
    never attached one are skipped."""

    def __init__(self, conn):
        import collections
        import threading

        self.conn = conn
        self.cond = threading.Condition()
        self.queued = collections.deque()  # frames, None (end) or an exception
        self.reader = None  # the reader thread, while it reads
        self.input = None  # the attached input, until its end of input

    def next(self):
        """The next frame for the main loop: (type, payload, length), None
        at the end of the stream; raises what ended the stream."""
        with self.cond:
            while self.reader is not None and not self.queued:
                self.cond.wait()
            if self.queued:
                item = self.queued.popleft()
                if isinstance(item, BaseException):
                    raise item
                return item
        while True:
            frame = self.conn.recv()
            if frame is None or frame[0] != T_STDIN:
                return frame
            # A stray end of input (its task was abandoned): nothing reads it.

    def attach(self, inp):
        """Makes inp the receiver of the task input that comes next on the
        stream, and reads the stream in a thread until that input ends."""
        import threading

        with self.cond:
            self.input = inp
            if self.reader is None:
                self.reader = threading.Thread(target=self._run, name="kiln-reader", daemon=True)
                self.reader.start()

    def _run(self):
        try:
            while True:
                frame = self.conn.recv()
                if frame is None:
                    self._stop(None)
                    return
                if frame[0] != T_STDIN:
                    with self.cond:
                        self.queued.append(frame)
                        self.cond.notify_all()
                    continue
                data = frame[1] if frame[1] is not None else b""
                with self.cond:
                    inp = self.input
                    if not data:
                        self.input = None
                if inp is not None:
                    inp.feed(data)
                if not data:
                    self._stop()
                    return
        except BaseException as e:
            self._stop(e)

    _NOTHING = object()

    def _stop(self, item=_NOTHING):
        with self.cond:
            if item is not Router._NOTHING:
                self.queued.append(item)
            self.reader = None
            self.cond.notify_all()


class Flusher:
    """Writes the results a batch queued (Conn.send_later) once the oldest
    has waited FLUSH_BACKSTOP, while the main thread runs a long task of the
    batch; between tasks the main thread writes them itself. Armed for the
    length of a batch, so that it wakes only then."""

    def __init__(self, conn):
        import threading

        self.conn = conn
        self.cond = threading.Condition()
        self.armed = False
        threading.Thread(target=self._run, name="kiln-flush", daemon=True).start()

    def arm(self):
        with self.cond:
            self.armed = True
            self.cond.notify()

    def disarm(self):
        with self.cond:
            self.armed = False

    def _run(self):
        while True:
            with self.cond:
                while not self.armed:
                    self.cond.wait()
                self.cond.wait(FLUSH_BACKSTOP)
            try:
                if self.conn.t.later_age() >= FLUSH_BACKSTOP:
                    self.conn.flush()
            except OSError:
                return  # the channel is gone; the main thread sees it too


FLUSHER = None


def run_batch(payload, conn):
    """Runs a Tasks frame: {"task": the fields its tasks share, "items":
    [{"id", "args", "kwargs"}, ...]}, one task after another, each answered
    with its own Result frame, in order. The frames are queued and written
    together (one write, one interrupt, for several results): between
    tasks, once the oldest has waited FLUSH_AFTER, and while a long task
    runs, once it has waited FLUSH_BACKSTOP (Flusher). A batch's tasks
    neither stream nor read stdin."""
    global FLUSHER
    t_start = time.perf_counter()
    try:
        msg = json.loads(payload)
        common, items = msg["task"], msg["items"]
        if not isinstance(common, dict) or not isinstance(items, list):
            raise BadTask("a batch is {\"task\": {...}, \"items\": [...]}")
    except BaseException as e:
        raise ProtocolError("undecodable batch: %s" % e) from None
    common.pop("stream", None)
    common.pop("stdin", None)
    if FLUSHER is None:
        FLUSHER = Flusher(conn)
    FLUSHER.arm()
    # The function is resolved once for the batch, its module installed
    # for all of its tasks; if that fails, each task fails on its own.
    outer = Task(common)
    fn = None
    limits = task_limits(common)
    try:
        if common.get("kind") in ("source", "ref", "pickle"):
            try:
                fn = outer.resolve()
            except BaseException:
                outer.cleanup()
                fn = None
        for item in items:
            if fn is not None and isinstance(item, dict):
                res = run_msg(item, t_start, fn=fn, limits=limits)
            else:
                t = dict(common)
                if isinstance(item, dict):
                    t.update(item)
                res = run_msg(t, t_start)
            conn.send_later(T_RESULT, res)
            if conn.t.later_age() >= FLUSH_AFTER:
                conn.flush()
            t_start = time.perf_counter()
    finally:
        outer.cleanup()
        FLUSHER.disarm()


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
        if not conn.buffered():
            conn.flush()  # about to wait: nothing queued may wait with us
        frame = router.next()
        if frame is None:
            return
        ftype, payload, length = frame
        if payload is None:
            log("dropped a type 0x%02x frame of %d bytes (limit %d)" % (ftype, length, conn.max_frame))
            if ftype == T_TASK:
                conn.send(T_RESULT, too_large_result(length, conn.max_frame))
            continue
        if ftype == T_TASK:
            conn.send(T_RESULT, run_task(payload, conn, router))
        elif ftype == T_TASKS:
            run_batch(payload, conn)
        elif ftype == T_RESEED:
            conn.send_json(T_RESEEDED, reseed(payload))
        else:
            log("ignoring frame of type 0x%02x (%d bytes)" % (ftype, length))


def main(argv):
    global LOG_FD, IN_VM
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
    IN_VM = opts["port"] is not None and os.getppid() == 1
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
        "batch": True,
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
