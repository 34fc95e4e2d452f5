"""concurrent.futures.Executor backed by a kiln endpoint."""

import concurrent.futures
import threading
import time

from ._client import Client, result_of
from ._errors import APIError, KilnError, TaskFailed


class _Future(concurrent.futures.Future):
    def __init__(self, client, task_id):
        super().__init__()
        self.task_id = task_id
        self._client = client

    def cancel(self):
        if not super().cancel():
            return False
        try:
            self._client.cancel(self.task_id)
        except KilnError:
            pass
        return True


class Executor(concurrent.futures.Executor):
    """Run calls in kiln VMs: Executor(url, token=..., image="numpy").

    Each distinct function is registered once (by source, else pickled);
    every submit queues one task. One background thread long-polls the
    endpoint for finished tasks and resolves their futures. Remote
    exceptions are raised by Future.result() as kiln.RemoteError.
    """

    def __init__(self, url=None, token=None, image=None, *, timeout=None, memory_mib=None, max_retries=None,
                 max_result=None, client=None, poll_seconds=30.0):
        if image is None:
            raise KilnError("Executor needs image= (a name from Client.images())")
        self.client = client or Client(url, token)
        self.image = image
        self._opts = {"timeout": timeout, "memory_mib": memory_mib, "max_retries": max_retries, "max_result": max_result}
        self._poll = poll_seconds
        self._fn_ids = {}
        self._pending = {}
        self._lock = threading.Condition()
        self._shutdown = False
        self._thread = None

    def function_id(self, fn):
        """Register fn (once per Executor) and return its id."""
        key = fn
        try:
            hash(key)
        except TypeError:
            key = id(fn)
        with self._lock:
            fid = self._fn_ids.get(key)
        if fid is None:
            fid = self.client.register_function(fn, self.image, **self._opts)
            with self._lock:
                self._fn_ids[key] = fid
        return fid

    def submit(self, fn, /, *args, **kwargs):
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        fid = self.function_id(fn)
        tid = self.client.submit(fid, *args, **kwargs)
        fut = _Future(self.client, tid)
        with self._lock:
            self._pending[tid] = fut
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._poller, name="kiln-executor-poller", daemon=True)
                self._thread.start()
            self._lock.notify_all()
        return fut

    def _poller(self):
        failures = 0
        while True:
            with self._lock:
                while not self._pending and not self._shutdown:
                    self._lock.wait()
                if not self._pending:
                    return
                ids = list(self._pending)[:1000]
            try:
                done, unknown = self.client.wait_tasks(ids, timeout=self._poll)
                failures = 0
            except KilnError as e:
                failures += 1
                if failures >= 10 or (isinstance(e, APIError) and e.status in (400, 401, 404)):
                    self._fail_all(e)
                    failures = 0
                else:
                    time.sleep(min(2 ** failures * 0.1, 5.0))
                continue
            for t in done:
                with self._lock:
                    fut = self._pending.pop(t["id"], None)
                if fut is not None:
                    self._resolve(fut, t)
            for tid in unknown:
                with self._lock:
                    fut = self._pending.pop(tid, None)
                if fut is not None and fut.set_running_or_notify_cancel():
                    fut.set_exception(TaskFailed("the endpoint does not know the task (expired?)", "unknown_task", tid))

    def _fail_all(self, err):
        with self._lock:
            futs = list(self._pending.values())
            self._pending.clear()
        for fut in futs:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)

    @staticmethod
    def _resolve(fut, task):
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(result_of(task))
        except BaseException as e:  # noqa: BLE001 - the future carries it
            fut.set_exception(e)

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            self._shutdown = True
            pending = list(self._pending.values())
            self._lock.notify_all()
        if cancel_futures:
            for fut in pending:
                fut.cancel()
        if wait and self._thread is not None:
            self._thread.join()
