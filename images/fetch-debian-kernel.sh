#!/usr/bin/env bash
#
# Fetch a stock Debian kernel (bzImage) for bdvmm's Linux early-boot test.
#
# Usage: fetch-debian-kernel.sh [--vmlinux] [-h|--help]
#
#   --vmlinux   also extract the uncompressed ELF kernel from the bzImage's
#               payload, cache it next to it as vmlinux-<version>, and
#               print its path instead of the bzImage's
#   -h, --help  show this help
#
# Resolves the versioned package behind the linux-image-amd64 metapackage,
# downloads it with `apt-get download` (no install, no root needed for
# the download itself), and unpacks boot/vmlinuz-<version> (and
# boot/config-<version> if present) into the cache directory:
#
#   ${BDVMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/backdoor-vmm}/debian-kernel/
#
# If a vmlinuz is already cached, nothing is downloaded (and with
# --vmlinux, a cached vmlinux is not extracted again).
# On success the only line on stdout is the absolute path of the vmlinuz
# (with --vmlinux: of the vmlinux); all progress and errors go to stderr.
# Exits non-zero on failure.
#
# The vmlinux is what to boot on hosts where guest ring-0 code is emulated
# (e.g. PVM): a bzImage's in-guest decompressor then takes minutes.  It is
# cut out of the bzImage using the boot header (setup_sects at 0x1f1,
# payload_offset and payload_length at 0x248 and 0x24c) and decompressed
# with the tool matching its magic: xz, gzip, zstd, lzma, lz4 or bzip2.
#
# Needs apt-get, apt-cache and dpkg-deb (Debian or a derivative), and a
# package list that knows linux-image-amd64 (run `apt-get update` first);
# with --vmlinux also od and the payload's decompressor.

set -euo pipefail

readonly PROG=${0##*/}
readonly META_PACKAGE=linux-image-amd64

# shellcheck source=images/lib/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/debian.sh"

usage() {
	sed -n '3,/^$/s/^# \{0,1\}//p' "$0" >&2
}

cache_dir() {
	echo "$(bd_cache_root)/debian-kernel"
}

# Print the newest cached vmlinuz, if any.
find_cached() {
	local dir=$1

	[[ -d $dir ]] || return 0
	find "$dir" -maxdepth 1 -type f -name 'vmlinuz-*' | sort -V | tail -n 1
}

# Copy the kernel (and its config) into the cache; print the kernel path.
# install_file SRC DST: copy SRC to DST atomically.
install_file() {
	local tmp
	tmp=$(mktemp "${2%/*}/.${2##*/}.XXXXXX") || die "cannot create a temporary file next to $2"
	cp "$1" "$tmp" && mv -f "$tmp" "$2" || {
		rm -f "$tmp"
		die "cannot install $2"
	}
}

install_kernel() {
	local workdir=$1 dir=$2 kernel version

	kernel=$(find "$workdir/root/boot" -maxdepth 1 -type f -name 'vmlinuz-*' 2>/dev/null |
		sort -V | tail -n 1)
	[[ -n $kernel ]] || die "the package contains no boot/vmlinuz-*"
	version=${kernel##*/vmlinuz-}

	mkdir -p "$dir"
	# Copy each file to a temporary name of this run's own, then rename:
	# an interrupted run never leaves a partial file that the cache check
	# would accept, and two runs at once never write the same file.
	if [[ -f $workdir/root/boot/config-$version ]]; then
		install_file "$workdir/root/boot/config-$version" "$dir/config-$version"
	fi
	install_file "$kernel" "$dir/vmlinuz-$version"
	log "cached $dir/vmlinuz-$version"
	echo "$dir/vmlinuz-$version"
}

main() {
	local dir cached pkg workdir kernel want_vmlinux=0

	while (($# > 0)); do
		case $1 in
		-h | --help)
			usage
			return 0
			;;
		--vmlinux) want_vmlinux=1 ;;
		*)
			usage
			die "unexpected argument '$1'"
			;;
		esac
		shift
	done

	dir=$(cache_dir)
	mkdir -p "$dir" || die "cannot create cache directory '$dir'"
	dir=$(cd "$dir" && pwd -P)

	cached=$(find_cached "$dir")
	if [[ -n $cached ]]; then
		log "using cached kernel"
		kernel=$cached
	else
		check_apt_tools
		pkg=$(resolve_package "$META_PACKAGE")
		workdir=$(mktemp -d "${TMPDIR:-/tmp}/bdvmm-kernel.XXXXXX")
		# shellcheck disable=SC2064 # expand workdir now
		trap "rm -rf '$workdir'" EXIT
		download_package "$workdir" "$pkg"
		extract_package "$workdir"
		kernel=$(install_kernel "$workdir" "$dir")
	fi

	if ((want_vmlinux)); then
		extract_vmlinux "$kernel" "${kernel%/*}/vmlinux-${kernel##*/vmlinuz-}"
	else
		echo "$kernel"
	fi
}

main "$@"
