#!/bin/sh
# Runs one end-to-end test file RUNS times and prints, per test, how many
# runs passed and failed (the fault matrix's "how many times" in
# docs/RELIABILITY.md). Usage: tests/repeat.sh TESTFILE RUNS
# Exits 1 if any run of any test failed; failing runs' output is kept in
# target/repeat-TESTFILE/run-N.log.
set -eu
file=${1:?test file, e.g. faults}
runs=${2:-10}
cd "$(dirname "$0")/.."
logs=target/repeat-$file
rm -rf "$logs" && mkdir -p "$logs"
cargo build -q -p bdvmm -p bdctl
cargo test -q -p bdvmm-tests --test "$file" --no-run
i=1
while [ "$i" -le "$runs" ]; do
	cargo test -p bdvmm-tests --test "$file" -- --test-threads=2 >"$logs/run-$i.log" 2>&1 || true
	i=$((i + 1))
done
summary=$logs/summary.txt
status=0
grep -h -E '^test .* \.\.\. (ok|FAILED)$' "$logs"/run-*.log |
	awk -v runs="$runs" '{ name = $2; if ($NF == "ok") ok[name]++; else bad[name]++; seen[name] = 1 }
	END { for (n in seen) printf "%-90s %3d/%d passed, %d failed\n", n, ok[n], runs, bad[n] }' |
	sort >"$summary"
cat "$summary"
[ -s "$summary" ] || { echo "no test results: see $logs" >&2; status=1; }
! grep -q ' [1-9][0-9]* failed$' "$summary" || status=1
exit $status
