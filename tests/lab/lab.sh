#!/usr/bin/env bash
#
# The lab: the tests that need hardware virtualization (VMX/SVM) or an RDMA
# device, run inside a QEMU VM ("L1") whose software emulator (TCG) gives
# it nested AMD SVM, so /dev/kvm works inside it, and Soft-RoCE (rxe) on
# its virtio-net link. bdvmm runs inside L1 and boots real Linux guests
# ("L2"), bdctl reads over real verbs. docs/LAB.md tells the whole story.
#
# Usage: lab.sh [run] [--all|--needed] [--only REGEX] [--verbose]
#        lab.sh host-skips
#        lab.sh exec NAME TIMEOUT_S COMMAND...
#
#   run (default)  build what the tests need, boot L1, run the entries of
#                  tests/lab/tests.list inside it, one at a time; report
#                  each with its result and time; exit 1 if any failed
#     --all        every entry (the default; what `make lab` runs)
#     --needed     only the entries the host cannot run itself (what
#                  `make test` runs): none where the host has VMX/SVM and
#                  an RDMA device
#     --only RE    only the entries whose name (BINARY::TEST) matches RE
#     --verbose    stream every entry's output, not only a failing one's
#     --repeat N   run each entry N times (flakiness: each run is reported)
#   host-skips     print `--skip NAME` for each test this host cannot run
#                  (for cargo test on the host; lab.sh runs those)
#   exec           run one COMMAND inside L1 (cwd: the repository),
#                  streaming its output; exit with its status (make
#                  demo-linux and bdbench's lab section use this)
#
# Inputs, each cached and keyed by what goes into it, under
# ${BDVMM_CACHE_DIR:-~/.cache/backdoor-vmm}/lab/ and .../image/:
#   - L1's kernel and modules: Debian's linux-image-amd64, the same kernel
#     the guest image boots (images/build-image.sh downloads it);
#   - L1's initramfs: busybox (busybox-static) and the modules that mount
#     the host's root (9p, overlay), with tests/lab/l1-init as /init;
#   - L1's user space: the host's own root file system, read-only over
#     virtio-9p under a tmpfs overlay, so the tests find the tools the host
#     has installed (qemu is the only thing that runs on the host);
#   - the binaries: bdvmm and bdctl with the verbs backend, and the test
#     binaries, built into target/lab/ (cargo's own cache).
# The run directory target/lab/run/ (plan, env, logs, console.log) is
# shared with L1 read-write; results come back through it and the console.
#
# Environment: BDVMM_LAB_MEM (L1's RAM, default 6G), BDVMM_LAB_CPUS
# (default 2), BDVMM_LAB_ACCEL (default tcg,thread=multi; kvm where the
# host has hardware virtualization with nesting), BDVMM_LAB_TIMEOUT
# (seconds for the whole L1 run; default: the sum of the entries' bounds).

set -euo pipefail

readonly PROG=${0##*/}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
readonly HERE
ROOT=$(cd "$HERE/../.." && pwd -P)
readonly ROOT
readonly LIST=$HERE/tests.list
readonly TARGET=$ROOT/target/lab
readonly RUN=$TARGET/run

# shellcheck source=images/lib/debian.sh
. "$ROOT/images/lib/debian.sh"

usage() {
	sed -n '3,/^$/s/^# \{0,1\}//p' "$0" >&2
}

# Whether this host has what NEEDS (hw, rdma, -) names.
host_has() {
	case $1 in
	-) return 0 ;;
	hw) grep -qwE 'vmx|svm' /proc/cpuinfo ;;
	rdma) compgen -G '/sys/class/infiniband/*' >/dev/null ;;
	esac
}

# The entries of tests.list: "PACKAGE BINARY TEST NEEDS TIMEOUT" lines.
entries() {
	local pkg bin test needs timeout rest n=0

	while read -r pkg bin test needs timeout rest; do
		n=$((n + 1))
		[[ -n $pkg && $pkg != \#* ]] || continue
		[[ -n $timeout && -z $rest && $timeout =~ ^[0-9]+$ ]] ||
			die "tests.list line $n: want PACKAGE TEST-BINARY TEST NEEDS TIMEOUT_S"
		case $needs in
		- | hw | rdma) ;;
		*) die "tests.list line $n: NEEDS is hw, rdma or -, not '$needs'" ;;
		esac
		[[ $test != '*' || $needs == - ]] ||
			die "tests.list line $n: a * entry must have NEEDS -, so the host can skip its tests by name"
		echo "$pkg $bin $test $needs $timeout"
	done <"$LIST"
}

host_skips() {
	local pkg bin test needs timeout

	while read -r pkg bin test needs timeout; do
		host_has "$needs" || printf -- '--skip %s ' "$test"
	done < <(entries)
	echo
}

# Tools the lab needs on the host (L1 uses them too: it runs the host's
# user space). tools/deps.sh installs them all.
check_tools() {
	need_tools qemu-system-x86 qemu-system-x86_64
	need_tools python3 python3
	need_tools kmod modprobe depmod
	need_tools busybox-static busybox
	need_tools iproute2 rdma
	need_tools dkms dkms
	need_tools ibverbs-utils ibv_devinfo
	need_tools perftest ib_read_lat
	[[ -f /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so ]] ||
		compgen -G '/usr/lib/*/libibverbs/librxe-*.so' >/dev/null ||
		die "no Soft-RoCE provider for libibverbs: install the Debian package 'ibverbs-providers'"
	! readelf -lW "$(command -v busybox)" 2>/dev/null | grep -q 'program interpreter' ||
		die "$(command -v busybox) is not static: install the Debian package 'busybox-static'"
}

# Sets IMAGE_* from images/build-image.sh's KEY=VALUE lines (and keeps
# them in the run directory: the tests inside L1 read them from there).
build_image() {
	local out key value

	out=$("$ROOT/images/build-image.sh") || die "images/build-image.sh failed"
	printf '%s\n' "$out" >"$RUN/image.env"
	while IFS='=' read -r key value; do
		printf -v "IMAGE_$key" '%s' "$value"
	done <<<"$out"
	[[ -n ${IMAGE_MODULES:-} && -f $IMAGE_MODULES/modules.dep ]] ||
		die "images/build-image.sh gave no MODULES= tree with modules.dep"
}

# Sets L1_INITRD: busybox, the modules that mount the host's root, /init.
build_l1_initrd() {
	local cache busybox modroot mod path hash dir
	local -a files=() order=()

	cache=$(bd_cache_root)/lab
	mkdir -p "$cache"
	busybox=$(command -v busybox)
	modroot=${IMAGE_MODULES%/lib/modules/*}
	for mod in virtio_pci 9pnet_virtio 9p overlay; do
		while read -r _ path _; do
			[[ -n $path ]] || continue
			[[ " ${order[*]} " == *" ${path##*/} "* ]] && continue
			order+=("${path##*/}")
			files+=("$path")
		done < <(modprobe -d "$modroot" -S "$IMAGE_KERNEL_RELEASE" --show-depends "$mod" |
			grep '^insmod ')
	done
	((${#files[@]} > 0)) || die "no modules found for 9p and overlay in $IMAGE_MODULES"
	hash=$(cat "$HERE/l1-init" "$busybox" "${files[@]}" "$ROOT/images/tools/mkcpio.py" |
		sha256sum | cut -c1-16)
	L1_INITRD=$cache/l1-initrd-$IMAGE_KERNEL_RELEASE-$hash.cpio
	if [[ -f $L1_INITRD ]]; then
		log "using cached L1 initramfs ($hash)"
		touch "$L1_INITRD"
		return 0
	fi
	dir=$(mktemp -d)
	printf '%s\n' "${order[@]}" >"$dir/order"
	local -a args=(--init "$HERE/l1-init" --out "$L1_INITRD" --file "bin/busybox=$busybox"
		--file "modules/order=$dir/order")
	for path in "${files[@]}"; do
		args+=(--file "modules/${path##*/}=$path")
	done
	python3 "$ROOT/images/tools/mkcpio.py" "${args[@]}" || die "mkcpio.py failed"
	rm -rf "$dir"
	find "$cache" -maxdepth 1 -name 'l1-initrd-*' -mtime +7 -delete || true
	log "cached $L1_INITRD"
}

# Builds bdvmm and bdctl (verbs backend included) and the test binaries
# into target/lab; writes "PACKAGE BINARY EXECUTABLE MANIFEST_DIR" lines to
# $RUN/binaries.
build_binaries() {
	log "building bdvmm, bdctl and the test binaries (target/lab, with the verbs backend)"
	(cd "$ROOT" && cargo build -q --target-dir "$TARGET" -p bdvmm -p bdctl \
		--features bdvmm/verbs,bdctl/verbs) || die "cargo build failed"
	(cd "$ROOT" && cargo test -q --no-run --target-dir "$TARGET" -p bdvmm-tests -p backdoor-agent \
		--features backdoor-agent/verbs --message-format=json) |
		python3 -c '
import json, os, sys
# One line per integration-test executable: PACKAGE BINARY EXECUTABLE DIR.
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    target = m.get("target", {})
    if m.get("reason") != "compiler-artifact" or target.get("kind") != ["test"]:
        continue
    if not m.get("executable"):
        continue
    # "path+file:///dir/pkg#name@1.0", or "...#1.0" when name is the dir.
    url, _, tail = m["package_id"].partition("#")
    pkg = tail.split("@")[0] if "@" in tail else url.rstrip("/").rsplit("/", 1)[-1]
    print(pkg, target["name"], m["executable"], os.path.dirname(m["manifest_path"]))
' >"$RUN/binaries" || die "cargo test --no-run failed"
	[[ -s $RUN/binaries ]] || die "cargo test --no-run built no test binaries"
	make -s -C "$ROOT/images" all || die "building the test guests failed"
	# The Linux boot tests' own kernel download (cached), before L1 needs it.
	"$ROOT/images/fetch-debian-kernel.sh" --vmlinux >/dev/null || die "images/fetch-debian-kernel.sh failed"
}

# Writes $RUN/plan from the entries (all, or only those the host lacks
# NEEDS for) matching ONLY; sets PLAN_TIMEOUT.
write_plan() {
	local which=$1 only=$2 repeat=$3 pkg bin test needs timeout exe dir name t k tries
	local -a tests

	: >"$RUN/plan"
	PLAN_TIMEOUT=0
	while read -r pkg bin test needs timeout; do
		[[ $which == all ]] || ! host_has "$needs" || continue
		[[ -z $only || $test == '*' || $bin::$test =~ $only ]] || continue
		exe='' dir=''
		read -r exe dir < <(awk -v p="$pkg" -v b="$bin" '$1 == p && $2 == b { print $3, $4 }' \
			"$RUN/binaries") || true
		[[ -n $exe ]] || die "tests.list: no test binary $bin in package $pkg"
		mapfile -t tests < <("$exe" --list --format terse 2>/dev/null | sed -n 's/: test$//p')
		if [[ $test == '*' ]]; then
			((${#tests[@]} > 0)) || die "$pkg $bin has no tests"
		else
			[[ " ${tests[*]} " == *" $test "* ]] ||
				die "tests.list names '$test', which $pkg's $bin does not have"
			tests=("$test")
		fi
		for t in "${tests[@]}"; do
			name=$bin::$t
			[[ -z $only || $name =~ $only ]] || continue
			# A test that boots Linux as an L2 guest gets a second try:
			# the emulator's nested SVM fails such a boot now and then
			# (docs/LAB.md); the first try's output is shown either way.
			tries=1
			[[ $needs == hw ]] && tries=2
			for ((k = 1; k <= repeat; k++)); do
				((repeat == 1)) || name=$bin::$t#$k
				printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$timeout" "$tries" "$dir" \
					"$exe --exact $t --nocapture --test-threads=1" >>"$RUN/plan"
				PLAN_TIMEOUT=$((PLAN_TIMEOUT + tries * timeout))
			done
		done
	done < <(entries)
}

# $RUN/bin/bdvmm runs target/lab/debug/bdvmm with all its threads on one
# of L1's CPUs, the next one for each VM (so that two VMs do not share a
# CPU), and bdctl sits beside it (the tests find it there).
#
# Why: under QEMU's software emulator, interrupts that one L1 CPU sends to
# the other while that one runs a nested guest seem to get lost now and
# then. With a VM's vCPU threads spread over both L1 CPUs, two-vCPU Linux
# boots failed often (an RCU stall naming a "timer handling issue" on the
# second vCPU, a triple fault in early boot); with each VM on one L1 CPU
# they stopped failing. L1's own kernel still panics, rarely, either way
# (boot_l1 then starts a fresh L1). KVM and bdvmm behave the same wherever
# the threads run: this is the emulator's doing (docs/LAB.md, with counts).
write_wrappers() {
	mkdir -p "$RUN/bin"
	{
		echo '#!/bin/sh'
		echo '# VMs take L1s CPUs in turn (tests/lab/lab.sh, write_wrappers).'
		echo 'cpu=$(flock /run/bdvmm-cpu.lock sh -c '"'"'n=$(cat /run/bdvmm-cpu 2>/dev/null || echo 0); echo $(((n + 1) % $(nproc))) >/run/bdvmm-cpu; echo $n'"'"')'
		printf 'exec taskset -c "$cpu" %q "$@"\n' "$TARGET/debug/bdvmm"
	} >"$RUN/bin/bdvmm"
	chmod +x "$RUN/bin/bdvmm"
	ln -sf "$TARGET/debug/bdctl" "$RUN/bin/bdctl"
}

write_env() {
	local k

	{
		for k in BDVMM_LAB_KERNEL_RELEASE BDVMM_LAB_MODULES BDVMM_LAB_KDIR BDVMM_BIN BDVMM_CACHE_DIR \
			BDVMM_IMAGE_MANIFEST HOME CARGO_HOME RUSTUP_HOME; do
			[[ -n ${!k:-} ]] && printf 'export %s=%q\n' "$k" "${!k}"
		done
		echo 'export BDVMM_IN_LAB=1 BDVMM_REQUIRE_LAB=1 BDVMM_RDMA_DEVICE=rxe0 RUST_BACKTRACE=1'
	} >"$RUN/env"
}

# Boots L1 and follows its console; prints a line per finished entry and,
# for a failed one, its output. Returns 1 if an entry failed, or L1 did not
# get through the plan.
#
# If L1 itself dies (its kernel panics: the emulator's doing, docs/LAB.md),
# a fresh L1 goes on with the entries left, the interrupted one first, up
# to twice; interrupted three times, it fails. At most six L1 boots per run.
boot_l1() {
	local verbose=$1 stream=$2 timeout_s=$3 name ok=0 failed=0 boots=0 start=$SECONDS
	local on_second_try=0
	local -a failures=()
	local -A finished=() retried=() second_try=()

	cp "$RUN/plan" "$RUN/plan.all"
	while :; do
		awk -F '\t' 'NR == FNR { done[$1] = 1; next } !($1 in done)' \
			<(printf '%s\n' "${!finished[@]}") "$RUN/plan.all" >"$RUN/plan"
		[[ -s $RUN/plan ]] || break
		if ((boots == 6)); then
			log "L1 died five times: giving up on $(wc -l <"$RUN/plan") entries"
			while IFS=$'\t' read -r name _; do failures+=("$name (not run)"); done <"$RUN/plan"
			failed=$((failed + $(wc -l <"$RUN/plan")))
			break
		fi
		boots=$((boots + 1))
		one_boot "$verbose" "$stream" "$timeout_s" "$boots"
		((L1_DONE)) && break
		if ((L1_FATAL)); then
			# Set-up failed: another boot would fail the same way.
			while IFS=$'\t' read -r name _; do failures+=("$name (not run)"); done <"$RUN/plan"
			failed=$((failed + $(wc -l <"$RUN/plan")))
			break
		fi
		# L1 died. The entry it was running gets up to two more tries, each
		# in a fresh L1.
		if [[ -n $L1_CURRENT ]]; then
			retried[$L1_CURRENT]=$((${retried[$L1_CURRENT]:-0} + 1))
			if ((${retried[$L1_CURRENT]} == 3)); then
				finished[$L1_CURRENT]=1
				failed=$((failed + 1))
				failures+=("$L1_CURRENT (L1 died during it three times)")
				printf '%s: FAIL %-100s (L1 died during it three times)\n' "$PROG" "$L1_CURRENT"
			else
				mv "$RUN/logs/$L1_CURRENT.log" "$RUN/logs/$L1_CURRENT.l1-died-${retried[$L1_CURRENT]}.log" 2>/dev/null || true
				log "running $L1_CURRENT again in a fresh L1 (its output so far: logs/$L1_CURRENT.l1-died-${retried[$L1_CURRENT]}.log)"
			fi
		fi
	done
	log "lab: $ok passed$( ((on_second_try == 0)) || echo " ($on_second_try on a second try)"), $failed failed, in $((SECONDS - start)) s ($boots L1 boot$( ((boots == 1)) || echo s))"
	((${#failures[@]} == 0)) || log "failed: ${failures[*]}"
	((failed == 0))
}

# One L1 boot over $RUN/plan. Updates ok, failed, failures and finished
# (the caller's); sets L1_DONE (it got through the plan) and L1_CURRENT
# (the entry it was running when it died).
one_boot() {
	local verbose=$1 stream=$2 timeout_s=$3 n=$4 accel cmdline line name rc secs log
	local ready=0 boot_start=$SECONDS
	local -a qemu

	L1_DONE=0 L1_FATAL=0 L1_CURRENT=''
	accel=${BDVMM_LAB_ACCEL:-tcg,thread=multi}
	cmdline="console=ttyS0 quiet loglevel=3 mitigations=off panic=-1 lab.run=$RUN"
	cmdline+=" lab.script=$HERE/l1-run.sh"
	qemu=(qemu-system-x86_64 -accel "$accel" -cpu "${BDVMM_LAB_CPU:-max}" -smp "${BDVMM_LAB_CPUS:-2}"
		-m "${BDVMM_LAB_MEM:-6G}" -nodefaults -display none -no-reboot -serial stdio
		-monitor "unix:$RUN/monitor.sock,server=on,wait=off"
		-kernel "$IMAGE_KERNEL" -initrd "$L1_INITRD" -append "$cmdline"
		-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
		-virtfs "local,path=$RUN,mount_tag=labrun,security_model=none"
		-netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile=)
	log "booting L1 (${accel%%,*}, ${BDVMM_LAB_CPUS:-2} vCPUs, ${BDVMM_LAB_MEM:-6G}; console: $RUN/console.log)"
	echo "=== L1 boot $n" >>"$RUN/console.log"
	while IFS= read -r line; do
		line=${line%$'\r'}
		printf '%s\n' "$line" >>"$RUN/console.log"
		[[ $line == @@LAB\ * ]] || continue
		line=${line#@@LAB }
		case $line in
		ready\ *)
			ready=1
			log "L1 up after $((SECONDS - boot_start)) s: ${line#ready }"
			;;
		start\ *)
			L1_CURRENT=${line#start }
			((stream)) && log "--- $L1_CURRENT"
			;;
		out\ *)
			((verbose || stream)) && printf '%s\n' "${line#out "$L1_CURRENT" }"
			;;
		retry\ *)
			read -r _ name rc secs <<<"$line"
			second_try[$name]=1
			printf '%s: RETRY %-99s %7s s (exit status %s; its output: logs/%s.first.log)\n' \
				"$PROG" "$name" "$secs" "$rc" "$name"
			if ((!verbose && !stream)); then
				sed "s/^/    | /" "$RUN/logs/$name.first.log" | tail -n 150
			fi
			;;
		end\ *)
			read -r _ name rc secs <<<"$line"
			log=$RUN/logs/$name.log
			finished[$name]=1
			if entry_passed "$name" "$rc" "$log" "$stream"; then
				ok=$((ok + 1))
				if [[ -n ${second_try[$name]:-} ]]; then
					on_second_try=$((on_second_try + 1))
					printf '%s: PASS %-100s %7s s (second try)\n' "$PROG" "$name" "$secs"
				else
					printf '%s: PASS %-100s %7s s\n' "$PROG" "$name" "$secs"
				fi
			else
				failed=$((failed + 1))
				failures+=("$name")
				printf '%s: FAIL %-100s %7s s (exit status %s)\n' "$PROG" "$name" "$secs" "$rc"
				if ((!verbose && !stream)); then
					sed "s/^/    | /" "$log" | tail -n 150
				fi
			fi
			L1_CURRENT=
			;;
		done)
			L1_DONE=1
			;;
		fatal\ *)
			L1_FATAL=1
			log "L1 set-up failed: ${line#fatal }"
			;;
		alive\ *)
			((verbose)) && log "L1 ${line}"
			;;
		esac
	done < <(timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null 2>&1)
	((L1_DONE)) && return 0
	((ready)) || log "L1 never became ready; its console: $RUN/console.log"
	if awk -v n="=== L1 boot $n" '$0 == n { on = 1 } on && /Kernel panic/ { found = 1 } END { exit !found }' \
		"$RUN/console.log"; then
		log "L1's kernel panicked after $((SECONDS - boot_start)) s${L1_CURRENT:+, during $L1_CURRENT} (the emulator's doing: docs/LAB.md); console: $RUN/console.log"
	else
		log "L1 stopped after $((SECONDS - boot_start)) s${L1_CURRENT:+, during $L1_CURRENT} (timeout $timeout_s s); console: $RUN/console.log"
	fi
}

# Whether entry NAME passed: exit status 0 and, for a test, libtest saying
# exactly one test passed and no SKIP line (a skip is no pass in the lab).
entry_passed() {
	local name=$1 rc=$2 log=$3 stream=$4

	((rc == 0)) || return 1
	((stream)) && return 0
	grep -q '^test result: ok\. 1 passed; 0 failed' "$log" || return 1
	! grep -q '^SKIP' "$log"
}

main() {
	local cmd=run which=all only='' verbose=0 stream=0 name timeout_s repeat=1

	if (($# > 0)) && [[ $1 != -* ]]; then
		cmd=$1
		shift
	fi
	case $cmd in
	host-skips)
		host_skips
		return 0
		;;
	exec)
		(($# >= 3)) || die "exec wants NAME TIMEOUT_S COMMAND..."
		name=$1 timeout_s=$2
		shift 2
		stream=1
		;;
	run)
		while (($# > 0)); do
			case $1 in
			--all) which=all ;;
			--needed) which=needed ;;
			--only)
				(($# >= 2)) || die "--only needs a regular expression"
				only=$2
				shift
				;;
			--verbose) verbose=1 ;;
			--repeat)
				[[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--repeat needs a count"
				repeat=$2
				shift
				;;
			-h | --help)
				usage
				return 0
				;;
			*)
				usage
				die "unexpected argument '$1'"
				;;
			esac
			shift
		done
		;;
	-h | --help)
		usage
		return 0
		;;
	*)
		usage
		die "unknown command '$cmd'"
		;;
	esac

	check_tools
	mkdir -p "$TARGET"
	rm -rf "$RUN"
	mkdir -p "$RUN/logs"
	build_image
	build_l1_initrd
	build_binaries
	if ((stream)); then
		printf '%s\t%s\t1\t%s\t%s\n' "$name" "$timeout_s" "$ROOT" "$(printf '%q ' "$@")" >"$RUN/plan"
		PLAN_TIMEOUT=$timeout_s
	else
		write_plan "$which" "$only" "$repeat"
		if [[ ! -s $RUN/plan ]]; then
			log "nothing to run in the lab: this host runs every test itself"
			return 0
		fi
		log "$(wc -l <"$RUN/plan") entries to run in L1"
	fi
	BDVMM_LAB_KERNEL_RELEASE=$IMAGE_KERNEL_RELEASE
	BDVMM_LAB_MODULES=$IMAGE_MODULES
	BDVMM_LAB_KDIR=$IMAGE_KDIR
	write_wrappers
	BDVMM_BIN=$RUN/bin/bdvmm
	BDVMM_CACHE_DIR=$(bd_cache_root)
	BDVMM_IMAGE_MANIFEST=$RUN/image.env
	write_env
	boot_l1 "$verbose" "$stream" "${BDVMM_LAB_TIMEOUT:-$((PLAN_TIMEOUT + 300))}"
}

main "$@"
