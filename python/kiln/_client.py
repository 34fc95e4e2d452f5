"""Low-level client of the kiln serve HTTP API (docs/api.md)."""

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from ._errors import APIError, KilnError, RemoteError, TaskCancelled, TaskFailed
from ._values import decode_value, encode_value, function_payload

DEFAULT_URL = "http://127.0.0.1:8470"
FINISHED = ("succeeded", "failed", "cancelled")


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
    """The value of a finished task dict, or the exception it failed with."""
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
    if err and res.get("error_kind") in ("exception", "bad_task", "unserializable"):
        raise RemoteError(err.get("type", ""), err.get("message", ""), err.get("traceback", ""), kind=res.get("error_kind"), task_id=tid)
    raise TaskFailed(task.get("error") or "unknown error", task.get("error_code", ""), tid)


class Client:
    """A client of one endpoint.

    url and token default to $KILN_URL and $KILN_TOKEN, then to
    http://127.0.0.1:8470 and the token file in the default state directory.
    """

    def __init__(self, url=None, token=None, timeout=60.0, retries_429=20):
        self.url = (url or os.environ.get("KILN_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else _default_token()
        self.timeout = timeout
        self.retries_429 = retries_429

    # -- transport ---------------------------------------------------------

    def _request(self, method, path, body=None, timeout=None):
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        for attempt in range(self.retries_429 + 1):
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
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
                if e.code == 429 and attempt < self.retries_429:
                    time.sleep(min(float(retry_after or 1), 60.0))
                    continue
                raise APIError(e.code, code, msg, retry_after) from None
            except urllib.error.URLError as e:
                raise KilnError("cannot reach the kiln endpoint at %s: %s (is kiln serve running?)" % (self.url, e.reason)) from e
        raise AssertionError("unreachable")

    # -- API ---------------------------------------------------------------

    def health(self):
        return self._request("GET", "/v1/health")

    def images(self):
        return self._request("GET", "/v1/images")["images"]

    def functions(self):
        return self._request("GET", "/v1/functions")["functions"]

    def register_function(self, fn=None, image=None, *, source=None, function=None, ref=None, name=None,
                          timeout=None, memory_mib=None, max_result=None, max_retries=None):
        """Register fn (a callable), or source text with the function name to
        call, or a ref "module:function"; return the function id."""
        if image is None:
            raise KilnError("register_function needs image= (a name from Client.images())")
        body = {"image": image}
        if fn is not None:
            body.update(function_payload(fn))
        elif source is not None:
            body.update({"kind": "source", "source": source})
            if function:
                body["function"] = function
        elif ref is not None:
            body.update({"kind": "ref", "ref": ref})
        else:
            raise KilnError("register_function needs fn, source= or ref=")
        for k, v in (("name", name), ("memory_mib", memory_mib), ("max_result", max_result), ("max_retries", max_retries)):
            if v is not None:
                body[k] = v
        if timeout is not None:
            body["timeout"] = float(timeout)
        return self._request("POST", "/v1/functions", body)["id"]

    @staticmethod
    def _task_body(function_id, args, kwargs):
        body = {"function_id": function_id, "args": encode_value(list(args))}
        if kwargs:
            body["kwargs"] = encode_value(dict(kwargs))
        return body

    def submit(self, function_id, *args, **kwargs):
        """Queue one call; return the task id."""
        return self._request("POST", "/v1/tasks", self._task_body(function_id, args, kwargs))["task_id"]

    def submit_batch(self, function_id, calls):
        """Queue many calls, each (args, kwargs) or args; return the task ids."""
        tasks = []
        for c in calls:
            if isinstance(c, tuple) and len(c) == 2 and isinstance(c[1], dict):
                args, kwargs = c
            else:
                args, kwargs = c, {}
            tasks.append(self._task_body(function_id, args, kwargs))
        return self._request("POST", "/v1/tasks/batch", {"tasks": tasks})["task_ids"]

    def get_task(self, task_id, wait=None):
        """The task as a dict; with wait (seconds), wait up to that long for it to finish."""
        q = ""
        if wait:
            q = "?" + urllib.parse.urlencode({"wait": "%gs" % wait})
        return self._request("GET", "/v1/tasks/%s%s" % (urllib.parse.quote(task_id, safe=""), q),
                             timeout=self.timeout + (wait or 0))

    def wait_tasks(self, task_ids, timeout=30.0):
        """Wait until at least one of task_ids finished; return (finished task dicts, unknown ids)."""
        r = self._request("POST", "/v1/tasks/wait", {"task_ids": list(task_ids), "timeout": float(timeout)},
                          timeout=self.timeout + timeout)
        return r["tasks"], r["unknown"]

    def get_result(self, task_id, wait=None):
        """The task's value. Raises RemoteError when the function raised,
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

    def cancel(self, task_id):
        return self._request("POST", "/v1/tasks/%s/cancel" % urllib.parse.quote(task_id, safe=""))

    def tasks(self, state=None, function_id=None, limit=100):
        q = {"limit": str(limit)}
        if state:
            q["state"] = state
        if function_id:
            q["function_id"] = function_id
        return self._request("GET", "/v1/tasks?" + urllib.parse.urlencode(q))["tasks"]
