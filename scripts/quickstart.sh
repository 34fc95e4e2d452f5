#!/usr/bin/env bash
# The README's first command: install dependencies, build kiln, build the
# example numpy image and run a numpy computation in it, with timings.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
export PATH=$PATH:/usr/local/go/bin
make
mkdir -p work
./bin/kiln build examples/numpy -o work/numpy.kimg
./bin/kiln inspect work/numpy.kimg | sed -n '1,12p'
./bin/kiln run work/numpy.kimg --timings -- python3 -c "import numpy, sys; print(numpy.arange(10).sum(), sys.version_info[:2])"
