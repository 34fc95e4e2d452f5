"""Offline tests of the SDK's encodings (no endpoint needed)."""

import base64
import json
import functools
import math
import os
import pickle
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import kiln  # noqa: E402
from kiln._client import result_of  # noqa: E402


def plain(x, y=2):
    return x * y


class MyInt(int):
    pass


def decorate(f):
    @functools.wraps(f)
    def w(*a):
        return f(*a)
    return w


@decorate
def decorated(x):
    return x


class ValueTest(unittest.TestCase):
    def test_json_values(self):
        for v in [None, True, 1, 1.5, "s", [1, "a"], {"k": [1, 2.5]}]:
            with self.subTest(v=v):
                e = kiln.encode_value(v)
                self.assertEqual(e["enc"], "json")
                self.assertEqual(kiln.decode_value(json.loads(json.dumps(e))), v)

    def test_pickled_values(self):
        # A tuple is pickled: JSON would give it back as a list.
        for v in [{1: "int key"}, {1, 2}, b"bytes", float("nan"), 1 + 2j, [1, {2}], (1, 2), [(1,), {"k": (2,)}]]:
            with self.subTest(v=v):
                e = kiln.encode_value(v)
                self.assertEqual(e["enc"], "pickle")
                got = kiln.decode_value(e)
                if isinstance(v, float) and math.isnan(v):
                    self.assertTrue(math.isnan(got))
                else:
                    self.assertEqual(got, v)
                pickle.loads(base64.b64decode(e["data"]))

    def test_int_subclass_is_pickled(self):
        self.assertEqual(kiln.encode_value(MyInt(3))["enc"], "pickle")


class FunctionTest(unittest.TestCase):
    def test_plain_by_source(self):
        p = kiln.function_payload(plain)
        self.assertEqual(p["kind"], "source")
        self.assertEqual(p["function"], "plain")
        self.assertTrue(p["source"].startswith("def plain("))

    def test_nested_def_is_dedented(self):
        def inner(a):
            return a + 1
        p = kiln.function_payload(inner)
        self.assertEqual(p["kind"], "source")
        self.assertTrue(p["source"].startswith("def inner("))

    def test_not_by_source(self):
        k = 3

        def closure(a):
            return a + k
        for fn in [lambda x: x, closure, decorated]:
            with self.subTest(fn=fn):
                try:
                    p = kiln.function_payload(fn)
                except kiln.KilnError as e:
                    self.assertIn("cloudpickle", str(e))
                else:
                    self.assertEqual(p["kind"], "pickle")


class ResultTest(unittest.TestCase):
    def test_success(self):
        self.assertEqual(result_of({"id": "t", "state": "succeeded", "result": {"ok": True, "value": {"enc": "json", "data": 5}}}), 5)

    def test_remote_error(self):
        t = {"id": "t-1", "state": "failed", "error": "ValueError: bad", "error_code": "exception",
             "result": {"ok": False, "error_kind": "exception",
                        "error": {"type": "ValueError", "message": "bad", "traceback": "Traceback (most recent call last):\n  line 2\nValueError: bad\n"}}}
        with self.assertRaises(kiln.RemoteError) as cm:
            result_of(t)
        e = cm.exception
        self.assertIsInstance(e, Exception)
        self.assertEqual((e.remote_type, e.remote_message), ("ValueError", "bad"))
        self.assertIn("Traceback (most recent call last)", str(e))
        self.assertIn("t-1", str(e))

    def test_infrastructure_failure(self):
        with self.assertRaises(kiln.TaskFailed) as cm:
            result_of({"id": "t-2", "state": "failed", "error": "timed out", "error_code": "timeout"})
        self.assertEqual(cm.exception.code, "timeout")

    def test_cancelled(self):
        import concurrent.futures
        with self.assertRaises(concurrent.futures.CancelledError):
            result_of({"id": "t-3", "state": "cancelled"})


if __name__ == "__main__":
    unittest.main()
