# backdoor-vmm: the two commands a new user needs are `make demo` and `make test`.
# Everything is built by this file: Rust crates with cargo, guests with images/Makefile.

CARGO ?= cargo

.PHONY: all build guests demo test lint bench clean

all: build

build: guests
	$(CARGO) build --release --workspace

guests:
	$(MAKE) -s -C images all

# The main job on its embedded default (see README).
demo: build
	./demo.sh

# Style, lints, and every test. CI runs exactly this.
test: guests
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
