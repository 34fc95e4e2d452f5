#!/usr/bin/env bash
# The README's second command (via make test): style gates, kiln's kernel,
# then every test, including the end-to-end tests that build images and boot
# them under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
	echo "gofmt needed on:" $unformatted >&2
	exit 1
fi
go vet ./...
go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...
# kiln's guest kernel, the default kernel of every image the tests build:
# built once per machine into the user's cache (about ten minutes on two
# cores the first time, a cache lookup after), before and outside the
# tests' timeouts.
t0=$SECONDS
go run ./cmd/kiln kernel build
echo "kernel: $((SECONDS - t0))s"
go test -count=1 -p 1 -timeout 80m ./...
