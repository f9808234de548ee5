#!/usr/bin/env bash
#
# Build the Linux guest image for bdvmm from Debian packages: the stock
# kernel, backdoor.ko built against its headers, and a busybox initramfs
# whose /init loads the module and starts the demo service bdkv.
#
# Usage: build-image.sh [--role primary|healthy] [--sessions N]
#                       [--hang-after SECONDS] [--expect ID:VERSION:KEYS,...]
#                       [--cmdline-only] [-h|--help]
#
#   --role ROLE         which instance the command line asks for (the image
#                       is the same): primary (default) serves bdkv and a
#                       load client creates sessions; healthy starts
#                       `bdkv --inbox` to adopt sessions handed over with
#                       `bdctl resume --hook inbox`
#   --sessions N        sessions the primary's load client creates (default 3)
#   --hang-after S      primary only: S seconds after its sessions are ready,
#                       /init hangs the guest kernel through the module's
#                       test-only hang trigger (default: never)
#   --expect LIST       healthy only: the sessions it must adopt, as the
#                       primary printed them ("BDIMG: session ID version V
#                       keys K"): ID:V:K,...  /init polls `bdkv check` until
#                       every one answers with its version and every key
#   --cmdline-only      print only the CMDLINE= line for these options, and
#                       build and download nothing (the image is the same
#                       for every role; the lab asks this inside L1, where
#                       the image was built beforehand on the host)
#   -h, --help          show this help
#
# On success stdout holds exactly these lines, KEY=VALUE, in this order
# (values are not shell-quoted: split each line at its first '='):
#
#   KERNEL_RELEASE=6.1.0-56-amd64            uname -r of the kernel
#   KERNEL=/abs/path/vmlinuz-<release>       the bzImage
#   VMLINUX=/abs/path/vmlinux-<release>      the same kernel as an ELF (boot
#                                            this where ring 0 is emulated:
#                                            it skips the decompressor; its
#                                            BTF gives bdctl dmesg the log's
#                                            layout, where RAM holds none)
#   INITRD=/abs/path/initrd-<hash>.cpio.gz   the initramfs (newc, gzip)
#   MODULE=/abs/path/backdoor.ko             the module inside the initramfs
#   MODULES=/abs/path/lib/modules/<release>  the kernel's own modules, with
#                                            modules.dep (the lab's L1 runs
#                                            this kernel and loads them)
#   KDIR=/abs/path/linux-headers-<release>   the cached headers tree, a KDIR
#                                            for `make module KDIR=...`
#   CMDLINE=console=ttyS0 ...                the kernel command line to pass
#                                            to `bdvmm run --cmdline` (bdvmm
#                                            appends backdoor.dev=... itself)
#
# Progress and errors go to stderr; the exit status is non-zero on failure.
#
# The command line: console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k
# panic=1 (a failed /init panics and bdvmm exits 12), backdoor.allow_hang=1
# (the module's test-only /sys/module/backdoor/parameters/hang_trigger),
# backdoor.os_deadline_ms=3000 (a CPU printing a kernel message to the
# serial console holds interrupts off for the whole line, which under the
# lab's nested emulation takes up to a second: the module's 1 s default
# would call that CPU hung),
# then bdimg.role=... and the role's options (bdimg.sessions,
# bdimg.hang_after, bdimg.expect), read by /init (initramfs/bdimg-init.sh,
# which documents them and the "BDIMG: " console lines it prints).
#
# What it does:
#  1. Resolves the versioned package behind linux-image-amd64, downloads
#     (apt-get download: no install, no root) that exact version of the
#     image, linux-headers-<release>, linux-headers-<release>-common and
#     linux-kbuild-<x.y>, and unpacks them (dpkg-deb) into the cache.  The
#     headers' one absolute reference (their Makefile includes
#     /usr/src/linux-headers-<release>-common/Makefile) is pointed at the
#     cached copy; their other links are relative, so the cached tree is a
#     working KDIR without installing anything.
#  2. Downloads busybox-static and takes its bin/busybox.
#  3. Builds backdoor.ko: `make -C guest-driver KDIR=<cached headers> W=1`
#     after a clean, so every warning is seen; any compiler warning fails
#     the build.  Cached by the hash of guest-driver's sources.
#  4. Builds bdkv statically (cargo, crt-static, x86_64-unknown-linux-gnu)
#     and checks that it has no ELF interpreter.
#  5. Writes the initramfs with tools/mkcpio.py: /init (initramfs/bdimg-init.sh),
#     bin/busybox and a link per applet, lib/modules/backdoor.ko, bin/bdkv.
#     Cached by the hash of all its inputs.
#
# Cache (delete it freely; a second run with a warm cache downloads and
# builds nothing and takes a few seconds):
#
#   ${BDVMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/backdoor-vmm}/image/
#     linux-<package version>/   kernel, vmlinux, config, modules and headers tree
#     busybox-<package version>/ busybox
#     module-<release>-<hash>/   backdoor.ko and its build log
#     initrd-<hash>.cpio.gz
#   Modules and initramfs files unused for 7 days are removed.
#
# Runs of this script wait for each other (flock on image/.lock).
#
# Verified on a host without VMX/SVM (PVM): the build, the image's
# contents, and the kernel's early boot with this initramfs and command
# line.  Booting to /init and beyond needs hardware virtualization and has
# not been run there (tests/tests/guest_image.rs runs it where it can).
#
# Needs: apt-get, apt-cache, dpkg-deb, tar (Debian or a derivative) and
# package lists that know linux-image-amd64 (`apt-get update`); make, the
# compiler the kernel was built with (gcc-12 for Debian 12), libc6-dev,
# binutils (readelf), python3, flock (util-linux), depmod (kmod), xz-utils (the kernel
# payload), cargo with the x86_64-unknown-linux-gnu target.

set -euo pipefail

readonly PROG=${0##*/}
readonly META_PACKAGE=linux-image-amd64
readonly BUSYBOX_PACKAGE=busybox-static

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
readonly HERE
ROOT=$(cd "$HERE/.." && pwd -P)
readonly ROOT

# shellcheck source=images/lib/debian.sh
. "$HERE/lib/debian.sh"

usage() {
	sed -n '3,/^$/s/^# \{0,1\}//p' "$0" >&2
}

# sha256 of the named files' contents and names, in the given order.
hash_files() {
	local f

	for f in "$@"; do
		printf '%s\0' "${f#"$ROOT"/}"
		sha256sum <"$f" || die "cannot read '$f'"
	done | sha256sum | cut -c1-16
}

# Whether ELF file $1 asks for a dynamic loader.
has_interp() {
	readelf -lW "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}

# The vermagic string of kernel module $1.
vermagic() {
	# modinfo (kmod) may be absent; the string is plain in .modinfo.
	tr '\0' '\n' <"$1" | sed -n 's/^vermagic=//p' | head -n 1
}

# fetch_kernel CACHE: download and unpack the kernel and its headers
# (cached); sets the globals RELEASE, KDIR, KERNEL, VMLINUX, MODULES.
fetch_kernel() {
	local cache=$1 dep image_pkg version dir tmp common common_ver kbuild kbuild_ver kbuild_cand

	dep=$(pkg_dep "$META_PACKAGE" linux-image-)
	read -r image_pkg version <<<"$dep"
	[[ -n $version ]] ||
		version=$(pkg_field "$image_pkg" Version)
	RELEASE=${image_pkg#linux-image-}
	RELEASE=${RELEASE%-unsigned}
	dir=$cache/linux-${version//:/_}
	KDIR=$dir/root/usr/src/linux-headers-$RELEASE
	KERNEL=$dir/vmlinuz-$RELEASE
	VMLINUX=$dir/vmlinux-$RELEASE
	MODULES=$dir/root/lib/modules/$RELEASE
	# (A cache from before the modules were kept lacks modules.dep.)
	if [[ -f $dir/.complete && -f $MODULES/modules.dep ]]; then
		log "using cached kernel $RELEASE ($version)"
		return 0
	fi

	# The flavour's headers depend on exactly one other linux-headers-*
	# package, the -common one (its name drops the flavour: 6.1.0-56-common).
	dep=$(pkg_dep "linux-headers-$RELEASE=$version" linux-headers-)
	read -r common common_ver <<<"$dep"
	dep=$(pkg_dep "linux-headers-$RELEASE=$version" linux-kbuild-)
	read -r kbuild kbuild_ver <<<"$dep"
	kbuild_cand=$(pkg_field "$kbuild" Version)
	if [[ -n $kbuild_ver ]] && ! dpkg --compare-versions "$kbuild_cand" ge "$kbuild_ver"; then
		die "linux-headers-$RELEASE $version needs $kbuild >= $kbuild_ver, the package lists offer $kbuild_cand: run 'apt-get update'"
	fi

	rm -rf "$dir"
	tmp=$(mktemp -d "$cache/.linux.XXXXXX")
	# shellcheck disable=SC2064 # expand tmp now
	trap "rm -rf '$tmp'" EXIT
	mkdir "$tmp/debs" "$tmp/boot"
	download_package "$tmp/debs" "$image_pkg=$version" "linux-headers-$RELEASE=$version" \
		"$common=${common_ver:-$version}" "$kbuild=$kbuild_cand"

	local deb
	for deb in "$tmp"/debs/*.deb; do
		case ${deb##*/} in
		linux-image-*)
			# boot/ for the kernel, lib/modules for the lab's L1, which
			# runs this same kernel (tests/lab/lab.sh).
			dpkg-deb --fsys-tarfile "$deb" | tar -xf - -C "$tmp/boot" ./boot ||
				die "could not unpack boot/ from $deb"
			dpkg-deb --fsys-tarfile "$deb" | tar -xf - -C "$tmp/root" ./lib/modules ||
				die "could not unpack lib/modules from $deb"
			;;
		*) dpkg-deb -x "$deb" "$tmp/root" || die "could not unpack $deb" ;;
		esac
	done
	[[ -d $tmp/root/lib/modules/$RELEASE/kernel ]] ||
		die "$image_pkg $version contains no lib/modules/$RELEASE/kernel"
	depmod -b "$tmp/root" "$RELEASE" || die "depmod of the modules of $RELEASE failed"
	[[ -f $tmp/boot/boot/vmlinuz-$RELEASE ]] || die "$image_pkg $version contains no boot/vmlinuz-$RELEASE"
	[[ -f $tmp/root/usr/src/linux-headers-$RELEASE/Module.symvers ]] ||
		die "linux-headers-$RELEASE $version contains no usr/src/linux-headers-$RELEASE/Module.symvers"
	mv "$tmp/boot/boot/vmlinuz-$RELEASE" "$tmp/vmlinuz-$RELEASE"
	if [[ -f $tmp/boot/boot/config-$RELEASE ]]; then
		mv "$tmp/boot/boot/config-$RELEASE" "$tmp/config-$RELEASE"
	fi
	rm -rf "${tmp:?}/debs" "${tmp:?}/boot"

	# Point the headers' absolute include at the cached -common tree (its
	# final path, after the rename below).
	sed -i "s|^include /usr/src/|include $dir/root/usr/src/|" \
		"$tmp/root/usr/src/linux-headers-$RELEASE/Makefile"
	grep -q "^include $dir/root/usr/src/" "$tmp/root/usr/src/linux-headers-$RELEASE/Makefile" ||
		die "unexpected linux-headers-$RELEASE/Makefile (no 'include /usr/src/...'): cannot relocate the headers"
	extract_vmlinux "$tmp/vmlinuz-$RELEASE" "$tmp/vmlinux-$RELEASE" >/dev/null
	touch "$tmp/.complete"
	mv "$tmp" "$dir"
	trap - EXIT
	log "cached kernel $RELEASE ($version) and its headers in $dir"
}

# fetch_busybox CACHE: sets BUSYBOX to a cached static busybox.
fetch_busybox() {
	local cache=$1 version dir tmp

	version=$(pkg_field "$BUSYBOX_PACKAGE" Version)
	dir=$cache/busybox-${version//:/_}
	BUSYBOX=$dir/busybox
	if [[ -x $BUSYBOX ]]; then
		log "using cached busybox $version"
		return 0
	fi
	tmp=$(mktemp -d "$cache/.busybox.XXXXXX")
	# shellcheck disable=SC2064 # expand tmp now
	trap "rm -rf '$tmp'" EXIT
	download_package "$tmp" "$BUSYBOX_PACKAGE=$version"
	extract_package "$tmp"
	[[ -x $tmp/root/bin/busybox ]] || die "$BUSYBOX_PACKAGE $version contains no bin/busybox"
	! has_interp "$tmp/root/bin/busybox" || die "$BUSYBOX_PACKAGE's busybox is not static"
	mkdir -p "$dir"
	mv "$tmp/root/bin/busybox" "$BUSYBOX.tmp"
	mv "$BUSYBOX.tmp" "$BUSYBOX"
	rm -rf "$tmp"
	trap - EXIT
	log "cached busybox $version"
}

# build_module CACHE: sets MODULE to a cached backdoor.ko built against KDIR.
build_module() {
	local cache=$1 src=$ROOT/guest-driver cc hash dir log_file status=0 magic
	local -a sources

	[[ -f $src/Makefile ]] ||
		die "guest-driver/Makefile is missing: the kernel module is not in this tree yet"
	# The compiler the kernel was built with (Debian pins it, e.g. gcc-12).
	cc=$(sed -n 's/^CC = .*\(gcc-[0-9][0-9]*\).*/\1/p' "$KDIR/.kernelvariables" 2>/dev/null || true)
	need_tools "${cc:-gcc}" "${cc:-gcc}"
	need_tools make make

	mapfile -t sources < <(find "$src" -type f \( -name '*.[chS]' -o -name Makefile -o -name Kbuild \
		-o -name '*.lds' \) ! -name '*.mod.c' | LC_ALL=C sort)
	hash=$(hash_files "${sources[@]}" "$KDIR/Module.symvers")
	dir=$cache/module-$RELEASE-$hash
	MODULE=$dir/backdoor.ko
	if [[ -f $MODULE ]]; then
		log "using cached backdoor.ko ($hash)"
		touch "$dir" # last use, for prune_cache
		return 0
	fi

	mkdir -p "$cache/.logs"
	log_file=$cache/.logs/module-$RELEASE-$hash.log
	log "building backdoor.ko against $RELEASE (W=1)"
	# A clean build, so warnings of files built earlier are not hidden.
	make -C "$src" KDIR="$KDIR" clean >/dev/null 2>&1 || true
	make -C "$src" KDIR="$KDIR" W=1 >"$log_file" 2>&1 || status=$?
	if ((status != 0)); then
		tail -n 40 "$log_file" | sed "s/^/$PROG: | /" >&2
		die "building the module failed (make exit status $status; full log: $log_file)"
	fi
	if grep -q 'warning:' "$log_file"; then
		grep -B2 -A4 'warning:' "$log_file" | head -n 60 | sed "s/^/$PROG: | /" >&2
		die "the module builds with warnings (W=1); fix them (full log: $log_file)"
	fi
	[[ -f $src/backdoor.ko ]] || die "make -C guest-driver produced no guest-driver/backdoor.ko"
	magic=$(vermagic "$src/backdoor.ko")
	[[ $magic == "$RELEASE "* ]] ||
		die "guest-driver/backdoor.ko has vermagic '$magic', not for kernel $RELEASE"
	mkdir -p "$dir"
	cp "$src/backdoor.ko" "$MODULE.tmp"
	cp "$log_file" "$dir/build.log"
	mv "$MODULE.tmp" "$MODULE"
	log "built backdoor.ko (vermagic $magic)"
}

# build_bdkv: sets BDKV to the statically linked demo service.
build_bdkv() {
	local target=x86_64-unknown-linux-gnu target_dir

	[[ -f $ROOT/demo-service/Cargo.toml ]] ||
		die "demo-service/Cargo.toml is missing: the demo service bdkv is not in this tree yet"
	need_tools "cargo (rustup)" cargo
	log "building bdkv (static, $target)"
	# cargo's own up-to-date check makes a warm run take about a second.
	(cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' \
		cargo build --release -q -p bdkv --target "$target" >&2) ||
		die "building bdkv failed (is the target installed? rustup target add $target)"
	target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
	BDKV=$target_dir/$target/release/bdkv
	[[ -x $BDKV ]] || die "cargo built no $BDKV"
	! has_interp "$BDKV" || die "$BDKV is dynamically linked (crt-static did not apply)"
}

# build_as_user: sets AS_USER to the static helper that runs a command as
# another user (initramfs/as_user.c).
build_as_user() {
	AS_USER=$HERE/build/as-user
	need_tools gcc gcc
	mkdir -p "$HERE/build"
	gcc -static -O2 -Wall -Wextra -Werror -o "$AS_USER.tmp" "$HERE/initramfs/as_user.c" ||
		die "building initramfs/as_user.c failed"
	mv "$AS_USER.tmp" "$AS_USER"
}

# build_initrd CACHE: sets INITRD to the cached initramfs.
build_initrd() {
	local cache=$1 init=$HERE/initramfs/bdimg-init.sh mkcpio=$HERE/tools/mkcpio.py hash applet
	local -a args

	need_tools python3 python3
	hash=$(hash_files "$init" "$mkcpio" "$BUSYBOX" "$MODULE" "$BDKV" "$AS_USER")
	INITRD=$cache/initrd-$hash.cpio.gz
	if [[ -f $INITRD ]]; then
		log "using cached initramfs ($hash)"
		touch "$INITRD" # last use, for prune_cache
		return 0
	fi
	args=(--init "$init" --out "$INITRD" --gzip
		--file "bin/busybox=$BUSYBOX" --file "bin/bdkv=$BDKV" --file "bin/as-user=$AS_USER"
		--file "lib/modules/backdoor.ko=$MODULE" --dir tmp --dir run)
	# One link per applet, where busybox itself would install it.
	while read -r applet; do
		[[ -n $applet && $applet != bin/busybox && $applet != init && $applet != linuxrc ]] || continue
		args+=(--symlink "$applet=/bin/busybox")
	done < <("$BUSYBOX" --list-full)
	log "writing the initramfs"
	python3 "$mkcpio" "${args[@]}" || die "mkcpio.py failed"
	log "cached $INITRD"
}

# Every source change leaves a module and an initramfs behind: drop those
# unused for a week.
prune_cache() {
	local cache=$1

	find "$cache" -maxdepth 1 \( -name 'initrd-*.cpio.gz' -o -name 'module-*' \) \
		-mtime +7 -exec rm -rf {} + || true
	find "$cache/.logs" -maxdepth 1 -name '*.log' -mtime +7 -delete 2>/dev/null || true
}

main() {
	local role=primary sessions=3 hang_after=0 expect='' cache cmdline cmdline_only=0

	while (($# > 0)); do
		case $1 in
		-h | --help)
			usage
			return 0
			;;
		--role)
			(($# >= 2)) || die "--role needs a value"
			role=$2
			shift
			;;
		--sessions)
			(($# >= 2)) || die "--sessions needs a value"
			sessions=$2
			shift
			;;
		--hang-after)
			(($# >= 2)) || die "--hang-after needs a value"
			hang_after=$2
			shift
			;;
		--expect)
			(($# >= 2)) || die "--expect needs a value"
			expect=$2
			shift
			;;
		--cmdline-only)
			cmdline_only=1
			;;
		*)
			usage
			die "unexpected argument '$1'"
			;;
		esac
		shift
	done
	[[ $role == primary || $role == healthy ]] || die "--role is primary or healthy, not '$role'"
	[[ -z $expect || $expect =~ ^[0-9]+:[0-9]+:[0-9]+(,[0-9]+:[0-9]+:[0-9]+)*$ ]] ||
		die "--expect wants ID:VERSION:KEYS[,...], not '$expect'"
	[[ -z $expect || $role == healthy ]] || die "--expect is for --role healthy"
	[[ $hang_after == 0 || $role == primary ]] || die "--hang-after is for --role primary"
	[[ $sessions =~ ^[1-9][0-9]{0,3}$ ]] || die "--sessions wants a count from 1 to 9999, not '$sessions'"
	[[ $hang_after =~ ^[0-9]{1,5}$ ]] || die "--hang-after wants whole seconds, not '$hang_after'"

	cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1"
	cmdline+=" backdoor.allow_hang=1 backdoor.os_deadline_ms=3000 bdimg.role=$role"
	if [[ $role == primary ]]; then
		cmdline+=" bdimg.sessions=$sessions"
		((hang_after == 0)) || cmdline+=" bdimg.hang_after=$hang_after"
	elif [[ -n $expect ]]; then
		cmdline+=" bdimg.expect=$expect"
	fi
	if ((cmdline_only)); then
		echo "CMDLINE=$cmdline"
		return 0
	fi

	check_apt_tools
	need_tools "tar" tar
	need_tools "kmod" depmod
	need_tools "binutils" readelf
	need_tools "coreutils" sha256sum
	need_tools "util-linux" flock

	cache=$(bd_cache_root)/image
	mkdir -p "$cache" || die "cannot create cache directory '$cache'"
	cache=$(cd "$cache" && pwd -P)
	exec 9>"$cache/.lock"
	flock 9

	fetch_kernel "$cache"
	fetch_busybox "$cache"
	build_module "$cache"
	build_bdkv
	build_as_user
	build_initrd "$cache"
	prune_cache "$cache"

	echo "KERNEL_RELEASE=$RELEASE"
	echo "KERNEL=$KERNEL"
	echo "VMLINUX=$VMLINUX"
	echo "INITRD=$INITRD"
	echo "MODULE=$MODULE"
	echo "MODULES=$MODULES"
	echo "KDIR=$KDIR"
	echo "CMDLINE=$cmdline"
}

main "$@"
