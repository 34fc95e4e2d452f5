"""The SDK throughput benchmark's client side (BenchmarkSDK): one run, side
by side, of the same no-op

- in concurrent.futures.ProcessPoolExecutor(2) on this host;
- through the endpoint as one batch call of N tasks (the API's best case);
- through kiln.Executor, N submit calls from one thread;

then the latency of single no-op tasks through the Executor, one at a
time. Each rate is N tasks from the first submission to the last result.
Prints one JSON object."""

import concurrent.futures
import json
import os
import sys
import time

import kiln

URL, TOKEN, IMAGE = sys.argv[1:4]
N = int(sys.argv[4]) if len(sys.argv) > 4 else 10000
LAT = int(sys.argv[5]) if len(sys.argv) > 5 else 200


def noop():
    return None


def rate(n, t0):
    return n / (time.perf_counter() - t0)


def pool_rate():
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        list(ex.map(pow, range(100), range(100)))  # workers up
        t0 = time.perf_counter()
        futs = [ex.submit(noop) for _ in range(N)]
        for f in futs:
            f.result()
        return rate(N, t0)


def batch_rate(client):
    fid = client.register_function(noop, IMAGE)
    body = {"function_id": fid, "tasks": [{} for _ in range(N)], "task_group": "bench-batch-%d" % os.getpid()}
    t0 = time.perf_counter()
    ids = client._request("POST", "/v1/tasks/batch", body)["task_ids"]
    left = set(ids)
    cursor = 0
    while left:
        tasks, cursor = client.wait_group(body["task_group"], cursor, timeout=30)
        for t in tasks:
            if t["state"] in ("succeeded", "failed", "cancelled"):
                if t["state"] != "succeeded":
                    raise SystemExit("batch task %s %s: %s" % (t["id"], t["state"], t.get("error")))
                left.discard(t["id"])
    return rate(N, t0)


def executor_rate(ex):
    t0 = time.perf_counter()
    futs = [ex.submit(noop) for _ in range(N)]
    for f in futs:
        f.result()
    return rate(N, t0)


def latencies(ex):
    out = []
    for _ in range(LAT):
        t0 = time.perf_counter()
        ex.submit(noop).result()
        out.append((time.perf_counter() - t0) * 1000)
    out.sort()
    return out[len(out) // 2], out[min(len(out) - 1, int(len(out) * 0.99))]


def main():
    client = kiln.Client(URL, TOKEN)
    with kiln.Executor(URL, token=TOKEN, image=IMAGE) as ex:
        # Warm the pool: every VM up and the function registered.
        list(ex.map(lambda_free_noop, range(200)))
        res = {"n": N, "pool_rate": pool_rate(), "batch_rate": batch_rate(client), "executor_rate": executor_rate(ex)}
        res["p50_ms"], res["p99_ms"] = latencies(ex)
    print(json.dumps(res))


def lambda_free_noop(_):
    return None


main()
