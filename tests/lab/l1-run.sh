#!/bin/bash
# PID 1 of the lab's L1 VM (tests/lab/lab.sh), run from the host's root
# file system after l1-init's switch_root. Usage: l1-run.sh RUN_DIR
#
# Sets up what the tests need: KVM with nested SVM (kvm_amd nested=1), a
# Soft-RoCE device (rdma_rxe on the virtio-net link), the guest kernel's
# modules and headers (for dkms); then runs RUN_DIR/plan, one entry at a
# time, and powers off. Everything it has to say goes to the console
# (ttyS0) as "@@LAB" lines, which lab.sh reads as they come:
#
#   @@LAB ready kvm=<yes|no> rdma=<device|none: why>
#   @@LAB start NAME
#   @@LAB out NAME TEXT         one line of the entry's output
#   @@LAB retry NAME RC SECONDS its first try failed; it runs once more
#   @@LAB end NAME RC SECONDS   its exit status (124: timed out)
#   @@LAB done
#   @@LAB fatal TEXT            set-up failed; nothing ran
#
# RUN_DIR/env: shell assignments (exported) from lab.sh.
# RUN_DIR/plan: one entry per line, tab-separated: NAME TIMEOUT_S TRIES CWD
# COMMAND (TRIES 2: a failed first try is run once more).
# Each entry's output is also kept in RUN_DIR/logs/NAME.log (a failed
# first try's in NAME.first.log).

set -u
RUN=$1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() {
	echo "@@LAB $*"
}

power_off() {
	sync
	echo o >/proc/sysrq-trigger
	sleep 60
}

fatal() {
	say "fatal $*"
	power_off
}

# A fresh /run, and a fresh temporary directory in it for the tests (the
# host's /tmp shows through the overlay, and a tmpfs over /tmp would hide
# a repository or run directory that lives there).
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -m 1777 /run/lab-tmp
export TMPDIR=/run/lab-tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# What udev would add (bash's process substitution needs /dev/fd).
ln -sfn /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname lab-l1

# shellcheck source=/dev/null
. "$RUN/env" || fatal "cannot read $RUN/env"
mkdir -p "$RUN/logs"

# The guest kernel's modules (L1 runs the same kernel as the L2 guests) and
# its headers as the build tree dkms uses.
rel=$(uname -r)
[ "$rel" = "$BDVMM_LAB_KERNEL_RELEASE" ] ||
	fatal "L1 runs kernel $rel, the lab's modules are for $BDVMM_LAB_KERNEL_RELEASE"
rm -rf "/lib/modules/$rel"
ln -s "$BDVMM_LAB_MODULES" "/lib/modules/$rel"
ln -sfn "$BDVMM_LAB_KDIR" "$BDVMM_LAB_MODULES/build"

modprobe kvm_amd nested=1 || fatal "modprobe kvm_amd nested=1 failed"
kvm=no
[ -c /dev/kvm ] && [ "$(cat /sys/module/kvm_amd/parameters/nested)" = 1 ] && kvm=yes

ip link set lo up
# Soft-RoCE on the virtio-net link: rxe needs crc32_generic loaded before
# the link is added, and an address on the netdev for its RoCE v2 GID.
rdma="none: set-up failed"
if modprobe virtio_net && modprobe crc32_generic && modprobe rdma_rxe; then
	for _ in $(seq 50); do
		[ -e /sys/class/net/eth0 ] && break
		sleep 0.1
	done
	if ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up &&
		rdma link add rxe0 type rxe netdev eth0; then
		rdma=rxe0
	fi
fi
say "ready kvm=$kvm rdma=$rdma"
# A sign of life (and of load) every minute, for a run that seems stuck.
while sleep 60; do say "alive load $(cut -d' ' -f1-3 /proc/loadavg)"; done &

# Runs one entry; sets rc and secs.
run_entry() {
	local name=$1 timeout_s=$2 cwd=$3 command=$4 log=$RUN/logs/$1.log start end

	: >"$log"
	start=$(date +%s.%N)
	(cd "$cwd" && exec timeout -k 10 "$timeout_s" bash -c "$command") </dev/null 2>&1 |
		while IFS= read -r line; do
			printf '%s\n' "$line" >>"$log"
			printf '@@LAB out %s %s\n' "$name" "$line"
		done
	rc=${PIPESTATUS[0]}
	end=$(date +%s.%N)
	# A failure inside L1 may be L1's own (a nested-SVM warning, a
	# lockup): its kernel log goes with the test's output.
	if [ "$rc" != 0 ]; then
		dmesg | tail -n 40 | sed 's/^/L1 dmesg: /' | tee -a "$log" |
			while IFS= read -r line; do
				printf '@@LAB out %s %s\n' "$name" "$line"
			done
	fi
	secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
}

while IFS=$'\t' read -r name timeout_s tries cwd command; do
	[ -n "$name" ] || continue
	say "start $name"
	run_entry "$name" "$timeout_s" "$cwd" "$command"
	if [ "$rc" != 0 ] && [ "$tries" -gt 1 ]; then
		mv "$RUN/logs/$name.log" "$RUN/logs/$name.first.log"
		say "retry $name $rc $secs"
		run_entry "$name" "$timeout_s" "$cwd" "$command"
	fi
	say "end $name $rc $secs"
done <"$RUN/plan"
say done
power_off
