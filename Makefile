# pcluster build, test and benchmark entry points.
# `make demo` and `make test` install what they need (deps) on a fresh
# Debian machine; .ci/run calls `make test`.

GO        ?= go
BIN       := bin
CMDS      := $(notdir $(wildcard cmd/*))
GOFLAGS   ?=
# Debian packages the tests and benchmarks run: compilers for the target
# programs, python3, iproute2 (network namespaces), util-linux (nsenter,
# setpriv), libcap2-bin (setcap), time (peak RSS in benchmarks),
# redis-tools (a real server the tests move: redis-check-rdb is redis-server),
# nginx (a master and workers moved as a tree, TestMigrateNginxTree),
# lintian and systemd (systemd-analyze): the Debian package's test,
# crun (a real runtime's container moved with its namespaces, TestContainerCrun),
# memcached (moved with a client's connection kept, TestMemcachedKeptConnection).
DEBS      := gcc libc6-dev python3 iproute2 util-linux libcap2-bin time redis-tools nginx lintian systemd chromium crun memcached
export GOFLAGS

.PHONY: all build deps test lint bench demo deb clean zdtm zdtm-deps

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/...

# deps installs the Debian packages and Go tools the tests use, once.
deps:
	@missing=""; \
	for c in gcc python3 ip nsenter setpriv setcap /usr/bin/time redis-check-rdb nginx lintian systemd-analyze chromium crun memcached; do command -v $$c >/dev/null 2>&1 || missing=1; done; \
	[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || missing=1; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $(DEBS)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) >/dev/null; \
	fi
	@command -v staticcheck >/dev/null 2>&1 || [ -x $$($(GO) env GOPATH)/bin/staticcheck ] || \
		$(GO) install honnef.co/go/tools/cmd/staticcheck@latest
	@$(GO) mod download

lint: deps
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	PATH="$$PATH:$$($(GO) env GOPATH)/bin" staticcheck ./...

test: deps build lint
	$(GO) test -count=1 -timeout 20m ./...
	$(GO) test -run '^$$' -fuzz FuzzDecoder -fuzztime 60000x -fuzzminimizetime 200x ./migrate/image
	$(GO) test -run '^$$' -fuzz FuzzChain -fuzztime 20000x -fuzzminimizetime 200x ./migrate/image
	$(GO) test -run '^$$' -fuzz FuzzSealOpen -fuzztime 20000x -fuzzminimizetime 200x ./migrate/stream

bench: deps build
	$(GO) test -p 1 -run '^$$' -bench . -benchtime 1x -timeout 30m ./...

# zdtm runs a subset of CRIU's zdtm static suite through pfreeze -halt and
# pthaw, and with CRIU=PATH through criu dump/restore too (docs/zdtm.md).
# ZDTM names a CRIU source tree's test/zdtm directory; the test builds the
# zdtm tests it runs (gcc and libc6-dev). zdtm-deps installs what building
# CRIU itself needs, and iptables, with which criu dump --tcp-established
# locks the connections until the restore.
ZDTM_DEBS := libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler libnl-3-dev \
	libnl-route-3-dev libcap-dev libnet1-dev pkg-config python3-protobuf libbsd-dev libaio-dev iptables
zdtm: deps
	@[ -n "$(ZDTM)" ] || { echo "zdtm: set ZDTM=/path/to/criu/test/zdtm (and CRIU=/path/to/criu to compare); docs/zdtm.md"; exit 2; }
	ZDTM=$(abspath $(ZDTM)) CRIU=$(if $(CRIU),$(abspath $(CRIU))) $(GO) test -count=1 -timeout 40m -run TestZdtm -v ./cmd/pthaw

zdtm-deps:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(ZDTM_DEBS) >/dev/null

# deb writes pcluster_VERSION_amd64.deb here (docs/packaging.md).
deb:
	$(GO) run ./internal/debpkg/mkdeb -out .

demo: deps build
	./internal/demo/demo.sh

clean:
	rm -rf $(BIN) pcluster_*.deb
