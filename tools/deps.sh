#!/usr/bin/env bash
#
# What the build, the tests and the lab need from the system, in one place:
# `make demo`, `make test`, `make lab` and .ci/run all come through here.
#
# Usage: tools/deps.sh check|ensure|list GROUP...
#
#   GROUP    demo  the main job: build bdvmm, bdctl and the test guests
#            test  style, lints and every test on this host (includes demo)
#            lab   the lab (tests/lab/lab.sh): QEMU and what L1 runs
#   check    exit 1 if a package is missing, naming them and the one
#            command that installs them
#   ensure   as check, but install what is missing when run as root on
#            Debian or Ubuntu (one apt-get install); elsewhere, as check
#   list     print the packages, one per line
#
# A Rust toolchain (rustup: cargo, rustc, the x86_64-unknown-linux-gnu
# target) is assumed; it is not a Debian package here.

set -euo pipefail

readonly PROG=${0##*/}

# gcc, libc6-dev, make: the test guests and the C checks; python3: the
# initramfs writer and demo.sh's final check; protobuf-compiler,
# libprotobuf-dev: etcd-client's build (bdctl's cluster mode speaks etcd's
# gRPC API, generated from its .proto files at build time).
readonly DEMO=(gcc libc6-dev make python3 protobuf-compiler libprotobuf-dev)
# xz-utils: kernel extraction; util-linux: unshare/setpriv (the /dev/kvm
# error tests) and flock; cpio; iproute2: network namespaces (the cut-link
# test); kmod: depmod for the guest kernel's modules; linux-headers-amd64,
# sparse: `make module` (W=1, C=1); linux-source: checkpatch.pl (`make
# checkpatch`); cmake..libibverbs-dev: the RDMA verbs backend;
# prometheus: promtool, which checks what `bdctl watch --metrics` serves;
# etcd-server: the real etcd the cluster tests start on loopback.
readonly TEST=(xz-utils util-linux cpio iproute2 kmod linux-headers-amd64 sparse linux-source
	cmake pkg-config libclang-dev libnl-3-dev libnl-route-3-dev libibverbs-dev prometheus etcd-server)
# qemu-system-x86: L1 (TCG with nested SVM); busybox-static: L1's
# initramfs; dkms: the dkms install test; ibverbs-providers (rxe),
# ibverbs-utils, perftest (ib_read_lat): Soft-RoCE inside L1, which runs
# the host's user space.
readonly LAB=(qemu-system-x86 busybox-static dkms ibverbs-providers ibverbs-utils perftest)

packages() {
	local group

	for group in "$@"; do
		case $group in
		demo) printf '%s\n' "${DEMO[@]}" ;;
		test) printf '%s\n' "${DEMO[@]}" "${TEST[@]}" ;;
		lab) printf '%s\n' "${LAB[@]}" ;;
		*)
			echo "$PROG: unknown group '$group' (demo, test or lab)" >&2
			exit 2
			;;
		esac
	done | awk '!seen[$0]++'
}

missing() {
	local p

	for p in "$@"; do
		[[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || echo "$p"
	done
}

# Debian 12's own QEMU (7.2) cannot be installed next to the qemu-utils of
# bookworm-backports that some machines carry; backports' QEMU 10 is what
# the lab was measured with. Prints apt-get options for qemu-system-x86.
backports_opts() {
	local codename

	codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
	[[ $codename == bookworm ]] || return 0
	echo "-t bookworm-backports"
}

install_command() {
	local opts=''

	[[ " $* " == *" qemu-system-x86 "* ]] && opts=$(backports_opts)
	echo "apt-get install -y --no-install-recommends ${opts:+$opts }$*"
}

ensure_backports_source() {
	grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
	echo "$PROG: adding bookworm-backports to the package sources (for qemu-system-x86)" >&2
	echo 'deb http://deb.debian.org/debian bookworm-backports main' \
		>/etc/apt/sources.list.d/bdvmm-backports.list
}

main() {
	local cmd=${1:-} opts=''
	local -a want gone

	(($# >= 2)) || {
		sed -n '3,/^$/s/^# \{0,1\}//p' "$0" >&2
		exit 2
	}
	shift
	mapfile -t want < <(packages "$@")
	case $cmd in
	list)
		printf '%s\n' "${want[@]}"
		return 0
		;;
	check | ensure) ;;
	*)
		echo "$PROG: unknown command '$cmd' (check, ensure or list)" >&2
		exit 2
		;;
	esac
	command -v dpkg-query >/dev/null 2>&1 || {
		echo "$PROG: not a Debian or Ubuntu system (no dpkg-query): install the equivalents of: ${want[*]}" >&2
		return 0
	}
	mapfile -t gone < <(missing "${want[@]}")
	((${#gone[@]} > 0)) || return 0
	if [[ $cmd == ensure && $EUID == 0 ]] && command -v apt-get >/dev/null 2>&1; then
		echo "$PROG: installing ${gone[*]}" >&2
		if [[ " ${gone[*]} " == *" qemu-system-x86 "* ]]; then
			opts=$(backports_opts)
			[[ -z $opts ]] || ensure_backports_source
		fi
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		# shellcheck disable=SC2086 # opts is a word list
		apt-get install -y -qq --no-install-recommends $opts "${gone[@]}" >/dev/null
		mapfile -t gone < <(missing "${want[@]}")
		((${#gone[@]} == 0)) && return 0
	fi
	echo "$PROG: missing Debian packages: ${gone[*]}" >&2
	echo "$PROG: install them with: sudo $(install_command "${gone[@]}")" >&2
	[[ " ${gone[*]} " != *" qemu-system-x86 "* || -z $(backports_opts) ]] ||
		echo "$PROG: (qemu-system-x86 from bookworm-backports: add 'deb http://deb.debian.org/debian bookworm-backports main' to the sources first)" >&2
	exit 1
}

main "$@"
