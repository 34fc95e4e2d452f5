"""CPython's own concurrent.futures conformance tests, run against kiln.Executor.

The ExecutorTest, WaitTests and AsCompletedTests mixins of
Lib/test/test_concurrent_futures.py (Debian's libpython3.11-testsuite),
combined with a mixin that builds a kiln.Executor. Set KILN_URL, KILN_TOKEN
and KILN_IMAGE (the Go test TestVM in internal/endpoint does).
"""

import functools
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import kiln  # noqa: E402

URL = os.environ.get("KILN_URL")
IMAGE = os.environ.get("KILN_IMAGE")
TOKEN = os.environ.get("KILN_TOKEN")

try:
    from test import test_concurrent_futures as cf
except ImportError as e:  # pragma: no cover - the suite is missing
    cf = None
    MISSING = "CPython's test suite is not installed (apt-get install libpython3.11-testsuite): %s" % e

if cf is not None and URL and IMAGE:

    class KilnMixin(cf.ExecutorMixin):
        executor_type = staticmethod(functools.partial(kiln.Executor, URL, token=TOKEN, image=IMAGE))

    class KilnExecutorTest(KilnMixin, cf.ExecutorTest, cf.BaseTestCase):
        @unittest.skip("local pool internals: kiln.Executor has no worker processes to check")
        def test_max_workers_negative(self):
            pass

    class KilnWaitTests(KilnMixin, cf.WaitTests, cf.BaseTestCase):
        pass

    class KilnAsCompletedTests(KilnMixin, cf.AsCompletedTests, cf.BaseTestCase):
        pass

elif cf is None:

    class Missing(unittest.TestCase):
        def test_suite_present(self):
            if os.environ.get("KILN_CI") == "1":
                self.fail(MISSING)
            self.skipTest(MISSING)


if __name__ == "__main__":
    unittest.main()
