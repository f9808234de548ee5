#!/bin/sh
# /init of the bdvmm guest image (images/build-image.sh), run by busybox sh
# as PID 1: mounts the kernel file systems, brings up lo, loads
# backdoor.ko, and starts the demo service bdkv in the role the kernel
# command line names.  Console lines starting "BDIMG: " are what the tests
# (tests/tests/guest_image.rs) wait for; "BDIMG: FAILED: " ends the boot.
#
# Kernel command line (the kernel ignores dotted names it does not know):
#   bdimg.role=primary|healthy  primary (default): bdkv serves on
#                               127.0.0.1:$PORT and a load client creates
#                               bdimg.sessions sessions; healthy: bdkv --inbox
#                               adopts the sessions that `bdctl resume --hook
#                               inbox` delivers
#   bdimg.sessions=N            sessions the load client creates (default 3)
#   bdimg.hang_after=S          primary: S seconds after the sessions are
#                               ready, hang the kernel through the module's
#                               test-only trigger (needs backdoor.allow_hang=1)
#   backdoor.NAME=VALUE         the module's parameters, passed to insmod:
#                               busybox insmod, unlike modprobe, does not
#                               read them from /proc/cmdline itself
#
# Not yet run to the end anywhere: the machine it was written on has no
# VMX/SVM, where Linux stops in early boot before /init.  What runs it is
# tests/tests/guest_image.rs's full test, on hosts with hardware
# virtualization; the busybox commands used were checked on the host.

PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
PORT=7070

say() {
	echo "BDIMG: $*"
}

# Exiting makes the kernel panic; with panic=1 reboot=k bdvmm then exits 12,
# so a failed boot never looks like a hung one.
fail() {
	say "FAILED: $*"
	sync
	exit 1
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs on /dev"
mount -t tmpfs tmpfs /tmp || fail "mount /tmp"

role=primary
sessions=3
hang_after=0
expect=
modparams=
read -r cmdline </proc/cmdline
for word in $cmdline; do
	case $word in
	bdimg.role=*) role=${word#bdimg.role=} ;;
	bdimg.sessions=*) sessions=${word#bdimg.sessions=} ;;
	bdimg.hang_after=*) hang_after=${word#bdimg.hang_after=} ;;
	bdimg.expect=*) expect=${word#bdimg.expect=} ;;
	backdoor.*=*) modparams="$modparams ${word#backdoor.}" ;;
	esac
done
say "init started: kernel $(uname -r), role $role"

ip link set lo up || fail "bring up lo"

# shellcheck disable=SC2086 # one word per module parameter
insmod /lib/modules/backdoor.ko $modparams || fail "insmod backdoor.ko$modparams"
for _ in $(seq 50); do
	[ -c /dev/backdoor ] && break
	sleep 0.1
done
[ -c /dev/backdoor ] || fail "backdoor.ko loaded but /dev/backdoor did not appear"
say "module loaded:$modparams"

# bdkv serve ARGS: start the service; its log (stderr) goes to the console
# line by line as "bdkv: ...", its stdout to /tmp/bdkv.out; wait until it
# listens.
start_bdkv() {
	bdkv serve --listen "127.0.0.1:$PORT" "$@" 2>&1 >/tmp/bdkv.out |
		while IFS= read -r line; do echo "bdkv: $line"; done &
	for _ in $(seq 300); do
		grep -q '^bdkv listening on ' /tmp/bdkv.out 2>/dev/null && return 0
		sleep 0.1
	done
	fail "bdkv serve $* did not start listening within 30 s"
}

case $role in
primary)
	start_bdkv
	# "<id> <version> <keys>" per session (client::load's output).
	bdkv load --addr "127.0.0.1:$PORT" --sessions "$sessions" >/tmp/sessions.txt ||
		fail "bdkv load --sessions $sessions"
	ids=
	while read -r id version keys; do
		say "session $id version $version keys $keys"
		ids="$ids${ids:+,}$id"
	done </tmp/sessions.txt
	say "sessions ready ids=$ids"
	if [ "$hang_after" -gt 0 ]; then
		say "hanging the kernel in $hang_after s"
		sleep "$hang_after"
		say "hanging the kernel now"
		# The module refuses unless it was loaded with allow_hang=1.
		echo 1 >/sys/module/backdoor/parameters/hang_trigger ||
			fail "the module's hang_trigger refused (is backdoor.allow_hang=1 on the command line?)"
		fail "the kernel did not hang"
	fi
	;;
healthy)
	start_bdkv --inbox
	say "healthy instance ready: waiting for sessions in the inbox"
	[ -n "$expect" ] || say "no bdimg.expect: not checking adopted sessions"
	if [ -n "$expect" ]; then
		# bdimg.expect=ID:VERSION:KEYS,...: what `bdkv check` wants per line.
		echo "$expect" | tr ',:' '\n ' >/tmp/expect.txt
		n=$(grep -c . /tmp/expect.txt)
		# bdkv adopts the inbox while it runs; poll until every session
		# answers with its version and every key (bdkv check: RESUME, GETs).
		checked=0
		for _ in $(seq 300); do
			if bdkv check --addr "127.0.0.1:$PORT" --expect /tmp/expect.txt \
				>/tmp/check.out 2>/tmp/check.err; then
				checked=1
				break
			fi
			sleep 1
		done
		[ "$checked" = 1 ] || fail "sessions not adopted within 300 s: $(cat /tmp/check.err)"
		while IFS= read -r line; do say "adopted $line"; done </tmp/check.out
		say "all $n sessions adopted with their contents"
	fi
	;;
*)
	fail "unknown bdimg.role '$role'"
	;;
esac

# PID 1 must not exit; reap children meanwhile.
while :; do
	wait
	sleep 1
done
