"""concurrent.futures.Executor backed by a kiln endpoint."""

import concurrent.futures
import threading
import time
import uuid
from concurrent.futures._base import PENDING

from ._client import Client, result_of
from ._errors import APIError, KilnError, TaskFailed
from ._shell import ShellFunction, ShellResult
from ._values import add_classes_for, encode, function_payload, unwrap_call

# Defaults of Executor's keyword arguments.
DEFAULT_UNREACHABLE_TIMEOUT = 300.0
DEFAULT_BATCH_SIZE = 128
DEFAULT_BATCH_INTERVAL = 0.005


class _Future(concurrent.futures.Future):
    """A future of one kiln task. cancel() cancels the task on the endpoint
    if it has not started, and returns False once it runs, as
    concurrent.futures does."""

    def __init__(self, executor):
        super().__init__()
        self.task_id = None
        self._executor = executor
        self._shell = None  # the ShellFunction, for ShellResult

    def cancel(self):
        with self._condition:
            if self._state != PENDING:
                return super().cancel()
            tid = self.task_id
        if tid is not None:
            ex = self._executor
            try:
                t = ex.client.cancel(tid, only_queued=True, retry_for=ex.unreachable_timeout)
            except KilnError:
                return False
            state = t.get("state")
            if state == "running":
                self.set_running_or_notify_cancel()
                return False
            if state in ("succeeded", "failed"):
                ex._resolve(self, t)
                return False
        if not super().cancel():
            return False
        self.set_running_or_notify_cancel()  # wakes wait() and as_completed()
        return True


class Executor(concurrent.futures.Executor):
    """Run calls in kiln VMs: Executor(url, token=..., image="numpy").

    submit() sends a plain function by source, with what it uses from its
    module (imports, helpers, classes, constants); builtins and functions of
    modules the image has go by reference; lambdas and closures by
    cloudpickle when it is installed. Arguments and results of the client's
    own classes round-trip. A function that raises makes Future.result()
    raise an exception of the same type that is also a kiln.RemoteError,
    with the remote traceback as its cause.

    submit() returns at once: a background thread sends the calls in
    batches (up to batch_size per request, or every batch_interval
    seconds), another long-polls the endpoint and resolves the futures.
    Both retry while the endpoint restarts; if it stays unreachable for
    unreachable_timeout seconds every pending future fails with KilnError.

    Every task is tagged with task_group (generated when not given); after
    a restart of the client, Executor(..., task_group=ID).reload_tasks()
    returns the group's futures. max_workers is accepted for compatibility:
    the endpoint decides how many VMs run.
    """

    def __init__(self, url=None, token=None, image=None, *, max_workers=None, task_group=None, timeout=None,
                 memory_mib=None, max_retries=None, max_result=None, client=None, batch_size=DEFAULT_BATCH_SIZE,
                 batch_interval=DEFAULT_BATCH_INTERVAL, unreachable_timeout=DEFAULT_UNREACHABLE_TIMEOUT,
                 poll_seconds=30.0):
        if image is None:
            raise KilnError("Executor needs image= (a name from Client.images())")
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self.client = client or Client(url, token)
        self.image = image
        self.task_group = task_group or "tg-" + uuid.uuid4().hex
        self.unreachable_timeout = unreachable_timeout
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self._opts = {"timeout": timeout, "memory_mib": memory_mib, "max_retries": max_retries, "max_result": max_result}
        self._poll = poll_seconds
        self._fn_ids = {}
        self._lock = threading.Condition()
        self._outbox = []  # (future, task body) not sent yet
        self._inflight = 0  # futures being submitted
        self._pending = {}  # task id -> future
        self._early = {}  # task id -> its view, seen before its submission returned
        self._shutdown = False
        self._sender = self._poller = None

    # -- submitting --------------------------------------------------------

    def _register(self, key, target, classes):
        fid = self._fn_ids.get(key)
        if fid is not None:
            return fid
        if isinstance(target, ShellFunction):
            body = target.registration()
        else:
            body = function_payload(target, self.client.image_modules(self.image))
            body = add_classes_for(body, classes, self.client.image_modules(self.image))
            body["exact_types"] = True
        body["image"] = self.image
        for k, v in self._opts.items():
            if v is not None:
                body[k] = float(v) if k == "timeout" else v
        fid = self.client._request("POST", "/v1/functions", body, retry_for=self.unreachable_timeout)["id"]
        self._fn_ids[key] = fid
        return fid

    def submit(self, fn, /, *args, **kwargs):
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        shell = fn if isinstance(fn, ShellFunction) else None
        target, args, kwargs = (fn, args, kwargs) if shell else unwrap_call(fn, args, kwargs)
        im = self.client.image_modules(self.image)
        a, found_a = encode(list(args), im)
        kw, found_k = encode(dict(kwargs), im) if kwargs else (None, [])
        classes = tuple(dict.fromkeys(found_a + found_k))
        key = (_fn_key(target), classes)
        fid = self._register(key, target, classes)
        body = {"function_id": fid, "args": a}
        if kw is not None:
            body["kwargs"] = kw
        fut = _Future(self)
        fut._shell = shell
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._outbox.append((fut, body))
            self._start_threads()
            self._lock.notify_all()
        return fut

    def _start_threads(self):
        # Called with the lock held.
        if self._sender is None or not self._sender.is_alive():
            self._sender = threading.Thread(target=self._send_loop, name="kiln-executor-sender", daemon=True)
            self._sender.start()
        if self._poller is None or not self._poller.is_alive():
            self._poller = threading.Thread(target=self._poll_loop, name="kiln-executor-poller", daemon=True)
            self._poller.start()

    def _send_loop(self):
        while True:
            with self._lock:
                while not self._outbox and not self._shutdown:
                    self._lock.wait()
                if not self._outbox:
                    self._lock.notify_all()
                    return
                if len(self._outbox) < self.batch_size and self.batch_interval > 0 and not self._shutdown:
                    # Let a tight submit loop fill the batch a little.
                    self._lock.wait(self.batch_interval)
                batch = self._outbox[: self.batch_size]
                del self._outbox[: self.batch_size]
                live = [(f, b) for f, b in batch if not f.cancelled()]
                self._inflight += len(live)
                del batch
            if live:
                self._send(live)
            # No reference to a sent future outlives its round: a finished
            # future's result is freed when its owner drops it.
            del live

    def _send(self, live):
        """Submits one batch of (future, body) and files the futures by task id."""
        try:
            if len(live) > 1:
                ids = self.client._request("POST", "/v1/tasks/batch", {"tasks": [b for _, b in live], "task_group": self.task_group},
                                           retry_for=self.unreachable_timeout)["task_ids"]
            else:
                ids = [self.client._request("POST", "/v1/tasks", dict(live[0][1], task_group=self.task_group),
                                            retry_for=self.unreachable_timeout)["task_id"]]
        except KilnError as e:
            if not isinstance(e, APIError):
                e = KilnError("submitting the task: %s (for %.0f s)" % (e, self.unreachable_timeout))
            with self._lock:
                self._inflight -= len(live)
                self._lock.notify_all()
            for f, _ in live:
                if f.set_running_or_notify_cancel():
                    f.set_exception(e)
            return
        early = []
        with self._lock:
            for (f, _), tid in zip(live, ids):
                f.task_id = tid
                self._pending[tid] = f
                t = self._early.pop(tid, None)
                if t is not None:
                    early.append(t)
            self._inflight -= len(live)
            self._lock.notify_all()
        for t in early:
            self._event(t)

    # -- results -------------------------------------------------------------

    def _poll_loop(self):
        cursor = 0
        while True:
            with self._lock:
                while not (self._pending or self._outbox or self._inflight):
                    if self._shutdown:
                        return
                    self._lock.wait()
            try:
                tasks, cursor = self.client.wait_group(self.task_group, cursor, timeout=self._poll, retry_for=self.unreachable_timeout)
            except KilnError as e:
                self._fail_all(KilnError("the kiln endpoint at %s has not answered for %.0f s: %s; every pending task of this Executor failed (task group %s: reload_tasks() finds them again)"
                                         % (self.client.url, self.unreachable_timeout, e, self.task_group)))
                continue
            for t in tasks:
                self._event(t)
            tasks = t = None  # the views, not just the futures, are let go

    def _event(self, t):
        """Applies a task's new state (from a group wait) to its future."""
        tid = t["id"]
        state = t.get("state")
        with self._lock:
            fut = self._pending.get(tid)
            if fut is None:
                if self._inflight:
                    self._early[tid] = t  # its submission's answer is still on its way
                return
            if state in ("succeeded", "failed", "cancelled"):
                del self._pending[tid]
        if state == "running":
            fut.set_running_or_notify_cancel()
        elif state in ("succeeded", "failed", "cancelled"):
            self._resolve(fut, t)

    def _fail_all(self, err):
        with self._lock:
            futs = list(self._pending.values())
            self._pending.clear()
        for fut in futs:
            if not fut.done():
                if fut.running() or fut.set_running_or_notify_cancel():
                    fut.set_exception(err)

    @staticmethod
    def _resolve(fut, task):
        if fut.done():
            return
        try:
            value = result_of(task)
            if fut._shell is not None:
                res = task.get("result") or {}
                value = ShellResult(value.get("returncode"), res.get("stdout", ""), res.get("stderr", ""), value.get("cmd", ""),
                                    res.get("stdout_truncated", False), res.get("stderr_truncated", False))
        except BaseException as e:  # noqa: BLE001 - the future carries it
            value, exc = None, e
        else:
            exc = None
        try:
            if exc is not None:
                # Its traceback here is the poller's frames, which would keep
                # the poller thread (and this Executor) alive with the future;
                # the remote traceback is its __cause__.
                fut.set_exception(exc.with_traceback(None))
            else:
                fut.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled, or resolved by another path meanwhile

    # -- lifecycle -------------------------------------------------------------

    def reload_tasks(self):
        """Futures of every task of this Executor's task group, finished or
        not (after a restart of the client: Executor(...,
        task_group=ID).reload_tasks())."""
        tasks = self.client.all_tasks(task_group=self.task_group)
        futs = []
        unfinished = []
        for t in tasks:
            fut = _Future(self)
            fut.task_id = t["id"]
            futs.append(fut)
            if t["state"] in ("succeeded", "failed", "cancelled"):
                self._resolve(fut, self.client.get_task(t["id"]))
            else:
                if t["state"] == "running":
                    fut.set_running_or_notify_cancel()
                unfinished.append(fut)
        with self._lock:
            for fut in unfinished:
                self._pending[fut.task_id] = fut
            if unfinished:
                self._start_threads()
            self._lock.notify_all()
        return futs

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            self._shutdown = True
            outbox = list(self._outbox)
            pending = list(self._pending.values())
            self._lock.notify_all()
        if cancel_futures:
            # As concurrent.futures: what has not started is cancelled,
            # what runs is left to finish.
            for fut, _ in outbox:
                fut.cancel()
            for fut in pending:
                if not fut.running():
                    fut.cancel()
        if wait:
            for t in (self._sender, self._poller):
                if t is not None:
                    t.join()
            self._sender = self._poller = None


def _fn_key(target):
    """A registration cache key that keeps no instance alive (a bound
    method's instance travels as an argument)."""
    if isinstance(target, tuple):
        return target
    try:
        hash(target)
        return target
    except TypeError:
        return id(target)
