# tunnel — every task is a make target. `make demo` runs the main job, `make test` the tests.
CARGO        ?= cargo
FUZZ_SECONDS ?= 60
MUSL_TARGET  := x86_64-unknown-linux-musl
TARGET_DIR   := $(or $(CARGO_TARGET_DIR),target)
BIN          := $(TARGET_DIR)/release/tunnel
STATIC_BIN   := $(TARGET_DIR)/$(MUSL_TARGET)/release/tunnel
STATIC_BENCH := $(TARGET_DIR)/$(MUSL_TARGET)/release/tunnel-bench

.PHONY: all build release test test-deps test-net lint fmt demo bench bench-wan fuzz static static-arm64 interop clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

## test: unit tests, then the black-box tests against the built binary. Every test binary runs
## (--no-fail-fast), and the target fails if any test failed. The browser tests run when
## tests/browser/prereq.sh can provide for them (root: it installs Chromium and iproute2);
## otherwise it prints one line saying why they are skipped and how to run them.
test: test-deps
	$(CARGO) build
	@if tests/browser/prereq.sh; then skip=; else skip=1; fi; \
	  echo "TUNNEL_SKIP_BROWSER=$$skip $(CARGO) test --no-fail-fast -- --test-threads=2"; \
	  TUNNEL_SKIP_BROWSER=$$skip $(CARGO) test --no-fail-fast -- --test-threads=2

# The agent API guide's Python and Node clients run in the tests: httpx and eventsource@2.
# systemd-analyze verifies the units `tunnel service` prints (a few MB from apt, as root).
AGENT_CLIENTS := $(TARGET_DIR)/tmp/agent-clients
test-deps:
	@python3 -c 'import httpx' 2>/dev/null || pip install -q httpx
	@command -v systemd-analyze >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; } || \
	  echo "*** systemd-analyze is missing: tests/release.rs checks the units' content only; \
	  install systemd (apt-get install systemd) to verify them too ***"
	@test -d $(AGENT_CLIENTS)/node_modules/eventsource || \
	  (mkdir -p $(AGENT_CLIENTS) && npm install --silent --no-audit --no-fund --prefix $(AGENT_CLIENTS) eventsource@2)

## test-net: NAT traversal in network namespaces (root): two LANs behind Linux routers
## (iptables NAT and firewalls) and a public segment with `tunnel signal` and coturn; cone,
## no input firewall, symmetric (relayed), UDP blocked (TURN over TCP), 2 % loss, IPv6, and
## Chromium through TURN and behind mDNS; then tests/wan.rs on an emulated WAN path (a 3 s and
## a 30 s outage, SSE at 3 % loss). Cases run in parallel; NET_TEST_ARGS adds libtest
## arguments (e.g. --include-ignored for the cases that hit a known product bug).
NET_TEST_ARGS ?=
test-net:
	@if [ "$$(id -u)" = 0 ]; then \
	  need=""; \
	  command -v iptables-restore >/dev/null || need="$$need iptables"; \
	  command -v turnserver >/dev/null || need="$$need coturn"; \
	  [ -z "$$need" ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need); \
	fi
	@start=$$(date +%s); \
	TUNNEL_NET_TESTS=1 $(CARGO) test --test net --test wan -- --nocapture --test-threads=16 $(NET_TEST_ARGS); \
	status=$$?; echo "make test-net: $$(( $$(date +%s) - start )) s"; exit $$status

## lint: formatting check and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## demo: signal server, demo upstream, serve and proxy on loopback; one streamed request
demo: release
	$(BIN) demo

## bench: figures side by side (signal server; tunnel vs. direct), measured on the static
## musl binary that `make static` builds (the one routers and Pis run)
bench: static
	$(STATIC_BENCH) signal
	$(STATIC_BENCH) tunnel

## bench-wan: the tunnel next to plain TCP on an emulated WAN path (tests/netbed/wan.rs; root):
## RTT 50 and 200 ms × loss 0 / 1 / 3 % at 100 Mbit/s; download and upload MB/s of 20 MiB,
## first SSE token, worst and p99 gap between tokens; release build, about 5-7 minutes
bench-wan:
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "*** make bench-wan needs root (network namespaces, TUN devices): SKIPPED ***"; \
	  exit 0; \
	fi; \
	$(CARGO) test --release --test wan_bench --no-run || exit 1; \
	start=$$(date +%s); \
	TUNNEL_WAN_BENCH=1 $(CARGO) test --release --test wan_bench; \
	status=$$?; echo "make bench-wan: $$(( $$(date +%s) - start )) s"; exit $$status

## fuzz: run each fuzz target (frame codec, HTTP/1.1 codec, TURN) for FUZZ_SECONDS (nightly +
## cargo-fuzz); new inputs go to target/fuzz-corpus, the committed seeds stay as they are
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	@rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
	@for t in frame http1 turn; do \
	  mkdir -p target/fuzz-corpus/$$t && \
	  (cd fuzz && $(CARGO) +nightly fuzz run $$t ../target/fuzz-corpus/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS)) || exit 1; \
	done

## static: stripped, fully static x86_64 musl binary; prints its size
static:
	@rustup target list --installed | grep -qx $(MUSL_TARGET) || rustup target add $(MUSL_TARGET)
	@command -v musl-gcc >/dev/null || (apt-get update -qq && apt-get install -y -qq musl-tools)
	CC_x86_64_unknown_linux_musl=musl-gcc $(CARGO) build --release --target $(MUSL_TARGET)
	@file $(STATIC_BIN) | grep -q 'static' || (echo "not a static binary" && false)
	@ls -l $(STATIC_BIN) | awk '{ printf "static binary: %s, %d bytes (%.2f MiB)\n", $$9, $$5, $$5/1048576 }'

## static-arm64: the same for 64-bit ARM (Raspberry Pi 3/4/5, arm64 routers), cross-built with
## cargo-zigbuild; under qemu-aarch64 (when installed) it then serves a native proxy in a test
ARM_TARGET := aarch64-unknown-linux-musl
ARM_BIN    := $(TARGET_DIR)/$(ARM_TARGET)/release/tunnel
static-arm64:
	@rustup target list --installed | grep -qx $(ARM_TARGET) || rustup target add $(ARM_TARGET)
	@command -v cargo-zigbuild >/dev/null || pip install -q ziglang cargo-zigbuild
	$(CARGO) zigbuild --release --target $(ARM_TARGET) --bin tunnel
	@file $(ARM_BIN) | grep -q 'ARM aarch64.*static' || (echo "not a static aarch64 binary" && false)
	@ls -l $(ARM_BIN) | awk '{ printf "static binary: %s, %d bytes (%.2f MiB)\n", $$9, $$5, $$5/1048576 }'
	@if command -v qemu-aarch64 >/dev/null; then \
	  qemu-aarch64 $(ARM_BIN) --version && \
	  TUNNEL_ARM64_BIN=$(abspath $(ARM_BIN)) $(CARGO) test --test arm64 -- --nocapture; \
	fi

## interop: our binary against a webrtc-rs stand-in of the original client (tests/interop, its
## own workspace; builds the webrtc crate, several minutes the first time)
INTEROP_TARGET ?= $(abspath $(TARGET_DIR))/interop
interop:
	$(CARGO) build
	cd tests/interop && TUNNEL_BIN=$(abspath $(TARGET_DIR))/debug/tunnel \
	  CARGO_TARGET_DIR=$(INTEROP_TARGET) $(CARGO) test

clean:
	$(CARGO) clean
