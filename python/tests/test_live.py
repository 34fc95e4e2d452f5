"""Tests against a real kiln serve: set KILN_URL, KILN_TOKEN and KILN_IMAGE
(the Go test TestSDK in internal/endpoint does)."""

import concurrent.futures
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import kiln  # noqa: E402

URL = os.environ.get("KILN_URL")
IMAGE = os.environ.get("KILN_IMAGE")


def norm(a, b):
    import numpy as np
    return float(np.linalg.norm([a, b]))


def kw(a, *, scale=1):
    return {"sum": a * scale, "set": {a}}


def boom(msg):
    raise ValueError("remote says " + msg)


@unittest.skipUnless(URL and IMAGE, "set KILN_URL, KILN_TOKEN and KILN_IMAGE to test against an endpoint")
class LiveTest(unittest.TestCase):
    def setUp(self):
        self.client = kiln.Client(URL, os.environ.get("KILN_TOKEN"))

    def test_health_and_images(self):
        self.assertEqual(self.client.health()["status"], "ok")
        names = [i["name"] for i in self.client.images()]
        self.assertIn(IMAGE, names)

    def test_executor(self):
        with kiln.Executor(URL, token=os.environ.get("KILN_TOKEN"), image=IMAGE) as ex:
            self.assertEqual(ex.submit(norm, 3, 4).result(timeout=600), 5.0)
            self.assertEqual(list(ex.map(norm, [3, 6], [4, 8], timeout=600)), [5.0, 10.0])
            r = ex.submit(kw, 2, scale=3).result(timeout=600)
            self.assertEqual(r, {"sum": 6, "set": {2}})
            fut = ex.submit(boom, "hi")
            with self.assertRaises(kiln.RemoteError) as cm:
                fut.result(timeout=600)
            self.assertEqual(cm.exception.remote_type, "ValueError")
            self.assertIn("remote says hi", str(cm.exception))
            self.assertIn('raise ValueError("remote says " + msg)', cm.exception.remote_traceback)

    def test_client(self):
        fid = self.client.register_function(norm, IMAGE)
        self.assertEqual(fid, self.client.register_function(norm, IMAGE), "registration is idempotent")
        tid = self.client.submit(fid, 6, 8)
        self.assertEqual(self.client.get_result(tid, wait=600), 10.0)
        ids = self.client.submit_batch(fid, [(1, 0), (0, 2)])
        self.assertEqual([self.client.get_result(t, wait=600) for t in ids], [1.0, 2.0])
        ref = self.client.register_function(ref="math:factorial", image=IMAGE)
        self.assertEqual(self.client.get_result(self.client.submit(ref, 10), wait=600), 3628800)

    def test_errors(self):
        with self.assertRaises(kiln.APIError) as cm:
            self.client.submit("fn-does-not-exist")
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "unknown_function"))
        bad = kiln.Client(URL, "wrong-token")
        with self.assertRaises(kiln.APIError) as cm:
            bad.functions()
        self.assertEqual(cm.exception.status, 401)


if __name__ == "__main__":
    unittest.main()
