#!/usr/bin/env bash
# The main job on its embedded default: boots the project's own test guests
# under bdvmm and shows what the VMM gives the rest of backdoor-vmm:
# guests in ring 3 and ring 0, several vCPUs, a guest that dies (reported,
# not hidden), and a live guest paused and resumed over the control socket
# while its exit counters show that pausing costs it nothing.
# Run it with `make demo` (which builds everything first).
set -euo pipefail

root=$(cd "$(dirname "$0")" && pwd)
bdvmm="$root/target/release/bdvmm"
guests="$root/images/build"
work=$(mktemp -d)
trap 'kill "${vm_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ctl() { "$bdvmm" ctl --api-sock "$work/api.sock" "$1"; }
require() {
	[ -x "$bdvmm" ] || { echo "demo: $bdvmm is missing; run 'make demo' (it builds first)" >&2; exit 1; }
	[ -f "$guests/hello.elf" ] || { echo "demo: test guests are missing; run 'make demo'" >&2; exit 1; }
}

demo_boot() {
	step "A test guest in ring 3 (native speed on this host), then the same guest in ring 0"
	"$bdvmm" run --test-guest "$guests/hello.elf" --ring 3 --mem 64M
	"$bdvmm" run --test-guest "$guests/hello.elf" --ring 0 --mem 64M
	step "Four vCPUs, one host thread each, all reporting in"
	"$bdvmm" run --test-guest "$guests/smp.elf" --ring 3 --vcpus 4 --mem 64M
}

demo_failure() {
	step "A guest that triple-faults: bdvmm says so, dumps registers, exits 11"
	local rc=0
	"$bdvmm" run --test-guest "$guests/triple_fault.elf" --ring 3 --mem 64M 2>"$work/fault.txt" || rc=$?
	head -n 1 "$work/fault.txt"
	grep -E '^(RIP|CR0)' "$work/fault.txt"
	echo "exit status: $rc"
}

demo_control() {
	step "A live guest on two vCPUs, controlled through its socket"
	"$bdvmm" run --test-guest "$guests/ticker.elf" --ring 3 --vcpus 2 --mem 64M \
		--api-sock "$work/api.sock" --console-log "$work/console.log" >/dev/null &
	vm_pid=$!
	sleep 0.5
	echo "console so far: $(tail -n 1 "$work/console.log")"
	echo "pause  -> $(ctl pause)"
	local before after
	before=$(wc -l <"$work/console.log")
	sleep 1
	after=$(wc -l <"$work/console.log")
	echo "ticks printed during one paused second: $((after - before))"
	echo "resume -> $(ctl resume)"
	sleep 0.5
	echo "console now: $(tail -n 1 "$work/console.log")"
	echo "exit counts (one port write per console byte, plus bdvmm's pause kicks):"
	ctl exits
	echo "stop   -> $(ctl stop)"
	wait "$vm_pid"
	echo "bdvmm exited with status $?"
	vm_pid=
}

main() {
	require
	demo_boot
	demo_failure
	demo_control
	step "Done. Next: 'make test' runs the test suite."
}

main "$@"
