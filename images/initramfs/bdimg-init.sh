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
#                               instead of waiting for console commands
#   backdoor.NAME=VALUE         the module's parameters, passed to insmod:
#                               busybox insmod, unlike modprobe, does not
#                               read them from /proc/cmdline itself
#
# Console commands (primary, once its sessions are ready; one per line on
# the serial console, i.e. bdvmm's standard input), each answered with a
# "BDIMG: " line:
#   crash-bdkv    SIGKILL the serving bdkv, start it again, and check
#                 (bdkv check) that every session resumed from the
#                 driver's continuation area with its version and keys
#   stop-bdkv     SIGSTOP bdkv: an application hang (its counter stops
#                 while the kernel's keeps moving)
#   cont-bdkv     SIGCONT it
#   hang-kernel   hang the kernel through the module's test-only trigger
#   hang-cpu N    hang CPU N alone (the module's test-only hang_cpu)
#   cpu-offline N / cpu-online N   take CPU N out of service, or back
#
# Run by tests/tests/guest_image.rs on hosts with VMX/SVM and in the lab
# (tests/lab/lab.sh), and by `make demo-linux`.

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
say "module loaded: srcversion $(cat /sys/module/backdoor/srcversion) params$modparams"

# bdkv serve ARGS: start the service; its log (stderr) goes to the console
# line by line as "bdkv: ...", its stdout to /tmp/bdkv.out, its PID to
# /tmp/bdkv.pid; wait until it listens.
start_bdkv() {
	rm -f /tmp/bdkv.out
	# shellcheck disable=SC2016 # $$ is the inner shell's, which exec makes bdkv's
	sh -c 'echo $$ >/tmp/bdkv.pid; exec bdkv serve "$@"' bdkv --listen "127.0.0.1:$PORT" "$@" \
		2>&1 >/tmp/bdkv.out | while IFS= read -r line; do echo "bdkv: $line"; done &
	for _ in $(seq 300); do
		grep -q '^bdkv listening on ' /tmp/bdkv.out 2>/dev/null && return 0
		sleep 0.1
	done
	fail "bdkv serve $* did not start listening within 30 s"
}

# The console commands of a primary (see the top of this file).
serve_commands() {
	say "waiting for commands on the console"
	while read -r command; do
		case $command in
		crash-bdkv)
			pid=$(cat /tmp/bdkv.pid)
			kill -KILL "$pid" || fail "kill -KILL bdkv ($pid)"
			while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
			say "bdkv $pid killed"
			steal_as_another_user
			start_bdkv
			bdkv check --addr "127.0.0.1:$PORT" --expect /tmp/sessions.txt >/tmp/check.out 2>/tmp/check.err ||
				fail "bdkv restarted, but its sessions did not resume: $(cat /tmp/check.err)"
			while IFS= read -r line; do say "resumed $line"; done </tmp/check.out
			say "bdkv restarted as $(cat /tmp/bdkv.pid): all $(grep -c . /tmp/sessions.txt) sessions resumed"
			;;
		stop-bdkv)
			kill -STOP "$(cat /tmp/bdkv.pid)" || fail "kill -STOP bdkv"
			say "bdkv stopped"
			;;
		cont-bdkv)
			kill -CONT "$(cat /tmp/bdkv.pid)" || fail "kill -CONT bdkv"
			say "bdkv continued"
			;;
		hang-kernel)
			hang_kernel
			;;
		hang-cpu\ [0-9]*)
			cpu=${command#hang-cpu }
			say "hanging CPU $cpu now"
			echo "$cpu" >/sys/module/backdoor/parameters/hang_cpu ||
				fail "the module's hang_cpu refused CPU $cpu"
			say "CPU $cpu hung"
			;;
		cpu-offline\ [0-9]* | cpu-online\ [0-9]*)
			cpu=${command#cpu-*line }
			state=0
			case $command in cpu-online*) state=1 ;; esac
			echo $state >"/sys/devices/system/cpu/cpu$cpu/online" ||
				fail "cannot set CPU $cpu online=$state"
			say "CPU $cpu online=$(cat "/sys/devices/system/cpu/cpu$cpu/online")"
			;;
		'') ;;
		*) say "unknown command '$command'" ;;
		esac
	done
	say "console closed"
}

# While bdkv's area is held by nobody, a process of another user (even
# with /dev/backdoor open to all) must not get it: the driver gives an
# area back only to the user who created it.
steal_as_another_user() {
	chmod 0666 /dev/backdoor
	timeout 10 as-user 1000 bdkv serve --listen "127.0.0.1:$((PORT + 1))" >/tmp/thief.out 2>&1
	rc=$?
	chmod 0600 /dev/backdoor
	case $rc in
	124 | 143) fail "another user's bdkv took bdkv's area (it ran until the timeout)" ;;
	0) fail "another user's bdkv exited 0" ;;
	esac
	say "another user's bdkv was refused bdkv's area: $(grep -v '^$' /tmp/thief.out | tail -n 1)"
}

hang_kernel() {
	say "hanging the kernel now"
	# The module refuses unless it was loaded with allow_hang=1.
	echo 1 >/sys/module/backdoor/parameters/hang_trigger ||
		fail "the module's hang_trigger refused (is backdoor.allow_hang=1 on the command line?)"
	fail "the kernel did not hang"
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
		hang_kernel
	fi
	serve_commands
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
