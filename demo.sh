#!/usr/bin/env bash
# The main job, on its embedded default: a shop service (the test guest
# images/guests/svc.c) serves three sessions inside a VM under bdvmm, with
# progress counters and service continuations behind a sealed backdoor.
# A monitor watches it over the backdoor; the guest's kernel hangs with
# interrupts off; the monitor detects it, extracts the sessions from the
# hung guest (no guest CPU involved), and hands them to a fresh instance,
# which resumes every session where it stopped: nothing lost.
# Run it with `make demo` (which builds everything first).
set -euo pipefail

root=$(cd "$(dirname "$0")" && pwd)
bdvmm="$root/target/release/bdvmm"
bdctl="$root/target/release/bdctl"
svc="$root/images/build/svc.elf"
work=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }

require() {
	for f in "$bdvmm" "$bdctl" "$svc"; do
		[ -e "$f" ] || { echo "demo: $f is missing; run 'make demo' (it builds first)" >&2; exit 1; }
	done
}

# Waits until FILE contains PATTERN (at most 60 s).
wait_for() {
	local file=$1 pattern=$2
	for _ in $(seq 600); do
		grep -q -- "$pattern" "$file" 2>/dev/null && return 0
		sleep 0.1
	done
	echo "demo: timed out waiting for '$pattern' in $file" >&2
	cat "$file" >&2
	exit 1
}

keys() {
	local r w
	r=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
	w=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
	printf 'read = "%s"\nrepair = "%s"\n' "$r" "$w" >"$work/keys.toml"
}

start_shop() {
	step "Start the shop service in a VM; its backdoor is served by a separate agent process"
	"$bdvmm" agent --vmm-sock "$work/agent.sock" --listen 127.0.0.1:0 --keys "$work/keys.toml" \
		2>"$work/agent.log" &
	pids+=($!)
	wait_for "$work/agent.log" "monitors connect to"
	agent=$(sed -n 's/.*monitors connect to \([^;]*\);.*/\1/p' "$work/agent.log")
	"$bdvmm" run --test-guest "$svc" --ring 0 --mem 64M --name shop1 \
		--agent-sock "$work/agent.sock" --console-log "$work/shop1.log" >/dev/null 2>"$work/shop1.err" &
	pids+=($!)
	wait_for "$work/shop1.log" "serving sessions"
	say "guest: $(grep -m1 'serving sessions' "$work/shop1.log")"
	sleep 1
	step "What a monitor on another host sees through the backdoor (bdctl status)"
	"$bdctl" status "shop1@$agent" --key-file "$work/keys.toml" | sed 's/^/   /'
}

watch_and_hang() {
	step "Watch it (bdctl watch), then hang the guest's kernel: interrupts off, spinning"
	"$bdctl" watch "shop1@$agent" --key-file "$work/keys.toml" --interval-ms 100 \
		--exit-on-hang --extract-on-hang "$work/extracted" >"$work/watch.log" 2>&1 &
	local watch=$!
	pids+=($watch)
	wait_for "$work/watch.log" "HEALTHY"
	sed 's/^/   /' "$work/watch.log"
	sleep 1
	say "injecting the fault (a repair write to the guest's control word)..."
	"$bdctl" write "shop1@$agent" --key-file "$work/keys.toml" control 0 0100000000000000 >/dev/null
	wait "$watch" || true
	grep -v -e HEALTHY -e 'reading over' "$work/watch.log" | sed 's/^/   /'
	say "guest's last words: $(tail -n 1 "$work/shop1.log")"
}

show_extraction() {
	step "The sessions, extracted from the hung guest without running it"
	extraction=$(ls "$work"/extracted/*.json)
	python3 - "$extraction" <<'EOF'
import json, sys
x = json.load(open(sys.argv[1]))
s = x["summary"]
print(f"   {x['vm']} generation {x['generation']}: {s['accepted']} records valid, {s['torn']} torn, {s['corrupt']} corrupt")
for z in x["sessions"]:
    print(f"   session {z['session_id']}: stage {z['stage']:>3}  {z['payload_text']}")
EOF
}

resume_elsewhere() {
	step "A fresh instance takes the sessions over (bdctl resume)"
	"$bdvmm" run --test-guest "$svc" --ring 0 --mem 64M --vcpus 2 --name shop2 \
		--backdoor-listen 127.0.0.1:0 --backdoor-keys "$work/keys.toml" \
		--console-log "$work/shop2.log" >/dev/null 2>"$work/shop2.err" &
	pids+=($!)
	wait_for "$work/shop2.err" "listening on"
	wait_for "$work/shop2.log" "fresh instance"
	local fresh
	fresh=$(sed -n 's/.*listening on \(.*\)$/\1/p' "$work/shop2.err")
	"$bdctl" resume "shop2@$fresh" --key-file "$work/keys.toml" --from "$extraction" | sed 's/^/   /'
	wait_for "$work/shop2.log" "resumed session 3"
	sleep 2
	grep -E "resumed|stage" "$work/shop2.log" | head -n 12 | sed 's/^/   guest: /'
}

verify() {
	step "Nothing lost?"
	python3 - "$extraction" "$work/shop2.log" <<'EOF'
import json, re, sys
x = json.load(open(sys.argv[1]))
log = open(sys.argv[2]).read()
ok = True
for z in x["sessions"]:
    m = re.search(rf"resumed session {z['session_id']} at stage (\d+) total (\d+)", log)
    if not m or int(m.group(1)) != z["stage"]:
        ok = False
        print(f"   session {z['session_id']}: NOT resumed at stage {z['stage']}")
        continue
    later = [int(s) for s in re.findall(rf"session {z['session_id']} stage (\d+)", log)]
    print(f"   session {z['session_id']}: resumed at stage {z['stage']}, now at stage {max(later + [z['stage']])}")
print("   nothing lost: every session continued from exactly where the hung guest left it" if ok else "   SESSIONS LOST")
sys.exit(0 if ok else 1)
EOF
}

main() {
	require
	keys
	start_shop
	watch_and_hang
	show_extraction
	resume_elsewhere
	verify
	step "Done. 'make test' runs the test suite; 'make bench' the benchmarks."
}

main "$@"
