"""The client side of TestSlurm: an ordinary script whose tasks run on
kiln workers in Slurm pilot jobs. It prints "submitted" once its 200 tasks
are queued, then one JSON line with what it saw."""

import json
import sys
import time

import numpy as np

import kiln

URL, TOKEN, IMAGE = sys.argv[1:4]


def square(i):
    return i * i


def norm(n):
    return float(np.linalg.norm(np.arange(n)))


def fails(key):
    raise KeyError(key)


def slow():
    time.sleep(120)


def main():
    out = {}
    t0 = time.time()
    with kiln.Executor(url=URL, token=TOKEN, image=IMAGE) as ex:
        futs = [ex.submit(square, i) for i in range(200)]
        while any(f.task_id is None for f in futs):
            time.sleep(0.05)
        print("submitted", flush=True)
        vals = [f.result(timeout=600) for f in futs]
        out["first_to_last_s"] = time.time() - t0
        out["squares_ok"] = vals == [i * i for i in range(200)]
        out["task_ids"] = [f.task_id for f in futs]
        out["norm"] = ex.submit(norm, 4).result(timeout=300)
        try:
            ex.submit(fails, "nope").result(timeout=300)
            out["key_error"] = "no exception"
        except KeyError as e:
            out["key_error"] = "KeyError, RemoteError=%s" % isinstance(e, kiln.RemoteError)
    with kiln.Executor(url=URL, token=TOKEN, image=IMAGE, timeout=3) as ex:
        try:
            ex.submit(slow).result(timeout=300)
            out["timeout"] = "no exception"
        except kiln.TaskFailed as e:
            out["timeout"] = e.code
    print(json.dumps(out), flush=True)


main()
