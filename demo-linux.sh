#!/usr/bin/env bash
#
# The main story with real Linux guests (`make demo-linux`): Debian's
# kernel boots under bdvmm with backdoor.ko and the session server bdkv;
# bdctl watches it; the guest kernel hangs for real (every CPU spinning
# with interrupts off); bdctl reports it, extracts the sessions from the
# hung guest's memory with no guest CPU, and a second Linux guest adopts
# them with nothing lost.
#
# Linux needs hardware virtualization under /dev/kvm. Where the host has
# VMX or SVM this runs here; elsewhere (PVM, as on this project's build
# machines) it runs itself inside the lab's L1 VM (tests/lab/lab.sh),
# where it takes a few minutes because everything is emulated.
#
# Usage: demo-linux.sh [--here]   (--here: run the story on this host now)

set -euo pipefail

root=$(cd "$(dirname "$0")" && pwd)

if [[ ${1:-} != --here ]]; then
	if grep -qwE 'vmx|svm' /proc/cpuinfo; then
		(cd "$root" && cargo build -q --release -p bdvmm -p bdctl)
		exec "$0" --here
	fi
	echo "demo-linux: this host's KVM has no VMX/SVM: running the story inside the lab (tests/lab/lab.sh)"
	exec "$root/tests/lab/lab.sh" exec demo-linux 1500 "$root/demo-linux.sh" --here
fi

# In the lab, lab.sh built the binaries and the image on the host.
bin=$(dirname "${BDVMM_BIN:-$root/target/release/bdvmm}")
bdvmm=$bin/bdvmm
bdctl=$bin/bdctl
work=$(mktemp -d)
pids=()
cleanup() {
	exec 7>&- 8>&- 2>/dev/null || true
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
say() { printf '   %s\n' "$*"; }

wait_for() {
	local file=$1 pattern=$2 seconds=${3:-300}
	for _ in $(seq $((seconds * 10))); do
		grep -q -- "$pattern" "$file" 2>/dev/null && return 0
		sleep 0.1
	done
	echo "demo-linux: timed out waiting for '$pattern' in $file" >&2
	tail -n 40 "$file" >&2
	exit 1
}

# image ARGS: images/build-image.sh's KEY=VALUE lines (the lab built the
# image on the host already: then only the command line is asked for).
image() {
	if [[ -n ${BDVMM_IMAGE_MANIFEST:-} ]]; then
		grep -v '^CMDLINE=' "$BDVMM_IMAGE_MANIFEST"
		"$root/images/build-image.sh" "$@" --cmdline-only
	else
		"$root/images/build-image.sh" "$@" 2>/dev/null
	fi
}

field() { sed -n "s/^$1=//p" <<<"$2"; }

keys() {
	local r w
	r=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
	w=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
	printf 'read = "%s"\nrepair = "%s"\n' "$r" "$w" >"$work/keys.toml"
}

start_primary() {
	step "Boot Debian's kernel under bdvmm: backdoor.ko and the session server bdkv inside"
	"$bdvmm" agent --vmm-sock "$work/agent.sock" --listen 127.0.0.1:0 --keys "$work/keys.toml" \
		2>"$work/agent.log" &
	pids+=($!)
	wait_for "$work/agent.log" "monitors connect to" 30
	agent=$(sed -n 's/.*monitors connect to \([^;]*\);.*/\1/p' "$work/agent.log")
	local img
	img=$(image --role primary --sessions 3)
	release=$(field KERNEL_RELEASE "$img")
	kernel=$(field KERNEL "$img")
	initrd=$(field INITRD "$img")
	mkfifo "$work/kv1.in"
	"$bdvmm" run --kernel "$kernel" --initrd "$initrd" --cmdline "$(field CMDLINE "$img")" \
		--mem 1G --vcpus 2 --name kv1 --agent-sock "$work/agent.sock" \
		--console-log "$work/kv1.log" <"$work/kv1.in" >/dev/null 2>"$work/kv1.err" &
	pids+=($!)
	exec 7>"$work/kv1.in" # the guest's serial console
	say "kernel $release, 1 GiB, 2 vCPUs; its backdoor is served by a separate agent process"
	wait_for "$work/kv1.log" "BDIMG: module loaded"
	say "guest: $(grep -a -m1 'smpboot: Total of' "$work/kv1.log" | sed 's/^\[[^]]*\] //')"
	say "guest: $(grep -a -m1 'backdoor: device at' "$work/kv1.log" | sed 's/^\[[^]]*\] //')"
	wait_for "$work/kv1.log" "BDIMG: sessions ready"
	grep -a 'BDIMG: session ' "$work/kv1.log" | sed 's/^BDIMG: /   guest: bdkv /'
	wait_for "$work/kv1.log" "BDIMG: waiting for commands"
	step "What a monitor on another host sees through the backdoor (bdctl status)"
	"$bdctl" status "kv1@$agent" --key-file "$work/keys.toml" | sed 's/^/   /'
}

watch_and_hang() {
	step "Watch it (bdctl watch), then hang the guest's kernel: every CPU spinning, interrupts off"
	"$bdctl" watch "kv1@$agent" --key-file "$work/keys.toml" --interval-ms 100 \
		--exit-on-hang --extract-on-hang "$work/extracted" >"$work/watch.log" 2>&1 &
	local watch=$!
	pids+=($watch)
	wait_for "$work/watch.log" "HEALTHY" 60
	sed 's/^/   /' "$work/watch.log"
	sleep 2
	say "typing 'hang-kernel' on the guest's serial console (backdoor.ko's test-only trigger)..."
	echo hang-kernel >&7
	wait "$watch" || true
	grep -v -e HEALTHY -e 'reading over' "$work/watch.log" | sed 's/^/   /'
	say "guest's last words: $(grep -a 'test-only hang trigger' "$work/kv1.log" | tail -n 1 | sed 's/^\[[^]]*\] //')"
}

show_extraction() {
	step "The sessions, extracted from the hung guest's memory without running it"
	extraction=$(ls "$work"/extracted/*.json)
	python3 - "$extraction" <<'EOF'
import json, sys
x = json.load(open(sys.argv[1]))
s = x["summary"]
print(f"   {x['vm']} generation {x['generation']}: {s['accepted']} records valid, {s['torn']} torn, {s['corrupt']} corrupt")
for z in x["sessions"]:
    if z["service"] == "bdkv":
        keys = z["payload_text"].splitlines()[1:]
        print(f"   session {z['session_id']}: version {z['version']}, {len(keys)} keys: {', '.join(keys)}")
EOF
}

resume_elsewhere() {
	step "A second Linux guest takes the sessions over (bdctl resume into its inbox)"
	local img expect
	expect=$(python3 - "$extraction" <<'EOF'
import json, sys
x = json.load(open(sys.argv[1]))
print(",".join(f"{z['session_id']}:{z['version']}:{len(z['payload_text'].splitlines()) - 1}"
               for z in x["sessions"] if z["service"] == "bdkv"))
EOF
	)
	img=$(image --role healthy --expect "$expect")
	"$bdvmm" run --kernel "$(field KERNEL "$img")" --initrd "$(field INITRD "$img")" \
		--cmdline "$(field CMDLINE "$img")" --mem 1G --name kv2 \
		--backdoor-listen 127.0.0.1:0 --backdoor-keys "$work/keys.toml" \
		--console-log "$work/kv2.log" </dev/null >/dev/null 2>"$work/kv2.err" &
	pids+=($!)
	wait_for "$work/kv2.err" "listening on" 60
	wait_for "$work/kv2.log" "BDIMG: healthy instance ready"
	local fresh
	fresh=$(sed -n 's/.*listening on \(.*\)$/\1/p' "$work/kv2.err")
	"$bdctl" resume "kv2@$fresh" --key-file "$work/keys.toml" --from "$extraction" \
		--service bdkv --hook inbox --slot-size 4096 | sed 's/^/   /'
	wait_for "$work/kv2.log" "BDIMG: all .* sessions adopted"
	grep -a 'BDIMG: adopted' "$work/kv2.log" | sed 's/^BDIMG: /   guest 2: /'
}

verify() {
	step "Nothing lost?"
	if grep -aq 'BDIMG: all .* sessions adopted with their contents' "$work/kv2.log" &&
		! grep -aq 'BDIMG: FAILED' "$work/kv2.log"; then
		say "nothing lost: every session answers in the second guest with its version and every key"
	else
		say "SESSIONS LOST"
		exit 1
	fi
}

for f in "$bdvmm" "$bdctl"; do
	[[ -x $f ]] || { echo "demo-linux: $f is missing (make demo-linux builds it)" >&2; exit 1; }
done
keys
start_primary
watch_and_hang
show_extraction
resume_elsewhere
verify
