#!/usr/bin/env bash
#
# `make test`'s test run: every cargo test suite on this host (all of them,
# even after a failure), then the lab for what this host cannot run itself
# (tests/lab/lab.sh --needed), then one summary: suites and tests passed,
# failed, and skipped with their reasons.
#
# Usage: tests/run.sh
#
# Tests that need VMX/SVM or an RDMA device this host lacks are skipped on
# the host by name (tests/lab/tests.list) and run in the lab instead.
# BDVMM_REQUIRE_LAB=1 (set by .ci/run) turns any SKIP into a failure.
# Logs: target/test-logs/.

set -uo pipefail

cd "$(dirname "$0")/.."
readonly LOGS=target/test-logs
rm -rf "$LOGS"
mkdir -p "$LOGS"

failed_suites=0
declare -a notes=()

# run NAME COMMAND...: one cargo test invocation, output kept in the log.
run() {
	local name=$1 status
	shift
	echo "== $name: $*"
	"$@" 2>&1 | tee "$LOGS/$name.log"
	status=${PIPESTATUS[0]}
	if ((status != 0)); then
		failed_suites=$((failed_suites + 1))
		notes+=("$name exited with status $status")
	fi
}

# Tests that skip say so in this file (libtest shows no output of a passing test).
export BDVMM_SKIP_LOG=$PWD/$LOGS/skips.txt

# shellcheck disable=SC2207 # one word per --skip argument
skips=($(tests/lab/lab.sh host-skips))

run workspace cargo test --workspace --no-fail-fast -- "${skips[@]}"
run verbs cargo test -p backdoor-proto -p backdoor-agent --features backdoor-proto/verbs,backdoor-agent/verbs --no-fail-fast -- "${skips[@]}"

lab_status=0
echo "== lab: tests/lab/lab.sh --needed"
tests/lab/lab.sh --needed 2>&1 | tee "$LOGS/lab.log"
lab_status=${PIPESTATUS[0]}

# The summary: libtest's "test result:" lines of every suite, the SKIP
# lines tests print, and the lab's PASS/FAIL lines.
python3 - "$LOGS" "$failed_suites" "$lab_status" "${#skips[@]}" "${notes[@]}" <<'EOF'
import glob, os, re, sys

logs, failed_suites, lab_status, skip_args = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
notes = sys.argv[5:]
suites = passed = failed = ignored = 0
skips = []
failed_names = []
for path in sorted(glob.glob(os.path.join(logs, "*.log"))):
    if path.endswith("lab.log"):
        continue
    text = open(path, errors="replace").read()
    failed_names += re.findall(r"^test (\S+) \.\.\. FAILED$", text, re.M)
    for m in re.finditer(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text, re.M):
        suites += 1
        passed += int(m.group(1))
        failed += int(m.group(2))
        ignored += int(m.group(3))
skip_log = os.path.join(logs, "skips.txt")
if os.path.exists(skip_log):
    skips = sorted(set(re.findall(r"^SKIP: (.*)$", open(skip_log, errors="replace").read(), re.M)))
lab = open(os.path.join(logs, "lab.log"), errors="replace").read() if os.path.exists(os.path.join(logs, "lab.log")) else ""
lab_pass = len(re.findall(r"^lab\.sh: PASS ", lab, re.M))
lab_fail = len(re.findall(r"^lab\.sh: FAIL ", lab, re.M))
# lab.sh's own totals count what no PASS/FAIL line shows (an entry L1 kept
# dying during, entries never run) and the passes on a second try.
totals = re.findall(r"^lab\.sh: lab: (\d+) passed(?: \((\d+) on a second try\))?, (\d+) failed", lab, re.M)
second = 0
if totals:
    lab_pass, second, lab_fail = int(totals[-1][0]), int(totals[-1][1] or 0), int(totals[-1][2])
nothing = "nothing to run in the lab" in lab
print()
print("== summary")
for s in skips:
    print(f"   SKIP {s}")
for n in notes:
    print(f"   {n}")
for n in failed_names:
    print(f"   FAILED {n}")
line = f"host: {suites} suites, {passed} passed, {failed} failed, {ignored} ignored, {len(skips)} skipped"
if skip_args:
    line += f" ({skip_args // 2} lab-only tests left to the lab)"
print(line)
if nothing:
    print("lab: not needed (this host runs every test itself)")
else:
    print(f"lab: {lab_pass} passed" + (f" ({second} on a second try)" if second else "") + f", {lab_fail} failed" + ("" if lab_status == 0 else f" (lab.sh exit status {lab_status})"))
ok = failed_suites == 0 and failed == 0 and lab_status == 0
print("RESULT:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
