# nixvm-image: build, test, benchmark, demo.
#
#   make build   static binaries in bin/ (CGO_ENABLED=0, -trimpath)
#   make test    install test dependencies (root, Debian 12), go vet, go test
#   make bench   build time and size against the nixpkgs way (scripts/bench), push bytes
#                against rsync and the floor (scripts/bench-layout), first-boot growth
#                against growpart + resize2fs; publish/pull against desync
#                (scripts/bench-publish); BENCHMARKS.md reports them
#   make demo    build a bootable NixOS-shaped system with Nix, build demo/demo.qcow2
#                from it (bootloader installed by the VM stage), show what it holds,
#                then boot it on a 4x larger disk and watch nixvm-resize grow /
#
# Tests that need a reference tool skip without it on a laptop; .ci/run sets
# NIXVM_TEST_DISALLOW_SKIP=1, which turns every such skip into a failure.

GO ?= go
GO_TEST_FLAGS ?=
NIX_FLAGS = --option substituters '' --option sandbox false --option auto-optimise-store true

.PHONY: all build deps test test-only vet bench demo clean clean-fixtures

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/ ./cmd/...

deps:
	scripts/install-test-deps

vet:
	$(GO) vet ./...

test: deps test-only

# test-only: the suite without the install step (.ci/run installs first).
test-only: vet
	$(GO) test -count=1 -timeout 25m $(GO_TEST_FLAGS) ./...

bench: deps build
	scripts/bench
	scripts/bench-layout
	scripts/bench-publish
	NIXVM_BENCH=1 $(GO) test -count=1 -run TestBenchGrowVsGrowpart -v ./cmd/nixvm-resize

demo: deps build
	mkdir -p demo
	nix-build testdata/fixture/bootable-resize.nix $(NIX_FLAGS) --argstr resize "$(CURDIR)/bin/nixvm-resize" --out-link demo/system
	bin/nixvm-image build --toplevel "$$(readlink demo/system)" -o demo/demo.qcow2 --force
	scripts/show-image demo/demo.qcow2
	scripts/demo-boot demo/demo.qcow2

clean:
	rm -rf bin demo bench-out

# clean-fixtures: drop the test fixtures' GC roots and collect the store, so
# the next make test builds them as a new machine does.
clean-fixtures:
	scripts/drop-fixtures
