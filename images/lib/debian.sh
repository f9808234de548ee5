# shellcheck shell=bash
#
# Shared helpers of images/fetch-debian-kernel.sh and images/build-image.sh:
# Debian package lookup, download and extraction, and cutting the ELF
# vmlinux out of a bzImage.  Source it after setting PROG (the calling
# script's name, for messages); every helper reports to stderr and exits
# through die on failure, so callers need no error handling of their own.

# The cache root shared by the image scripts and the tests.
bd_cache_root() {
	echo "${BDVMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/backdoor-vmm}"
}

log() {
	echo "$PROG: $*" >&2
}

die() {
	log "error: $*"
	exit 1
}

# need_tools PACKAGE TOOL...: die naming the Debian package if a tool is missing.
need_tools() {
	local package=$1 tool
	shift
	for tool in "$@"; do
		command -v "$tool" >/dev/null 2>&1 ||
			die "'$tool' not found: install the Debian package '$package' (apt-get install $package)"
	done
}

check_apt_tools() {
	local tool

	for tool in apt-get apt-cache dpkg-deb; do
		command -v "$tool" >/dev/null 2>&1 ||
			die "'$tool' not found: this script needs a Debian-based system (apt and dpkg)"
	done
}

# pkg_field PACKAGE[=VERSION] FIELD: a control field of the candidate
# (or the given) version, from the package lists.
pkg_field() {
	local spec=$1 field=$2 text

	if ! text=$(apt-cache show --no-all-versions "$spec" 2>/dev/null) || [[ -z $text ]]; then
		die "the package lists know no '$spec': run 'apt-get update' first (or the package does not exist for this release)"
	fi
	sed -n "s/^$field: //p" <<<"$text" | head -n 1
}

# pkg_dep PACKAGE[=VERSION] PREFIX: the first dependency of the package whose
# name starts with PREFIX, as "name version" (version empty if unversioned).
pkg_dep() {
	local spec=$1 prefix=$2 deps dep

	deps=$(pkg_field "$spec" Depends)
	dep=$(sed 's/^ *//; s/ *$//' <<<"${deps//[,|]/$'\n'}" | grep "^$prefix" | head -n 1 || true)
	[[ -n $dep ]] || die "'$spec' has no $prefix* dependency (Depends: $deps)"
	# "name (= 1.2-3)" or "name (>= 1.2-3)" or "name"
	sed -n 's/^\([^ ]*\)\( *(\(=\|>=\) *\([^)]*\))\)\{0,1\}$/\1 \4/p' <<<"$dep"
}

# The metapackage depends on exactly one versioned image package, whose
# name varies by release (e.g. linux-image-6.1.0-28-amd64 or a
# ...-unsigned variant); take the first linux-image-* dependency.
resolve_package() {
	local meta=$1 deps pkg

	if ! deps=$(apt-cache depends "$meta" 2>/dev/null); then
		die "the package list knows no '$meta': run 'apt-get update' first"
	fi
	pkg=$(sed -n 's/^[[:space:]]*|\{0,1\}Depends:[[:space:]]*<\{0,1\}\(linux-image-[^>[:space:]]*\)>\{0,1\}.*/\1/p' \
		<<<"$deps" | head -n 1)
	[[ -n $pkg ]] ||
		die "'$meta' has no linux-image-* dependency (apt-cache depends said: $(tr '\n' ' ' <<<"$deps"))"
	echo "$pkg"
}

# download_package DIR SPEC...: apt-get download each PACKAGE[=VERSION] into DIR.
download_package() {
	local workdir=$1
	shift

	log "downloading $*"
	local -a opts=()
	# As root, apt would drop to _apt only to find it cannot write DIR
	# (under /root) and warn; the download is unsandboxed either way.
	((EUID != 0)) || opts=(-o APT::Sandbox::User=root)
	if ! (cd "$workdir" && apt-get download "${opts[@]}" "$@" >&2); then
		die "could not download '$*' (network down, or stale package list? try 'apt-get update')"
	fi
	compgen -G "$workdir/*.deb" >/dev/null || die "apt-get download produced no .deb for '$*'"
}

# extract_package DIR: unpack every DIR/*.deb into DIR/root (no install).
extract_package() {
	local workdir=$1 deb

	for deb in "$workdir"/*.deb; do
		dpkg-deb -x "$deb" "$workdir/root" || die "could not unpack $deb"
	done
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

# extract_vmlinux BZIMAGE OUT: write the ELF vmlinux inside BZIMAGE to OUT
# (unless OUT exists); print OUT.
#
# The vmlinux is what to boot on hosts where guest ring-0 code is emulated
# (e.g. PVM): a bzImage's in-guest decompressor then takes minutes.  It is
# cut out of the bzImage using the boot header (setup_sects at 0x1f1,
# payload_offset and payload_length at 0x248 and 0x24c) and decompressed
# with the tool matching its magic: xz, gzip, zstd, lzma, lz4 or bzip2.
extract_vmlinux() {
	local image=$1 out=$2 tmp range offset length expected magic cmd status size

	need_tools coreutils od dd stat mktemp
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

	# A temporary file of this run's own, renamed over OUT at the end: two
	# fetches at once each write their own and the last rename wins.
	tmp=$(mktemp "${out%/*}/.${out##*/}.XXXXXX") || die "cannot create a temporary file next to $out"
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
