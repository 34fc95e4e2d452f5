"""The SDK with an ordinary analysis script's functions, against a real kiln
serve: set KILN_URL, KILN_TOKEN and KILN_IMAGE (the Go test TestVM in
internal/endpoint does). Nothing here is imported inside the functions."""

import collections
import dataclasses
import enum
import functools
import math
import os
import sys
import time
import traceback
import unittest

import numpy as np
from numpy import linalg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import kiln  # noqa: E402

URL = os.environ.get("KILN_URL")
IMAGE = os.environ.get("KILN_IMAGE")
TOKEN = os.environ.get("KILN_TOKEN")

SCALE = 3
TABLE = {"a": [1, 2], "b": (3, 4)}
OFFSETS = np.arange(4)


class MyError(Exception):
    """A script's own exception."""


class DetailedError(MyError):
    def __init__(self, code, why):
        super().__init__(code, why)
        self.code = code


@dataclasses.dataclass
class Point:
    x: float
    y: float

    def norm(self):
        return math.hypot(self.x, self.y)


class Color(enum.Enum):
    RED = 1
    GREEN = 2


Pair = collections.namedtuple("Pair", "left right")


def helper(v):
    return deeper(v) * SCALE


def deeper(v):
    return v + 1


def uses_globals(n):
    return float(np.sum(np.arange(n) + OFFSETS[0])) + helper(n) + len(TABLE["b"]) + linalg.norm([3.0, 4.0])


def raises_key(d):
    return d["missing"]


def raises_mine(msg):
    raise MyError("script error: " + msg)


def raises_detailed():
    raise DetailedError(42, "why not")


def moves(p, by):
    return Point(p.x + by, p.y + by)


def colors(c):
    return [c, Color.GREEN, Pair(c.value, Point(1, 2))]


def first_line_raises():
    raise ValueError("line check")  # the traceback must name this file and line


def sleeper(t):
    time.sleep(t)
    return t


def big_tuple():
    return (1, (2, 3), {"k": (4,)})


@unittest.skipUnless(URL and IMAGE, "set KILN_URL, KILN_TOKEN and KILN_IMAGE to test against an endpoint")
class ScriptTest(unittest.TestCase):
    def setUp(self):
        self.ex = kiln.Executor(URL, token=TOKEN, image=IMAGE)

    def tearDown(self):
        self.ex.shutdown(wait=True)

    def test_globals_helpers_constants(self):
        want = uses_globals(10)
        self.assertEqual(self.ex.submit(uses_globals, 10).result(timeout=600), want)

    def test_client_types_round_trip(self):
        p = self.ex.submit(moves, Point(1.0, 2.0), 1).result(timeout=600)
        self.assertIsInstance(p, Point)
        self.assertEqual(p, Point(2.0, 3.0))
        self.assertEqual(self.ex.submit(Point.norm, Point(3.0, 4.0)).result(timeout=600), 5.0)
        got = self.ex.submit(colors, Color.RED).result(timeout=600)
        self.assertEqual(got, [Color.RED, Color.GREEN, Pair(1, Point(1, 2))])
        self.assertIsInstance(got[2], Pair)
        arr = self.ex.submit(np.multiply, np.arange(3), 2).result(timeout=600)
        self.assertEqual(arr.tolist(), [0, 2, 4])
        self.assertEqual(self.ex.submit(big_tuple).result(timeout=600), (1, (2, 3), {"k": (4,)}))

    def test_typed_exceptions(self):
        with self.assertRaises(KeyError) as cm:
            self.ex.submit(raises_key, {}).result(timeout=600)
        self.assertIsInstance(cm.exception, kiln.RemoteError)
        self.assertEqual(cm.exception.args, ("missing",))
        with self.assertRaises(MyError) as cm:
            self.ex.submit(raises_mine, "x").result(timeout=600)
        self.assertIsInstance(cm.exception, kiln.RemoteError)
        self.assertEqual(str(cm.exception), "script error: x")
        with self.assertRaises(DetailedError) as cm:
            self.ex.submit(raises_detailed).result(timeout=600)
        self.assertEqual(cm.exception.code, 42)
        with self.assertRaises(linalg.LinAlgError):
            self.ex.submit(linalg.inv, np.zeros((2, 2))).result(timeout=600)
        with self.assertRaises(ZeroDivisionError):
            self.ex.submit(divmod, 1, 0).result(timeout=600)

    def test_traceback_names_the_script(self):
        try:
            self.ex.submit(first_line_raises).result(timeout=600)
        except ValueError as e:
            text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            line = first_line_raises.__code__.co_firstlineno + 1
            self.assertIn('File "%s", line %d, in first_line_raises' % (os.path.abspath(__file__), line), text)
            self.assertIn("raise ValueError(\"line check\")", text)
            self.assertNotIn("agent.py", e.remote_traceback)
        else:
            self.fail("no exception")

    def test_builtins_and_partials_by_reference(self):
        self.assertEqual(self.ex.submit(pow, 2, 10).result(timeout=600), 1024)
        self.assertEqual(self.ex.submit(math.factorial, 5).result(timeout=600), 120)
        self.assertEqual(self.ex.submit(functools.partial(pow, 3), 2).result(timeout=600), 9)
        self.assertIsNone(self.ex.submit(time.sleep, 0).result(timeout=600))

    def test_unsendable_global_fails_at_submit(self):
        global HANDLE
        HANDLE = open(__file__)
        try:
            def reads():  # noqa: E306 - the closure-free nested def goes by source
                return HANDLE.read()
            with self.assertRaises(kiln.CaptureError) as cm:
                self.ex.submit(reads)
            self.assertIn("'HANDLE'", str(cm.exception))
        finally:
            HANDLE.close()

    def test_running_and_cancel(self):
        f = self.ex.submit(sleeper, 5)
        deadline = time.monotonic() + 600
        while not f.running():
            self.assertLess(time.monotonic(), deadline, "the task never ran")
            time.sleep(0.05)
        self.assertFalse(f.cancel(), "cancel() of a running task returns False")
        self.assertEqual(f.result(timeout=600), 5)

    def test_shutdown_cancel_futures_leaves_running(self):
        # One running task (the test endpoint may have a single VM).
        ex = kiln.Executor(URL, token=TOKEN, image=IMAGE)
        running = [ex.submit(sleeper, 4)]
        deadline = time.monotonic() + 600
        while not all(f.running() for f in running):
            self.assertLess(time.monotonic(), deadline, "the task never ran")
            time.sleep(0.05)
        queued = [ex.submit(sleeper, 0.1) for _ in range(5)]
        ex.shutdown(wait=True, cancel_futures=True)
        self.assertEqual([f.result() for f in running], [4])
        self.assertTrue(all(f.cancelled() for f in queued), [f._state for f in queued])

    def test_reload_tasks(self):
        ex = kiln.Executor(URL, token=TOKEN, image=IMAGE)
        futs = [ex.submit(helper, i) for i in range(3)]
        self.assertEqual([f.result(timeout=600) for f in futs], [3, 6, 9])
        ex.shutdown()
        again = kiln.Executor(URL, token=TOKEN, image=IMAGE, task_group=ex.task_group)
        try:
            got = sorted(f.result(timeout=600) for f in again.reload_tasks())
        finally:
            again.shutdown()
        self.assertEqual(got, [3, 6, 9])

    def test_shell_function(self):
        # Images carry dash and python3, not coreutils: a pipe into python3.
        upper = "python3 -c 'import sys; print(sys.stdin.read().upper(), end=\"\")'"
        fn = kiln.ShellFunction("echo {x} | " + upper + "; echo err >&2; exit 3")
        r = self.ex.submit(fn, x="hello").result(timeout=600)
        self.assertEqual((r.returncode, r.stdout, r.stderr), (3, "HELLO\n", "err\n"))
        self.assertEqual(r.cmd, "echo hello | " + upper + "; echo err >&2; exit 3")
        # The walltime ends the shell and the process it started.
        slow = kiln.ShellFunction("python3 -c 'import time; time.sleep(300)'; echo after", walltime=1)
        t0 = time.monotonic()
        r = self.ex.submit(slow).result(timeout=600)
        self.assertEqual((r.returncode, r.stdout), (124, ""))
        self.assertLess(time.monotonic() - t0, 120)

    def test_many_submits_are_batched(self):
        futs = [self.ex.submit(deeper, i) for i in range(300)]
        self.assertEqual([f.result(timeout=600) for f in futs], [i + 1 for i in range(300)])


if __name__ == "__main__":
    unittest.main()
