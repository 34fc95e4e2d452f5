#!/usr/bin/env bash
# The README's first command: install dependencies, build kiln and its guest
# kernel, build the example numpy image and run a numpy computation in it,
# with timings: once
# from a cold kernel boot, then twice from a snapshot (the first of those
# creates the snapshot).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
export PATH=$PATH:/usr/local/go/bin
make
mkdir -p work
# kiln's guest kernel: built once per machine from Debian's linux-source
# (about ten minutes on two cores, with progress), cached after that.
./bin/kiln kernel build
./bin/kiln build examples/numpy -o work/numpy.kimg
./bin/kiln inspect work/numpy.kimg | sed -n '1,12p'
job='import numpy, sys; print(numpy.arange(10).sum(), sys.version_info[:2])'
echo "== cold boot"
./bin/kiln run work/numpy.kimg --cold --timings -- python3 -c "$job"
echo "== snapshot restore (the first run creates the snapshot)"
./bin/kiln run work/numpy.kimg --timings -- python3 -c "$job"
./bin/kiln run work/numpy.kimg --timings -- python3 -c "$job"
