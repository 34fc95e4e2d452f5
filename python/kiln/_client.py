"""Low-level client of the kiln serve HTTP API (docs/api.md)."""

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from ._capture import ImageModules
from ._errors import APIError, KilnError, TaskCancelled, TaskFailed, remote_exception
from ._values import decode_value, encode_value, function_payload

DEFAULT_URL = "http://127.0.0.1:8470"
FINISHED = ("succeeded", "failed", "cancelled")

# Transport failures worth retrying: the endpoint restarts, or is busy.
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError, OSError)


def default_state_dir():
    """The endpoint's default state directory: $KILN_STATE, else
    $XDG_STATE_HOME/kiln, else ~/.local/state/kiln."""
    d = os.environ.get("KILN_STATE")
    if d:
        return d
    x = os.environ.get("XDG_STATE_HOME")
    if x:
        return os.path.join(x, "kiln")
    return os.path.join(os.path.expanduser("~"), ".local", "state", "kiln")


def _default_token():
    t = os.environ.get("KILN_TOKEN")
    if t:
        return t.strip()
    try:
        with open(os.path.join(default_state_dir(), "token")) as f:
            return f.read().strip()
    except OSError:
        return None


def result_of(task):
    """The value of a finished task dict, or the exception it failed with:
    the function's own exception type where it can be rebuilt (see
    RemoteError), TaskFailed for failures outside the function,
    TaskCancelled."""
    state = task.get("state")
    tid = task.get("id", "")
    res = task.get("result") or {}
    if state == "succeeded":
        return decode_value(res.get("value"))
    if state == "cancelled":
        raise TaskCancelled("task %s was cancelled" % tid)
    if state != "failed":
        raise KilnError("task %s is %s, not finished" % (tid, state))
    err = res.get("error")
    kind = res.get("error_kind")
    if err and kind in ("exception", "bad_task", "unserializable"):
        raise remote_exception(err, kind, tid, decode_value)
    raise TaskFailed(task.get("error") or "unknown error", task.get("error_code", ""), tid)


class Client:
    """A client of one endpoint.

    url and token default to $KILN_URL and $KILN_TOKEN, then to
    http://127.0.0.1:8470 and the token file in the default state directory.

    Every request is retried, with capped exponential backoff, when the
    endpoint cannot be reached, drops the connection, times out, answers
    with a 5xx, or with 429 (then after its Retry-After): for up to
    retry_for seconds, after which the last error is raised as a KilnError.
    """

    def __init__(self, url=None, token=None, timeout=60.0, retry_for=60.0):
        self.url = (url or os.environ.get("KILN_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else _default_token()
        self.timeout = timeout
        self.retry_for = retry_for
        self._image_modules = {}

    # -- transport ---------------------------------------------------------

    def _request(self, method, path, body=None, timeout=None, retry_for=None):
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        retry_for = self.retry_for if retry_for is None else retry_for
        deadline = time.monotonic() + retry_for
        delay = 0.05
        while True:
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            wait = None
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                    raw = resp.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:
                raw = e.read()
                try:
                    eb = json.loads(raw)
                    msg, code = eb.get("error", ""), eb.get("code", "")
                except ValueError:
                    msg, code = raw.decode("utf-8", "replace"), ""
                retry_after = e.headers.get("Retry-After")
                err = APIError(e.code, code, msg, retry_after)
                if e.code != 429 and e.code < 500:
                    raise err from None
                if retry_after:
                    try:
                        wait = float(retry_after)
                    except ValueError:
                        pass
            except _TRANSIENT as e:
                reason = getattr(e, "reason", e)
                err = KilnError("cannot reach the kiln endpoint at %s: %s (is kiln serve running?)" % (self.url, reason))
            left = deadline - time.monotonic()
            if left <= 0:
                raise err
            wait = min(wait if wait is not None else delay * (1 + random.random()), 5.0, left)
            time.sleep(wait)
            delay = min(delay * 2, 5.0)

    # -- API ---------------------------------------------------------------

    def health(self):
        return self._request("GET", "/v1/health")

    def images(self):
        return self._request("GET", "/v1/images")["images"]

    def image_modules(self, image):
        """What the image can import (for choosing what goes by reference)."""
        im = self._image_modules.get(image)
        if im is None:
            mods = None
            try:
                for i in self.images():
                    if i.get("name") == image or i.get("path") == image:
                        mods = i.get("modules")
            except KilnError:
                pass
            im = self._image_modules[image] = ImageModules(mods)
        return im

    def functions(self):
        return self._request("GET", "/v1/functions")["functions"]

    def register(self, body):
        """POST /v1/functions with a registration body; return the id."""
        return self._request("POST", "/v1/functions", body)["id"]

    def register_function(self, fn=None, image=None, *, source=None, function=None, ref=None, command=None, walltime=None,
                          name=None, timeout=None, memory_mib=None, max_result=None, max_retries=None):
        """Register fn (a callable), or source text with the function name to
        call, or a ref "module:function", or a shell command; return the
        function id."""
        if image is None:
            raise KilnError("register_function needs image= (a name from Client.images())")
        body = {"image": image}
        if fn is not None:
            body.update(function_payload(fn, self.image_modules(image)))
            body["exact_types"] = True
        elif source is not None:
            body.update({"kind": "source", "source": source})
            if function:
                body["function"] = function
        elif ref is not None:
            body.update({"kind": "ref", "ref": ref})
        elif command is not None:
            body.update({"kind": "shell", "command": command})
            if walltime:
                body["walltime"] = float(walltime)
        else:
            raise KilnError("register_function needs fn, source=, ref= or command=")
        for k, v in (("name", name), ("memory_mib", memory_mib), ("max_result", max_result), ("max_retries", max_retries)):
            if v is not None:
                body[k] = v
        if timeout is not None:
            body["timeout"] = float(timeout)
        return self.register(body)

    @staticmethod
    def task_body(function_id, args, kwargs, task_group=None):
        body = {"function_id": function_id, "args": encode_value(list(args))}
        if kwargs:
            body["kwargs"] = encode_value(dict(kwargs))
        if task_group:
            body["task_group"] = task_group
        return body

    def submit(self, function_id, *args, **kwargs):
        """Queue one call; return the task id."""
        return self._request("POST", "/v1/tasks", self.task_body(function_id, args, kwargs))["task_id"]

    def submit_bodies(self, tasks, task_group=None):
        """Queue task bodies (task_body) in one request; return the ids."""
        body = {"tasks": tasks}
        if task_group:
            body["task_group"] = task_group
        return self._request("POST", "/v1/tasks/batch", body)["task_ids"]

    def submit_batch(self, function_id, calls, task_group=None):
        """Queue many calls, each (args, kwargs) or args; return the task ids."""
        tasks = []
        for c in calls:
            if isinstance(c, tuple) and len(c) == 2 and isinstance(c[1], dict):
                args, kwargs = c
            else:
                args, kwargs = c, {}
            tasks.append(self.task_body(function_id, args, kwargs))
        return self.submit_bodies(tasks, task_group)

    def get_task(self, task_id, wait=None):
        """The task as a dict; with wait (seconds), wait up to that long for it to finish."""
        q = ""
        if wait:
            q = "?" + urllib.parse.urlencode({"wait": "%gs" % wait})
        return self._request("GET", "/v1/tasks/%s%s" % (urllib.parse.quote(task_id, safe=""), q),
                             timeout=self.timeout + (wait or 0))

    def wait_tasks(self, task_ids, timeout=30.0, running=False, known_running=(), retry_for=None):
        """Wait until at least one of task_ids finished (or, with running, one
        started that is not in known_running); return (finished task dicts,
        unknown ids, running ids)."""
        body = {"task_ids": list(task_ids), "timeout": float(timeout)}
        if running:
            body["running"] = True
            if known_running:
                body["known_running"] = list(known_running)
        r = self._request("POST", "/v1/tasks/wait", body, timeout=self.timeout + timeout, retry_for=retry_for)
        return r["tasks"], r["unknown"], r.get("running") or []

    def wait_group(self, task_group, cursor=0, timeout=30.0, retry_for=None):
        """Wait until a task of task_group changes state after cursor (the
        previous answer's, 0 at first); return (the changed tasks, with the
        results of those that finished, and the next cursor)."""
        body = {"task_group": task_group, "cursor": int(cursor), "timeout": float(timeout)}
        r = self._request("POST", "/v1/tasks/wait", body, timeout=self.timeout + timeout, retry_for=retry_for)
        return r["tasks"], r.get("cursor") or cursor

    def get_result(self, task_id, wait=None):
        """The task's value. Raises the function's exception (see RemoteError),
        TaskFailed on other failures, TimeoutError when it is not finished
        within wait seconds (None: wait for as long as it takes)."""
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            left = 60.0 if deadline is None else max(0.0, min(60.0, deadline - time.monotonic()))
            t = self.get_task(task_id, wait=left)
            if t["state"] in FINISHED:
                return result_of(t)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("task %s is still %s" % (task_id, t["state"]))

    def cancel(self, task_id, only_queued=False, retry_for=None):
        """Cancel a task (only a queued one with only_queued); return it."""
        q = "?only_queued=true" if only_queued else ""
        return self._request("POST", "/v1/tasks/%s/cancel%s" % (urllib.parse.quote(task_id, safe=""), q), retry_for=retry_for)

    def tasks(self, state=None, function_id=None, task_group=None, limit=100, after=None):
        """One page of tasks (dicts without results); with after, the next."""
        q = {"limit": str(limit)}
        if state:
            q["state"] = state
        if function_id:
            q["function_id"] = function_id
        if task_group:
            q["task_group"] = task_group
        if after:
            q["after"] = str(after)
        r = self._request("GET", "/v1/tasks?" + urllib.parse.urlencode(q))
        return r["tasks"], r.get("next_after")

    def all_tasks(self, **filters):
        """Every task matching filters, following the pages."""
        out, after = [], None
        while True:
            page, after = self.tasks(limit=1000, after=after, **filters)
            out.extend(page)
            if not after:
                return out
