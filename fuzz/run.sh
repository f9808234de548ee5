#!/bin/sh
# Runs every fuzz target (or those named) for FUZZ_SECONDS each and prints
# one summary line per target: executions, seconds, corpus size, crashes.
# Installs cargo-fuzz if missing; needs a nightly toolchain (cargo +nightly).
# A crash stops that target and leaves its input in artifacts/<target>/;
# replay it with `cargo +nightly fuzz run <target> <file>`.
set -eu
cd "$(dirname "$0")"
SECONDS_EACH=${FUZZ_SECONDS:-60}
TARGETS=${FUZZ_TARGETS:-"wire_server wire_client device_mmio records extract kernel_log"}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
python3 seeds/make_seeds.py
cargo +nightly fuzz build -O
mkdir -p logs
status=0
for t in $TARGETS; do
	mkdir -p "corpus/$t" "artifacts/$t"
	if cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
		-max_total_time="$SECONDS_EACH" -print_final_stats=1 -rss_limit_mb=2048 \
		>"logs/$t.log" 2>&1; then
		outcome=ok
	else
		outcome=CRASH
		status=1
	fi
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -n 1)
	corpus=$(find "corpus/$t" -type f | wc -l)
	crashes=$(find "artifacts/$t" -type f | wc -l)
	printf '%-12s %s  executions=%s  seconds=%s  corpus=%s  artifacts=%s\n' \
		"$t" "$outcome" "${execs:-?}" "$SECONDS_EACH" "$corpus" "$crashes"
done
exit $status
