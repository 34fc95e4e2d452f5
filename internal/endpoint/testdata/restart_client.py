"""The client side of TestExecutorRestart: an ordinary script whose endpoint
is killed under it. Phase "restart": 50 tasks, the endpoint is killed -9 and
started again; every future must resolve once with the right value. Phase
"down": the endpoint is killed and left down; the futures must fail by the
unreachable deadline with an error that says what happened.

It prints one line when its tasks are all submitted ("submitted") and one
JSON line with what it saw at the end."""

import collections
import json
import sys
import time

import kiln

URL, TOKEN, IMAGE, PHASE = sys.argv[1:5]


def slow_square(i):
    time.sleep(0.1)
    return i * i


def sleeper():
    time.sleep(3600)


def wait_submitted(futs):
    # Every future has a task id once its batch was accepted.
    deadline = time.monotonic() + 600
    while not all(f.task_id for f in futs):
        if time.monotonic() > deadline:
            raise SystemExit("tasks were not submitted in 10 minutes")
        time.sleep(0.02)
    print("submitted", flush=True)


def main():
    if PHASE == "restart":
        ex = kiln.Executor(URL, token=TOKEN, image=IMAGE, max_retries=2, unreachable_timeout=600, poll_seconds=5)
        futs = [ex.submit(slow_square, i) for i in range(50)]
    else:
        ex = kiln.Executor(URL, token=TOKEN, image=IMAGE, unreachable_timeout=5, poll_seconds=2)
        futs = [ex.submit(sleeper) for _ in range(3)]
    calls = collections.Counter()
    for i, f in enumerate(futs):
        f.add_done_callback(lambda _f, i=i: calls.update([i]))
    wait_submitted(futs)
    out = {"results": [], "errors": [], "callbacks": []}
    t0 = time.monotonic()
    for f in futs:
        try:
            out["results"].append(f.result(timeout=900))
        except Exception as e:  # noqa: BLE001 - reported to the Go test
            out["errors"].append("%s: %s" % (type(e).__name__, e))
    out["seconds"] = time.monotonic() - t0
    out["callbacks"] = [calls[i] for i in range(len(futs))]
    ex.shutdown(wait=False)
    print(json.dumps(out), flush=True)


main()
