"""Exceptions raised by the kiln SDK."""

import concurrent.futures

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

    remote_type is the qualified exception type ("ValueError",
    "numpy.linalg.LinAlgError"), remote_message its message and
    remote_traceback the traceback printed in the VM.
    """

    def __init__(self, remote_type, remote_message, remote_traceback="", kind="exception", task_id=""):
        super().__init__(remote_type, remote_message)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback or ""
        self.kind = kind
        self.task_id = task_id

    def __str__(self):
        s = "%s: %s" % (self.remote_type, self.remote_message)
        if self.remote_traceback:
            s += "\n\nRemote traceback (task %s):\n%s" % (self.task_id, self.remote_traceback.rstrip("\n"))
        return s


class TaskFailed(KilnError):
    """The task failed outside the function: timeout, VM crash, result too large...

    code is the endpoint's error_code ("timeout", "vm_died", ...).
    """

    def __init__(self, message, code="", task_id=""):
        super().__init__("task %s failed: %s (%s)" % (task_id, message, code))
        self.message = message
        self.code = code
        self.task_id = task_id


class TaskCancelled(concurrent.futures.CancelledError):
    """The task was cancelled."""
