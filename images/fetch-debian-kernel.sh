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

usage() {
	sed -n '3,/^$/s/^# \{0,1\}//p' "$0" >&2
}

log() {
	echo "$PROG: $*" >&2
}

die() {
	log "error: $*"
	exit 1
}

cache_dir() {
	local base=${BDVMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/backdoor-vmm}

	echo "$base/debian-kernel"
}

check_tools() {
	local tool

	for tool in apt-get apt-cache dpkg-deb; do
		command -v "$tool" >/dev/null 2>&1 ||
			die "'$tool' not found: this script needs a Debian-based system (apt and dpkg)"
	done
}

# Print the newest cached vmlinuz, if any.
find_cached() {
	local dir=$1

	[[ -d $dir ]] || return 0
	find "$dir" -maxdepth 1 -type f -name 'vmlinuz-*' | sort -V | tail -n 1
}

# The metapackage depends on exactly one versioned image package, whose
# name varies by release (e.g. linux-image-6.1.0-28-amd64 or a
# ...-unsigned variant); take the first linux-image-* dependency.
resolve_package() {
	local deps pkg

	if ! deps=$(apt-cache depends "$META_PACKAGE" 2>/dev/null); then
		die "the package list knows no '$META_PACKAGE': run 'apt-get update' first"
	fi
	pkg=$(sed -n 's/^[[:space:]]*|\{0,1\}Depends:[[:space:]]*<\{0,1\}\(linux-image-[^>[:space:]]*\)>\{0,1\}.*/\1/p' \
		<<<"$deps" | head -n 1)
	[[ -n $pkg ]] ||
		die "'$META_PACKAGE' has no linux-image-* dependency (apt-cache depends said: $(tr '\n' ' ' <<<"$deps"))"
	echo "$pkg"
}

download_package() {
	local pkg=$1 workdir=$2

	log "downloading $pkg"
	if ! (cd "$workdir" && apt-get download "$pkg" >&2); then
		die "could not download '$pkg' (network down, or stale package list? try 'apt-get update')"
	fi
	compgen -G "$workdir/*.deb" >/dev/null || die "apt-get download produced no .deb for '$pkg'"
}

extract_package() {
	local workdir=$1 deb

	for deb in "$workdir"/*.deb; do
		dpkg-deb -x "$deb" "$workdir/root" || die "could not unpack $deb"
	done
}

# Copy the kernel (and its config) into the cache; print the kernel path.
install_kernel() {
	local workdir=$1 dir=$2 kernel version

	kernel=$(find "$workdir/root/boot" -maxdepth 1 -type f -name 'vmlinuz-*' 2>/dev/null |
		sort -V | tail -n 1)
	[[ -n $kernel ]] || die "the package contains no boot/vmlinuz-*"
	version=${kernel##*/vmlinuz-}

	mkdir -p "$dir"
	if [[ -f $workdir/root/boot/config-$version ]]; then
		cp "$workdir/root/boot/config-$version" "$dir/config-$version"
	fi
	# Copy then rename, so an interrupted run never leaves a partial
	# kernel that the cache check would accept.
	cp "$kernel" "$dir/.vmlinuz-$version.tmp"
	mv -f "$dir/.vmlinuz-$version.tmp" "$dir/vmlinuz-$version"
	log "cached $dir/vmlinuz-$version"
	echo "$dir/vmlinuz-$version"
}

# Print the unsigned little-endian integer of $3 bytes at offset $2 of
# file $1 (byte by byte, so the host's byte order does not matter).
read_le() {
	local file=$1 offset=$2 width=$3 bytes value=0 i

	bytes=$(od -An -v -tu1 -j "$offset" -N "$width" "$file") ||
		die "cannot read '$file'"
	read -r -a bytes <<<"$bytes"
	((${#bytes[@]} == width)) || die "'$file' ends before offset $((offset + width))"
	for ((i = width - 1; i >= 0; i--)); do
		value=$((value * 256 + bytes[i]))
	done
	echo "$value"
}

# Print the hex of the $3 bytes at offset $2 of file $1.
read_hex() {
	od -An -v -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'
}

# Print "<offset> <length>" of the compressed kernel inside bzImage $1.
payload_range() {
	local image=$1 setup_sects version offset length size

	[[ $(read_hex "$image" 0x202 4) == 48647253 ]] ||
		die "'$image' is not a bzImage (no 'HdrS' boot header at 0x202)"
	version=$(read_le "$image" 0x206 2)
	((version >= 0x208)) ||
		die "'$image' has boot protocol $((version >> 8)).$((version & 0xff)): no payload fields before 2.08"
	setup_sects=$(read_le "$image" 0x1f1 1)
	((setup_sects != 0)) || setup_sects=4
	offset=$(read_le "$image" 0x248 4)
	offset=$(((setup_sects + 1) * 512 + offset))
	length=$(read_le "$image" 0x24c 4)
	size=$(stat -c %s "$image")
	((length >= 4 && offset + length <= size)) ||
		die "'$image': payload [$offset, +$length) lies outside the file ($size bytes)"
	echo "$offset $length"
}

# Print the decompressor command for a payload starting with hex $1.
decompressor() {
	local magic=$1 format package cmd

	case $magic in
	fd377a585a00*) format=xz package=xz-utils cmd="xz -dc --single-stream" ;;
	1f8b*) format=gzip package=gzip cmd="gzip -dc" ;;
	28b52ffd*) format=zstd package=zstd cmd="zstd -dcq" ;;
	5d0000*) format=lzma package=xz-utils cmd="xz -dc --format=lzma" ;;
	02214c18*) format=lz4 package=lz4 cmd="lz4 -dcq" ;;
	425a68*) format=bzip2 package=bzip2 cmd="bzip2 -dc" ;;
	*) die "unknown compression of the kernel payload (magic $magic)" ;;
	esac
	command -v "${cmd%% *}" >/dev/null 2>&1 ||
		die "the kernel payload is $format-compressed, but '${cmd%% *}' is not installed (Debian package: $package)"
	echo "$cmd"
}

# Extract the ELF vmlinux from bzImage $1 into the cache; print its path.
extract_vmlinux() {
	local image=$1 dir version out tmp range offset length expected magic cmd status size

	local tool

	for tool in od dd stat; do
		command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (Debian package: coreutils)"
	done
	dir=${image%/*}
	version=${image##*/vmlinuz-}
	out=$dir/vmlinux-$version
	if [[ -f $out ]]; then
		log "using cached vmlinux"
		echo "$out"
		return 0
	fi

	range=$(payload_range "$image")
	read -r offset length <<<"$range"
	# The kernel build appends the uncompressed size as a little-endian
	# u32 to every payload (gzip's own trailer holds the same value).
	expected=$(read_le "$image" $((offset + length - 4)) 4)
	magic=$(read_hex "$image" "$offset" 6)
	cmd=$(decompressor "$magic")
	log "extracting vmlinux ($length-byte payload at offset $offset, ${cmd%% *})"

	tmp=$dir/.vmlinux-$version.tmp
	# Some decompressors complain about the trailing size word; judge
	# the result by its ELF magic and size instead of their exit status.
	status=0
	# shellcheck disable=SC2086 # cmd is a word list
	dd if="$image" bs=64K iflag=skip_bytes,count_bytes skip="$offset" count="$length" status=none |
		$cmd >"$tmp" 2>"$tmp.err" || status=$?
	if [[ $(read_hex "$tmp" 0 4) != 7f454c46 ]]; then
		sed "s/^/$PROG: /" "$tmp.err" >&2
		rm -f "$tmp" "$tmp.err"
		die "decompressing the payload of '$image' gave no ELF file (${cmd%% *} exit status $status)"
	fi
	size=$(stat -c %s "$tmp")
	if ((size % 4294967296 != expected)); then
		sed "s/^/$PROG: /" "$tmp.err" >&2
		rm -f "$tmp" "$tmp.err"
		die "the vmlinux from '$image' has $size bytes, its payload says $expected"
	fi
	((status == 0)) || log "ignored ${cmd%% *} exit status $status (the trailing size word): the ELF is complete"
	rm -f "$tmp.err"
	mv -f "$tmp" "$out"
	log "cached $out"
	echo "$out"
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
		check_tools
		pkg=$(resolve_package)
		workdir=$(mktemp -d "${TMPDIR:-/tmp}/bdvmm-kernel.XXXXXX")
		# shellcheck disable=SC2064 # expand workdir now
		trap "rm -rf '$workdir'" EXIT
		download_package "$pkg" "$workdir"
		extract_package "$workdir"
		kernel=$(install_kernel "$workdir" "$dir")
	fi

	if ((want_vmlinux)); then
		extract_vmlinux "$kernel"
	else
		echo "$kernel"
	fi
}

main "$@"
