#!/usr/bin/env bash
#
# The kernel's own style check, `checkpatch.pl --strict`, on every C file
# of backdoor.ko and its headers; any finding fails it.
#
# checkpatch.pl comes from Debian's linux-source package (tools/deps.sh
# installs it): the script and the two data files it reads are unpacked
# once into the cache, keyed by the tarball's name.

set -euo pipefail

readonly PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT

die() {
	echo "$PROG: $*" >&2
	exit 1
}

tarball=$(ls -v /usr/src/linux-source-*.tar.xz 2>/dev/null | tail -n 1)
[[ -n $tarball ]] || die "no /usr/src/linux-source-*.tar.xz: apt-get install linux-source"
name=$(basename "$tarball" .tar.xz)
cache=${BDVMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/backdoor-vmm}/checkpatch/$name
script=$cache/$name/scripts/checkpatch.pl
if [[ ! -f $script ]]; then
	mkdir -p "$cache"
	tmp=$(mktemp -d "$cache/.unpack.XXXXXX")
	tar -xJf "$tarball" -C "$tmp" "$name/scripts/checkpatch.pl" \
		"$name/scripts/spelling.txt" "$name/scripts/const_structs.checkpatch" ||
		die "cannot unpack checkpatch.pl from $tarball"
	mv -f "$tmp/$name" "$cache/" 2>/dev/null || [[ -f $script ]] || die "cannot cache checkpatch.pl"
	rm -rf "$tmp"
fi

cd "$ROOT/guest-driver"
files=(backdoor_*.c backdoor_*.h include/*.h lib/*.c examples/*.c)
out=$(perl "$script" --strict --no-tree --quiet --file "${files[@]}" 2>&1) || true
if [[ -n $out ]]; then
	echo "$out"
	die "checkpatch.pl --strict has findings in the driver (above)"
fi
echo "$PROG: checkpatch.pl --strict: ${#files[@]} files of guest-driver/, no findings"
