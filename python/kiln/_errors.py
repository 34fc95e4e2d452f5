"""Exceptions raised by the kiln SDK."""

import concurrent.futures


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
