"""The libfuse mount-helper form: `actorfs SRC MNT -o OPTS`.

`mount -t fuse.actorfs SRC MNT -o allow_other,ro` (or the /etc/fstab line
`SRC MNT fuse.actorfs allow_other,ro 0 0` and `mount MNT`) runs mount.fuse3,
which runs the program named after the type's subtype, found on PATH, as
`actorfs SRC MNT -o OPTS`. It expects the program to return once the mount is
live, leaving the server in the background: what `actorfs mount` does.

translate() turns that form into `actorfs mount SRC MNT ...`:
- actorfs's own options, written the mount way: cache=always, symlinks=deny,
  inline=never, queues=2, poll=0, read_ahead=512, watch / no_watch, writeback,
  passthrough / no_passthrough, debug, log_level=info, metrics=ADDR, stats_socket=PATH,
  stats_interval=N, foreground;
- allow_other, ro (read-only) and rw;
- the VFS flags noexec, sync, dirsync, noatime and nodiratime, which go onto
  the mount (`--mount-flags`); nosuid and nodev are always set;
- options only fstab and mount(8) care about (noauto, nofail, _netdev, user,
  users, auto, defaults, comment=..., x-systemd.*) and the other VFS flags
  (suid, dev, exec, relatime, ...: the defaults, or what a FUSE mount never
  gets) are ignored, each with one log line (at info level);
- anything else is an error naming the option.
"""

from __future__ import annotations

import logging
from collections.abc import Container

log = logging.getLogger("actorfs.mount_helper")

# name=value options: our option for each
VALUED = {"cache": "--cache", "symlinks": "--symlinks", "inline": "--inline",
          "queues": "--queues", "poll": "--poll", "read_ahead": "--read-ahead",
          "log_level": "--log-level", "metrics": "--metrics", "stats_socket": "--stats-socket",
          "stats_interval": "--stats-interval"}  # fmt: skip
FLAGS = {"allow_other": "--allow-other", "ro": "--read-only", "read_only": "--read-only",
         "writeback": "--writeback", "passthrough": "--passthrough",
         "no_passthrough": "--no-passthrough", "watch": "--watch",
         "no_watch": "--no-watch", "debug": "--debug", "foreground": "-f"}  # fmt: skip
FSTAB_ONLY = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
              "owner", "group", "rw"}  # fmt: skip
MOUNT_FLAGS = ("noexec", "sync", "dirsync", "noatime", "nodiratime")  # -> --mount-flags
VFS_FLAGS = {"dev", "nodev", "suid", "nosuid", "exec", "atime",
             "diratime", "relatime", "norelatime", "strictatime", "lazytime",
             "nolazytime", "async", "silent", "loud", "default_permissions",
             "allow_root", "blkdev", "mand", "nomand", "iversion", "noiversion"}  # fmt: skip
IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=", "context=", "fscontext=",
                    "defcontext=", "rootcontext=", "max_read=", "blksize=")  # fmt: skip

_notes: list[str] = []


def is_helper_form(argv: list[str], commands: Container[str]) -> bool:
    """`SRC MNT ...` rather than `COMMAND ...`: two paths before any option."""
    if len(argv) < 2 or argv[0] in commands or argv[0].startswith("-"):
        return False
    return not argv[1].startswith("-")


def split_options(text: str) -> list[str]:
    return [o for o in text.split(",") if o]


def translate(argv: list[str]) -> list[str]:
    """`SRC MNT [-o OPTS]... [-f] [-n] [-s] [-v] [-t TYPE]` -> `mount SRC MNT ...`."""
    from actorfs.runtime.cli.main import UserError

    src, mnt, rest = argv[0], argv[1], argv[2:]
    opts: list[str] = []
    out = ["mount", src, mnt]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "-o" and i + 1 < len(rest):
            opts += split_options(rest[i + 1])
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts += split_options(a[2:])
        elif a in ("-f", "--foreground"):
            out.append("-f")
        elif a in ("-n", "-s", "-v"):  # no mtab, sloppy, verbose: mount(8)'s business
            _notes.append(f"ignoring mount flag {a}")
        elif a == "-t" and i + 1 < len(rest):
            i += 2
            continue
        else:
            raise UserError(f"mount helper: unexpected argument {a!r}: use SRC MNT -o OPTIONS")
        i += 1
    flags: list[str] = []
    for o in opts:
        name, eq, value = o.partition("=")
        if o in MOUNT_FLAGS:
            if o not in flags:
                flags.append(o)
        elif eq and name in VALUED:
            out += [VALUED[name], value]
        elif not eq and name in FLAGS:
            if FLAGS[name] not in out:
                out.append(FLAGS[name])
        elif o in FSTAB_ONLY:
            _notes.append(f"ignoring mount option {o} (for mount and fstab, not the server)")
        elif o in VFS_FLAGS or o.startswith(IGNORED_PREFIXES):
            _notes.append(f"ignoring mount option {o} (the FUSE mount sets its own flags)")
        else:
            raise UserError(f"unknown mount option {o!r} (see actorfs mount --help for what "
                            "maps to -o name=value)")
    if flags:
        out += ["--mount-flags", ",".join(flags)]
    return out


def log_notes() -> None:
    """Log what translate() ignored, one line each (once logging is set up)."""
    while _notes:
        log.info(_notes.pop(0))
