#!/usr/bin/env python3
"""kiln's take on the Globus Compute quickstart: run a function remotely.

    kiln serve --images DIR &              # prints the token once
    export KILN_URL=http://127.0.0.1:8470 KILN_TOKEN=... KILN_IMAGE=numpy
    PYTHONPATH=python python3 examples/sdk/quickstart.py

URL, token and image come from --url/--token/--image or $KILN_URL,
$KILN_TOKEN and $KILN_IMAGE (the token also from the endpoint's state dir).
"""

import argparse
import os

import kiln


def mean_of_squares(n):
    # Imports go inside the function: it is sent by source, without its module.
    import numpy as np
    return float(np.mean(np.arange(n) ** 2))


def invert(matrix):
    import numpy as np
    return np.linalg.inv(np.array(matrix)).tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("KILN_URL", "http://127.0.0.1:8470"))
    p.add_argument("--token", default=os.environ.get("KILN_TOKEN"))
    p.add_argument("--image", default=os.environ.get("KILN_IMAGE", "numpy"))
    a = p.parse_args()

    with kiln.Executor(a.url, token=a.token, image=a.image) as ex:
        future = ex.submit(mean_of_squares, 10)
        print("mean_of_squares(10) =", future.result())
        print("map:", list(ex.map(mean_of_squares, [1, 2, 3, 4])))

        # A remote exception is raised here, with the traceback from the VM.
        try:
            ex.submit(invert, [[1, 2], [2, 4]]).result()
        except kiln.RemoteError as e:
            print("remote error:", e.remote_type, "-", e.remote_message)
            print(e.remote_traceback)


if __name__ == "__main__":
    main()
