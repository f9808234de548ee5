#!/usr/bin/env python3
"""Write a minimal Linux initramfs (newc cpio archive) around one /init.

Usage:
    mkcpio.py --init build/marker_init --out build/marker-initrd.cpio [--gzip]
              [--file DEST=SRC]... [--symlink DEST=TARGET]... [--dir DEST]...

    --init PATH            the program to install as /init (mode 0755)
    --out PATH             the archive to write (replaced atomically)
    --gzip                 gzip-compress the archive (Linux accepts both forms)
    --file DEST=SRC        also install file SRC as DEST (e.g. bin/busybox);
                           mode 0755 if SRC is executable, else 0644
    --symlink DEST=TARGET  also add a symbolic link DEST -> TARGET
    --dir DEST             also add an empty directory DEST (0755)

The archive holds, in this order:
    /dev, /proc, /sys       directories (0755)
    /dev/console            character device 5,1 (0600)
    /dev/ttyS0              character device 4,64 (0660)
    /init                   the --init file (0755)
    then the --dir, --file and --symlink entries, sorted by path, each
    preceded by its missing parent directories (0755)

Every entry is owned by root (uid/gid 0) with mtime 0 (or
$SOURCE_DATE_EPOCH), so the output depends only on the input files.
The headers are written directly, so no root privileges (mknod) and no
cpio binary are needed.  Python 3 standard library only.
"""

import argparse
import gzip
import os
import stat
import sys
import tempfile

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def pad4(n):
    return (4 - n % 4) % 4


class NewcWriter:
    """Appends newc entries to a byte buffer."""

    def __init__(self, mtime):
        self.mtime = mtime
        self.ino = 0
        self.out = bytearray()

    def entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self.ino,  # c_ino
            mode,  # c_mode
            0,  # c_uid
            0,  # c_gid
            nlink,  # c_nlink
            self.mtime,  # c_mtime
            len(data),  # c_filesize
            0,  # c_devmajor
            0,  # c_devminor
            rdev[0],  # c_rdevmajor
            rdev[1],  # c_rdevminor
            len(encoded),  # c_namesize (with the NUL)
            0,  # c_check (only used by the "070702" crc format)
        )
        header = NEWC_MAGIC + b"".join(b"%08x" % f for f in fields)
        self.out += header + encoded + b"\0" * pad4(len(header) + len(encoded))
        self.out += data + b"\0" * pad4(len(data))

    def directory(self, name, perm=0o755):
        self.entry(name, stat.S_IFDIR | perm, nlink=2)

    def chardev(self, name, major, minor, perm):
        self.entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def regular(self, name, data, perm):
        self.entry(name, stat.S_IFREG | perm, data=data)

    def symlink(self, name, target):
        self.entry(name, stat.S_IFLNK | 0o777, data=target.encode())

    def finish(self):
        self.ino = -1  # the trailer's inode number is 0
        self.entry(TRAILER, 0, nlink=1)
        return bytes(self.out)


def build_archive(init_data, mtime, extras=()):
    """extras: (path, kind, value) with kind "dir", "file" ((data, perm)) or "symlink"."""
    w = NewcWriter(mtime)
    dirs = {"dev", "proc", "sys"}
    for d in ("dev", "proc", "sys"):
        w.directory(d)
    w.chardev("dev/console", 5, 1, 0o600)
    w.chardev("dev/ttyS0", 4, 64, 0o660)
    w.regular("init", init_data, 0o755)
    for path, kind, value in sorted(extras, key=lambda e: e[0]):
        # The kernel's unpacker creates no parent directories itself.
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in dirs:
                dirs.add(parent)
                w.directory(parent)
        if kind == "dir":
            if path not in dirs:
                dirs.add(path)
                w.directory(path)
        elif kind == "file":
            w.regular(path, value[0], value[1])
        else:
            w.symlink(path, value)
    return w.finish()


def archive_path(prog, option, dest):
    """Normalise an archive path: relative, no '.', '..' or empty parts."""
    parts = [p for p in dest.strip("/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"{prog}: error: {option} has a bad archive path '{dest}'")
    path = "/".join(parts)
    if path in ("dev", "proc", "sys", "init", "dev/console", "dev/ttyS0"):
        raise ValueError(f"{prog}: error: {option} '{dest}' collides with a built-in entry")
    return path


def collect_extras(prog, args):
    """Reads the --dir/--file/--symlink arguments into build_archive's extras."""
    extras = {}

    def add(option, dest, kind, value):
        path = archive_path(prog, option, dest)
        if path in extras:
            raise ValueError(f"{prog}: error: '{path}' is given twice")
        extras[path] = (path, kind, value)

    for d in args.dir:
        add("--dir", d, "dir", None)
    for spec in args.file:
        dest, sep, src = spec.partition("=")
        if not sep or not src:
            raise ValueError(f"{prog}: error: --file wants DEST=SRC, got '{spec}'")
        try:
            with open(src, "rb") as f:
                data = f.read()
            perm = 0o755 if os.stat(src).st_mode & 0o111 else 0o644
        except OSError as e:
            raise ValueError(f"{prog}: error: cannot read --file '{src}': {e.strerror}") from e
        add("--file", dest, "file", (data, perm))
    for spec in args.symlink:
        dest, sep, target = spec.partition("=")
        if not sep or not target:
            raise ValueError(f"{prog}: error: --symlink wants DEST=TARGET, got '{spec}'")
        add("--symlink", dest, "symlink", target)
    return list(extras.values())


def write_atomically(path, data):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".mkcpio.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv):
    parser = argparse.ArgumentParser(
        prog="mkcpio.py",
        description="Write a minimal newc initramfs around one /init.",
    )
    parser.add_argument("--init", required=True, help="program to install as /init")
    parser.add_argument("--out", required=True, help="archive to write")
    parser.add_argument("--gzip", action="store_true", help="gzip-compress the archive")
    parser.add_argument("--file", action="append", default=[], metavar="DEST=SRC",
                        help="also install file SRC as DEST")
    parser.add_argument("--symlink", action="append", default=[], metavar="DEST=TARGET",
                        help="also add a symbolic link DEST -> TARGET")
    parser.add_argument("--dir", action="append", default=[], metavar="DEST",
                        help="also add an empty directory DEST")
    args = parser.parse_args(argv)

    prog = parser.prog
    try:
        with open(args.init, "rb") as f:
            init_data = f.read()
    except OSError as e:
        print(f"{prog}: error: cannot read --init '{args.init}': {e.strerror}", file=sys.stderr)
        return 1
    if not init_data:
        print(f"{prog}: error: --init '{args.init}' is empty", file=sys.stderr)
        return 1

    try:
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
        if not 0 <= mtime < 2**32:
            raise ValueError
    except ValueError:
        print(f"{prog}: error: SOURCE_DATE_EPOCH is not an integer in [0, 2^32)", file=sys.stderr)
        return 1

    try:
        extras = collect_extras(prog, args)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1

    data = build_archive(init_data, mtime, extras)
    if args.gzip:
        data = gzip.compress(data, compresslevel=9, mtime=0)

    try:
        write_atomically(args.out, data)
    except OSError as e:
        print(f"{prog}: error: cannot write --out '{args.out}': {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
