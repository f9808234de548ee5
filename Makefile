# backdoor-vmm: the two commands a new user needs are `make demo` and `make test`.
# Everything is built by this file: Rust crates with cargo, guests with images/Makefile.

CARGO ?= cargo

.PHONY: all build guests demo test lint bench clean

all: build

# bdvmm's release binary links glibc statically (Firecracker ships static
# binaries too): without ld.so, libc.so and libgcc_s it keeps 0.7 MiB less
# resident beyond guest RAM (bdbench section 6). `cargo rustc` changes only
# its final link; the verbs build (target/lab) stays dynamic, as libibverbs
# loads its providers with dlopen.
BDVMM_STATIC = $(CARGO) rustc --release -p bdvmm --bin bdvmm -- -C target-feature=+crt-static

build: guests
	$(CARGO) build --release --workspace --exclude bdvmm
	$(BDVMM_STATIC)

guests:
	$(MAKE) -s -C images all

# The Linux guest image from Debian packages: kernel, backdoor.ko, a busybox
# initramfs starting bdkv; prints the paths and command line (images/build-image.sh).
.PHONY: image
image:
	@./images/build-image.sh

# backdoor.ko with the kernel's extra warnings (W=1) and sparse (C=1)
# against KDIR (default: the newest /usr/src/linux-headers-*-amd64); any
# compiler or sparse warning fails it.
KDIR ?= $(shell ls -dv /usr/src/linux-headers-*-amd64 2>/dev/null | tail -n 1)
.PHONY: module
module:
	@test -n "$(KDIR)" || { echo "module: no kernel headers: apt-get install linux-headers-amd64, or pass KDIR=" >&2; exit 1; }
	@$(MAKE) -s -C guest-driver KDIR=$(KDIR) clean
	@$(MAKE) -C guest-driver KDIR=$(KDIR) W=1 C=1 >guest-driver/build.log 2>&1 || { cat guest-driver/build.log; exit 1; }
	@cat guest-driver/build.log
	@! grep -q 'warning:' guest-driver/build.log || { echo "module: the build has warnings (W=1, sparse)" >&2; exit 1; }

# The kernel's style check on the driver (checkpatch.pl --strict).
.PHONY: checkpatch
checkpatch:
	@./tools/checkpatch.sh

# What the system must provide (tools/deps.sh): checked every time, and
# installed in one apt-get when run as root on Debian or Ubuntu.
.PHONY: deps-demo deps-test deps-lab
deps-demo:
	@./tools/deps.sh ensure demo
deps-test:
	@./tools/deps.sh ensure test lab

# The main job on its embedded default (see README).
demo: deps-demo build
	./demo.sh

# The same story with real Linux guests (backdoor.ko, bdkv), in the lab
# (tests/lab/lab.sh), or directly where the host has VMX/SVM.
.PHONY: demo-linux
demo-linux: deps-test guests
	./demo-linux.sh

# Style, lints, and every test: on this host, then in the lab whatever
# needs VMX/SVM or RDMA this host lacks. CI runs exactly this.
test: deps-test guests module checkpatch
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p backdoor-proto -p backdoor-agent -p bdvmm -p bdctl --features backdoor-agent/verbs,bdvmm/verbs,bdctl/verbs --all-targets -- -D warnings
	$(CARGO) build -p bdvmm -p bdctl
	./tests/run.sh

# Every lab test inside the lab, whatever the host has (tests/lab/tests.list).
.PHONY: lab
lab: deps-test guests
	./tests/lab/lab.sh --all

# The benchmark suite (bench/): results/BENCHMARKS.md, results/benchmarks.json
# and results/plots/. `make bench QUICK=1` (or BDBENCH_QUICK=1): a quick run.
# Section 7 (RDMA verbs) needs a device and section 10 (a Linux guest's hang
# detection) VMX or SVM: where the host lacks either, both run in the lab
# (tests/lab/lab.sh), with their report in results/lab/.
LAB_BENCH := target/lab/release
bench: guests
	$(CARGO) build --release -p bdctl -p bdbench
	$(BDVMM_STATIC)
	./target/release/bdbench $(if $(QUICK),--quick)
	@if ls /sys/class/infiniband/* >/dev/null 2>&1 && grep -qwE 'vmx|svm' /proc/cpuinfo; then :; else \
		$(CARGO) build -q --release --target-dir target/lab -p bdvmm -p bdctl -p bdbench \
			--features bdvmm/verbs,bdctl/verbs,bdbench/verbs && \
		./tests/lab/lab.sh exec bench-lab 1200 $(LAB_BENCH)/bdbench --only rdma,linux_detection \
			$(if $(QUICK),--quick) --out target/lab/run/bench && \
		mkdir -p results/lab && cp -r target/lab/run/bench/. results/lab/; fi

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
