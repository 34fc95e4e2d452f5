# kiln's build: the host CLI and the static guest init side by side in bin/.
GO      ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

.PHONY: all test clean FORCE
all: bin/kiln bin/kiln-init

bin/kiln: FORCE
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $@ ./cmd/kiln

# kiln-init is PID 1 in every image: static, and reproducible (no VCS stamp,
# no paths) so the same source always gives the same image bytes.
bin/kiln-init: FORCE
	CGO_ENABLED=0 $(GO) build -trimpath -buildvcs=false -ldflags "-s -w" -o $@ ./cmd/kiln-init

test:
	./scripts/test.sh

clean:
	rm -rf bin
