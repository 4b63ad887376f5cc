# tunnel — every task is a make target. `make demo` runs the main job, `make test` the tests.
CARGO        ?= cargo
FUZZ_SECONDS ?= 60
MUSL_TARGET  := x86_64-unknown-linux-musl
TARGET_DIR   := $(or $(CARGO_TARGET_DIR),target)
BIN          := $(TARGET_DIR)/release/tunnel
STATIC_BIN   := $(TARGET_DIR)/$(MUSL_TARGET)/release/tunnel
STATIC_BENCH := $(TARGET_DIR)/$(MUSL_TARGET)/release/tunnel-bench

.PHONY: all build release test test-deps test-net lint fmt demo bench bench-wan fuzz static \
        static-arm64 static-armv7 static-mipsel build-arm64 build-armv7 build-mipsel dist interop \
        clean

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
# redis-server and haproxy run in tests/cluster.rs (`tunnel signal --cluster`).
AGENT_CLIENTS := $(TARGET_DIR)/tmp/agent-clients
test-deps:
	@python3 -c 'import httpx' 2>/dev/null || pip install -q httpx
	@command -v systemd-analyze >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; } || \
	  echo "*** systemd-analyze is missing: tests/release.rs checks the units' content only; \
	  install systemd (apt-get install systemd) to verify them too ***"
	@command -v redis-server >/dev/null && command -v haproxy >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server haproxy >/dev/null; } || \
	  echo "*** redis-server or haproxy is missing: tests/cluster.rs skips what needs them; \
	  install them (apt-get install redis-server haproxy) to run them ***"
	@test -d $(AGENT_CLIENTS)/node_modules/eventsource || \
	  (mkdir -p $(AGENT_CLIENTS) && npm install --silent --no-audit --no-fund --prefix $(AGENT_CLIENTS) eventsource@2)

## test-net: NAT traversal in network namespaces (root): two LANs behind Linux routers
## (iptables NAT and firewalls) and a public segment with `tunnel signal` and coturn; cone,
## no input firewall, symmetric (relayed), UDP blocked (TURN over TCP), 2 % loss, IPv6, and
## Chromium through TURN and behind mDNS; then tests/wan.rs on an emulated WAN path (a 3 s and
## a 30 s outage, SSE at 3 % loss, the consumer changing address mid-download). Cases run in parallel; NET_TEST_ARGS adds libtest
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
## musl binary that `make static` builds (the one routers and Pis run). The signal bench holds
## 100 000 WebSockets: it raises RLIMIT_NOFILE for itself and the server (root), or says so
## and holds what the limit allows
bench: static
	$(STATIC_BENCH) signal
	$(STATIC_BENCH) tunnel

## bench-wan: the tunnel next to plain TCP and the original (tests/interop's orig-client, a
## release build: several minutes the first time) on an emulated WAN path (tests/netbed/wan.rs;
## root): RTT 50 and 200 ms × loss 0 / 1 / 3 % at 100 Mbit/s; download and upload MB/s of
## 20 MiB, first SSE token, worst and p99 gap between tokens; about 7-9 minutes
bench-wan:
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "*** make bench-wan needs root (network namespaces, TUN devices): SKIPPED ***"; \
	  exit 0; \
	fi; \
	$(CARGO) test --release --test wan_bench --no-run || exit 1; \
	orig=$(INTEROP_TARGET)/release/orig-client; \
	(cd tests/interop && CARGO_TARGET_DIR=$(INTEROP_TARGET) $(CARGO) build --release --bin orig-client) || \
	  { echo "*** the original's stand-in did not build: its column stays empty ***"; orig=; }; \
	start=$$(date +%s); \
	ORIG_CLIENT=$$orig TUNNEL_WAN_BENCH=1 $(CARGO) test --release --test wan_bench; \
	status=$$?; echo "make bench-wan: $$(( $$(date +%s) - start )) s"; exit $$status

## fuzz: run each fuzz target (frame codec, HTTP/1.1 codec, TURN, RESP) for FUZZ_SECONDS (nightly +
## cargo-fuzz); new inputs go to target/fuzz-corpus, the committed seeds stay as they are
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	@rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
	@for t in frame http1 turn resp; do \
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

## Cross builds, cross-built with cargo-zigbuild (zig as the C compiler and linker):
## static-arm64: 64-bit ARM (Raspberry Pi 3/4/5 on a 64-bit OS, arm64 routers);
## static-armv7: 32-bit ARMv7 with hardware float (Pi 2/3/4 on 32-bit Raspberry Pi OS, ARM routers);
## static-mipsel: 32-bit little-endian MIPS (OpenWrt's ramips routers, e.g. MT7621).
## Each checks that it is a static binary, prints its size and, when qemu-user is installed, runs
## tests/cross.rs: the build under emulation serves a native proxy.
ARM64_TARGET := aarch64-unknown-linux-musl
ARMV7_TARGET := armv7-unknown-linux-musleabihf
MIPSEL_TARGET := mipsel-unknown-linux-musl

# $(call cross-build,TARGET,what `file` must say[,more RUSTFLAGS when the std is built from source])
# The target's standard library is rustup's prebuilt one where rustup has it; otherwise it is
# built from source by nightly's -Zbuild-std (the nightly toolchain and its rust-src component;
# always so for MIPS, a tier-3 target without a prebuilt one). rustc must then not add its own
# musl start files (crt1.o, …: they ship with the prebuilt library only), so
# -C link-self-contained=no leaves them and libc to zig.
define cross-build
	@command -v cargo-zigbuild >/dev/null || pip install -q ziglang cargo-zigbuild
	@if rustup target list --installed | grep -qx $(1) || rustup target add $(1) >/dev/null 2>&1; then \
	  echo "$(1): rustup's prebuilt standard library"; \
	  echo "$(CARGO) zigbuild --release --target $(1) --bin tunnel"; \
	  $(CARGO) zigbuild --release --target $(1) --bin tunnel; \
	elif { rustup toolchain list | grep -q '^nightly' || \
	       rustup toolchain install nightly --profile minimal >/dev/null 2>&1; } && \
	     { rustup component list --toolchain nightly --installed | grep -qx rust-src || \
	       rustup component add rust-src --toolchain nightly >/dev/null 2>&1; }; then \
	  echo "$(1): rustup has no prebuilt standard library for it here; building it from source" \
	    "(nightly -Zbuild-std)"; \
	  echo "RUSTFLAGS='-C link-self-contained=no $(3)' $(CARGO) +nightly zigbuild" \
	    "-Zbuild-std=std,panic_abort --release --target $(1) --bin tunnel"; \
	  RUSTFLAGS='-C link-self-contained=no $(3)' $(CARGO) +nightly zigbuild \
	    -Zbuild-std=std,panic_abort --release --target $(1) --bin tunnel; \
	else \
	  echo "$(1): rustup can install neither its standard library nor nightly's rust-src" && false; \
	fi
	@file $(TARGET_DIR)/$(1)/release/tunnel | grep -q '$(2).*static' || (echo "not a static $(1) binary" && false)
	@ls -l $(TARGET_DIR)/$(1)/release/tunnel | awk '{ printf "static binary: %s, %d bytes (%.2f MiB)\n", $$9, $$5, $$5/1048576 }'
endef

# $(call cross-test,TARGET,qemu-user emulator)
define cross-test
	@if command -v $(2) >/dev/null; then \
	  echo "TUNNEL_CROSS_BIN=... TUNNEL_CROSS_QEMU=$(2) $(CARGO) test --test cross"; \
	  TUNNEL_CROSS_BIN=$(abspath $(TARGET_DIR)/$(1)/release/tunnel) TUNNEL_CROSS_QEMU=$(2) \
	  TUNNEL_CROSS_TARGET=$(1) $(CARGO) test --test cross -- --nocapture; \
	else \
	  echo "*** $(2) is missing (apt-get install qemu-user): the $(1) build was not run ***"; \
	fi
endef

build-arm64:
	$(call cross-build,$(ARM64_TARGET),ARM aarch64)
build-armv7:
	$(call cross-build,$(ARMV7_TARGET),ARM.*EABI5)
static-arm64: build-arm64
	$(call cross-test,$(ARM64_TARGET),qemu-aarch64)
# MIPS as a static non-PIE executable: the static-pie one zig links by default crashes at its
# first socket work under qemu-mipsel.
build-mipsel:
	$(call cross-build,$(MIPSEL_TARGET),MIPS32,-C relocation-model=static)
static-armv7: build-armv7
	$(call cross-test,$(ARMV7_TARGET),qemu-arm)
static-mipsel: build-mipsel
	$(call cross-test,$(MIPSEL_TARGET),qemu-mipsel)

## dist: the stripped static binaries with their SHA-256 sums (NAME.sha256 each, and one
## SHA256SUMS) in $(TARGET_DIR)/dist: x86_64 and the cross builds named in DIST_CROSS
## (default arm64 armv7 mipsel)
VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
DIST       := $(TARGET_DIR)/dist
DIST_CROSS ?= arm64 armv7 mipsel
TRIPLE_arm64 := $(ARM64_TARGET)
TRIPLE_armv7 := $(ARMV7_TARGET)
TRIPLE_mipsel := $(MIPSEL_TARGET)
dist: static $(addprefix build-,$(DIST_CROSS))
	rm -rf $(DIST) && mkdir -p $(DIST)
	@for t in $(MUSL_TARGET) $(foreach c,$(DIST_CROSS),$(TRIPLE_$(c))); do \
	  cp $(TARGET_DIR)/$$t/release/tunnel $(DIST)/tunnel-$(VERSION)-$$t || exit 1; \
	  (cd $(DIST) && sha256sum tunnel-$(VERSION)-$$t > tunnel-$(VERSION)-$$t.sha256) || exit 1; \
	done
	cd $(DIST) && cat *.sha256 > SHA256SUMS && ls -l && cat SHA256SUMS

## interop: our binary against a webrtc-rs stand-in of the original client (tests/interop, its
## own workspace; builds the webrtc crate, several minutes the first time)
INTEROP_TARGET ?= $(abspath $(TARGET_DIR))/interop
interop:
	$(CARGO) build
	cd tests/interop && TUNNEL_BIN=$(abspath $(TARGET_DIR))/debug/tunnel \
	  CARGO_TARGET_DIR=$(INTEROP_TARGET) $(CARGO) test

clean:
	$(CARGO) clean
