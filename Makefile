# backdoor-vmm: the two commands a new user needs are `make demo` and `make test`.
# Everything is built by this file: Rust crates with cargo, guests with images/Makefile.

CARGO ?= cargo

.PHONY: all build guests demo test lint bench clean

all: build

build: guests
	$(CARGO) build --release --workspace

guests:
	$(MAKE) -s -C images all

# The Linux guest image from Debian packages: kernel, backdoor.ko, a busybox
# initramfs starting bdkv; prints the paths and command line (images/build-image.sh).
.PHONY: image
image:
	@./images/build-image.sh

# backdoor.ko with the kernel's extra warnings (W=1) against KDIR (default:
# the newest /usr/src/linux-headers-*-amd64); any compiler warning fails it.
KDIR ?= $(shell ls -dv /usr/src/linux-headers-*-amd64 2>/dev/null | tail -n 1)
.PHONY: module
module:
	@test -n "$(KDIR)" || { echo "module: no kernel headers: apt-get install linux-headers-amd64, or pass KDIR=" >&2; exit 1; }
	@$(MAKE) -s -C guest-driver KDIR=$(KDIR) clean
	@$(MAKE) -C guest-driver KDIR=$(KDIR) W=1 >guest-driver/build.log 2>&1 || { cat guest-driver/build.log; exit 1; }
	@cat guest-driver/build.log
	@! grep -q 'warning:' guest-driver/build.log || { echo "module: the build has warnings (W=1)" >&2; exit 1; }

# The main job on its embedded default (see README).
demo: build
	./demo.sh

# Style, lints, and every test. CI runs exactly this.
test: guests module
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p backdoor-agent -p bdvmm --features backdoor-agent/verbs,bdvmm/verbs --all-targets -- -D warnings
	$(CARGO) build -p bdvmm -p bdctl
	$(CARGO) test --workspace
	$(CARGO) test -p backdoor-agent --features verbs

# The benchmark suite (bench/): results/BENCHMARKS.md, results/benchmarks.json
# and results/plots/. `make bench QUICK=1` (or BDBENCH_QUICK=1): a quick run.
bench: guests
	$(CARGO) build --release -p bdvmm -p bdctl -p bdbench
	./target/release/bdbench $(if $(QUICK),--quick)

clean:
	$(MAKE) -s -C images clean
	$(CARGO) clean

# Reliability campaign (docs/RELIABILITY.md). `make fuzz FUZZ_SECONDS=60`:
# every fuzz target for FUZZ_SECONDS each (nightly; installs cargo-fuzz).
# `make faults FAULT_RUNS=20`: the fault matrix (tests/tests/faults.rs and
# monitor.rs) N times each, with a per-test summary.
# `make soak SOAK_SECONDS=600`: agent and monitor memory under load.
.PHONY: fuzz faults soak
fuzz:
	FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60) ./fuzz/run.sh
faults: guests
	./tests/repeat.sh faults $(or $(FAULT_RUNS),10); s=$$?; \
	./tests/repeat.sh monitor $(or $(FAULT_RUNS),10) && exit $$s
soak: guests
	$(CARGO) build -p bdvmm -p bdctl
	BDVMM_SOAK_SECONDS=$(or $(SOAK_SECONDS),600) $(CARGO) test -p bdvmm-tests --test load soak -- --nocapture
