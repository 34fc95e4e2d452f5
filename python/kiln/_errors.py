"""Exceptions raised by the kiln SDK, and the rebuilding of remote exceptions with their own types."""

import concurrent.futures
import importlib
import sys

# ERROR_CODES are the endpoint's error_code values of a failed task, with
# what each means. They mirror the Go definitions (package task's failure
# kinds, then package apitype's own codes); a Go test holds this copy to
# them.
ERROR_CODES = {
    "exception": "the function raised",
    "bad_task": "the task could not run: bad source, missing function or library, undecodable arguments",
    "too_large": "the result or its output was over its size cap",
    "unserializable": "the function returned a value that neither JSON nor pickle can encode",
    "timeout": "the task ran past its time limit and its VM was replaced",
    "out_of_memory": "the guest ran out of memory",
    "vm_died": "the VM crashed, powered off or stopped answering",
    "vm_start_failed": "no VM could be booted or restored for the task",
    "cancelled": "the task was cancelled while it ran",
    "endpoint_restarted": "the endpoint stopped while the task ran",
    "image_changed": "the image file changed after the function was registered",
    "internal": "the endpoint failed (its log says why)",
    "worker_lost": "the worker running the task stopped answering (its node or pilot job ended) and no retry was left",
}


class KilnError(Exception):
    """Base class of the SDK's own errors."""


class APIError(KilnError):
    """The endpoint answered with an error status.

    status is the HTTP status, code the endpoint's error code
    ("unknown_function", "queue_full", ...).
    """

    def __init__(self, status, code, message, retry_after=None):
        super().__init__("%s (HTTP %d, %s)" % (message, status, code))
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class RemoteError(KilnError):
    """The function raised inside its VM.

    The exception Future.result() raises is, whenever its type can be
    rebuilt on the client, an instance of both the original type (so that
    ``except KeyError`` works) and RemoteError. remote_type is the
    qualified exception type ("ValueError", "numpy.linalg.LinAlgError"),
    remote_message its message and remote_traceback the traceback printed
    in the VM (the user's frames only), also attached as __cause__.
    type_lost says why the original type could not be rebuilt, when it
    could not.
    """

    def __init__(self, remote_type="", remote_message="", remote_traceback="", kind="exception", task_id="", type_lost=""):
        super().__init__(remote_type, remote_message)
        _fill(self, remote_type, remote_message, remote_traceback, kind, task_id, type_lost)

    def __str__(self):
        s = "%s: %s" % (self.remote_type, self.remote_message)
        if self.type_lost:
            s += " (raised as RemoteError: %s)" % self.type_lost
        if self.remote_traceback:
            s += "\n\nRemote traceback (task %s):\n%s" % (self.task_id, self.remote_traceback.rstrip("\n"))
        return s


def _fill(e, remote_type, remote_message, remote_traceback, kind, task_id, type_lost):
    e.remote_type = remote_type
    e.remote_message = remote_message
    e.remote_traceback = remote_traceback or ""
    e.kind = kind
    e.task_id = task_id
    e.type_lost = type_lost


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a kiln VM, as __cause__ (as
    concurrent.futures.ProcessPoolExecutor does)."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


class TaskFailed(KilnError):
    """The task failed outside the function: timeout, VM crash, result too large...

    code is the endpoint's error_code (see ERROR_CODES).
    """

    def __init__(self, message, code="", task_id=""):
        super().__init__("task %s failed: %s (%s)" % (task_id, message, code))
        self.message = message
        self.code = code
        self.task_id = task_id


class TaskCancelled(concurrent.futures.CancelledError):
    """The task was cancelled."""


_dual_types = {}


def _dual(cls):
    """A class that is both cls and RemoteError (made once per cls)."""
    t = _dual_types.get(cls)
    if t is None:
        t = type(cls.__name__, (cls, RemoteError), {
            "__module__": cls.__module__,
            "__qualname__": getattr(cls, "__qualname__", cls.__name__),
            "__str__": cls.__str__,
            "__reduce__": BaseException.__reduce__,
            "__doc__": cls.__doc__,
        })
        _dual_types[cls] = t
    return t


def _find_class(module, qualname):
    """The client's class of that name, or None: the client's own modules
    first (where the function came from), then an import."""
    if not module or not qualname:
        return None
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - not importable here
            return None
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def remote_exception(err, kind, task_id, decode):
    """The exception to raise for a task's error dict: of the original type
    and RemoteError when that type can be rebuilt, with args and state, and
    the remote traceback as __cause__; else a plain RemoteError that says
    why in type_lost."""
    rtype = err.get("type", "")
    msg = err.get("message", "")
    tb = err.get("traceback", "")
    lost = ""
    exc = None
    cls = _find_class(err.get("module"), err.get("qualname"))
    if kind != "exception":
        lost = "the task failed before the function ran (%s)" % kind
    elif cls is None:
        lost = "no class %s on the client" % rtype
    else:
        try:
            args = decode(err["args"]) if err.get("args") else (msg,)
            state = decode(err["state"]) if err.get("state") else None
            args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
            t = _dual(cls)
            exc = t.__new__(t, *args)  # the class's own __new__, without its __init__
            exc.args = args
            if state:
                exc.__dict__.update(state)
        except Exception as e:  # noqa: BLE001 - fall back to a plain RemoteError
            lost = "rebuilding %s failed: %s: %s" % (rtype, type(e).__name__, e)
            exc = None
    if exc is None:
        exc = RemoteError(rtype, msg, tb, kind, task_id, lost)
    else:
        _fill(exc, rtype, msg, tb, kind, task_id, "")
    if tb:
        exc.__cause__ = _RemoteTraceback(tb)
    return exc
