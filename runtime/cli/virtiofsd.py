"""`actorfs-virtiofsd`: actorfs with virtiofsd's command line, for libvirt and VMM launchers.

libvirt starts the daemon named by a domain's <filesystem><binary path=.../>
as (its src/qemu/qemu_virtiofs.c command-line builder)

    BINARY --fd=N -o source=DIR[,cache=MODE][,sandbox=MODE][,xattr|no_xattr]
           [,flock|no_flock][,posix_lock|no_posix_lock] [--thread-pool-size=N] [-d]

with N an already-listening unix socket it passes, commas in DIR doubled,
stdout/stderr on its log file; it daemonizes the process itself. Other
launchers use virtiofsd's separate options (--socket-path, --shared-dir,
--cache, --xattr, --sandbox, --announce-submounts, ...). Each option is mapped
to `actorfs serve`'s, or ignored with one log line saying why; an unknown
option is an error, as it is for virtiofsd. Like virtiofsd, it serves one
frontend and exits when it disconnects.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("actorfs.virtiofsd")

CACHE = {"none": "never", "never": "never", "auto": "auto", "always": "always",
         "metadata": "auto"}  # fmt: skip
LOG_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning",
              "warning": "warning", "err": "error", "error": "error", "off": "error"}  # fmt: skip

# Separate options that take a value, and why the ignored ones do not apply.
VALUE_OPTIONS = {"--fd", "--socket-path", "--shared-dir", "--cache", "--sandbox",
                 "--thread-pool-size", "--log-level", "--tag", "--socket-group", "--seccomp",
                 "--rlimit-nofile", "--xattrmap", "--modcaps", "--translate-uid",
                 "--translate-gid", "--uid-map", "--gid-map", "--migration-mode",
                 "--migration-on-error", "--migration-verify-handles",
                 "--migration-confirm-paths", "--inode-file-handles"}  # fmt: skip
IGNORED = {
    "sandbox": "actorfs confines paths to the shared directory itself (openat2 RESOLVE_BENEATH)",
    "thread-pool-size": "actorfs sizes its blocking-call pool itself",
    "thread_pool_size": "actorfs sizes its blocking-call pool itself",
    "socket-group": "the socket is created by the launcher or owned by the daemon's user",
    "seccomp": "no seccomp filter is installed",
    "rlimit-nofile": "actorfs raises its fd limit to what is allowed",
    "announce-submounts": "submounts are served as directories of the shared tree",
    "announce_submounts": "submounts are served as directories of the shared tree",
    "posix-acl": "ACLs are served as the xattrs they are",
    "posix_acl": "ACLs are served as the xattrs they are",
    "no_posix_acl": "ACLs are served as the xattrs they are",
    "inode-file-handles": "actorfs keeps an O_PATH fd per inode",
    "xattr": "extended attributes are always served",
    "no_xattr": "extended attributes are always served",
    "xattrmap": "no xattr name mapping",
    "flock": "locks are the guest kernel's (no remote flock)",
    "no_flock": "locks are the guest kernel's (no remote flock)",
    "posix_lock": "locks are the guest kernel's (no remote POSIX locks)",
    "no_posix_lock": "locks are the guest kernel's (no remote POSIX locks)",
    "modcaps": "capabilities are left as they are",
    "syslog": "logs go to stderr (the launcher's log file or the journal)",
    "foreground": "always in the foreground; the launcher daemonizes",
    "f": "always in the foreground; the launcher daemonizes",
    "norace": "not applicable",
    "readdirplus": "READDIRPLUS is always offered",
    "no_readdirplus": "READDIRPLUS is always offered",
    "no-readdirplus": "READDIRPLUS is always offered",
    "timeout": "cache timeouts follow the cache mode",
    "writeback": "writeback caching is the guest's choice over virtio-fs",
    "no_writeback": "writeback caching is the guest's choice over virtio-fs",
    "allow-direct-io": "direct I/O from the guest is served",
    "allow_direct_io": "direct I/O from the guest is served",
    "no_allow_direct_io": "direct I/O from the guest is served",
    "killpriv-v2": "setuid/setgid bits are cleared on write as the kernel does",
    "killpriv_v2": "setuid/setgid bits are cleared on write as the kernel does",
    "no-killpriv-v2": "setuid/setgid bits are cleared on write as the kernel does",
    "no_killpriv_v2": "setuid/setgid bits are cleared on write as the kernel does",
    "security-label": "security labels are served as the xattrs they are",
    "preserve-noatime": "O_NOATIME is not passed through",
    "allow-mmap": "DAX is set with --dax-size through actorfs serve",
    "translate-uid": "ids are served unmapped",
    "translate-gid": "ids are served unmapped",
    "uid-map": "ids are served unmapped",
    "gid-map": "ids are served unmapped",
    "migration-mode": "migration is not supported",
    "migration-on-error": "migration is not supported",
    "migration-verify-handles": "migration is not supported",
    "migration-confirm-paths": "migration is not supported",
}


class UsageError(Exception):
    pass


def split_o(text: str) -> list[str]:
    """Split a -o list on commas; a doubled comma is a literal one (libvirt escapes paths so)."""
    out, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return [o for o in out if o]


def translate(argv: list[str]) -> tuple[list[str], list[str]]:
    """virtiofsd's argv -> (`actorfs serve` argv, log lines for what was ignored)."""
    src = socket = fd = cache = tag = None
    level = "info"
    read_only = unsealed = False
    notes: list[str] = []

    def ignore(name: str, shown: str) -> None:
        notes.append(f"ignoring {shown}: {IGNORED[name]}")

    def option(name: str, value: str | None, shown: str) -> None:
        nonlocal src, cache, level
        if name == "source":
            src = value
        elif name == "cache":
            if value not in CACHE:
                raise UsageError(f"{shown}: cache must be one of {', '.join(CACHE)}")
            if value == "metadata":
                notes.append(f"{shown}: served as cache=auto")
            cache = CACHE[value]
        elif name == "log_level":
            if value not in LOG_LEVELS:
                raise UsageError(f"{shown}: unknown log level")
            level = LOG_LEVELS[value]
        elif name == "debug":
            level = "debug"
        elif name in IGNORED:
            ignore(name, shown)
        else:
            raise UsageError(f"unknown option {shown}")

    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "-o" or (a.startswith("-o") and not a.startswith("--")):
            if a == "-o":
                if i >= len(argv):
                    raise UsageError("-o needs a value")
                text, i = argv[i], i + 1
            else:
                text = a[2:]
            for o in split_o(text):
                name, eq, value = o.partition("=")
                option(name, value if eq else None, f"-o {o}")
            continue
        if a in ("-d", "--debug"):
            level = "debug"
            continue
        if a in ("-f", "--foreground"):
            ignore("foreground", a)
            continue
        if a in ("-V", "--version"):
            raise SystemExit(_version())
        if a in ("-h", "--help"):
            print(__doc__.strip())
            raise SystemExit(0)
        if not a.startswith("--"):
            raise UsageError(f"unexpected argument {a!r}")
        name, eq, value = a[2:].partition("=")
        if not eq and "--" + name in VALUE_OPTIONS and name != "inode-file-handles":
            if i >= len(argv):
                raise UsageError(f"{a} needs a value")
            value, i = argv[i], i + 1
        shown = f"--{name}" + (f"={value}" if value else "")
        if name == "fd":
            fd = value
        elif name == "socket-path":
            socket = value
        elif name == "shared-dir":
            src = value
        elif name == "cache":
            option("cache", value, shown)
        elif name == "log-level":
            option("log_level", value, shown)
        elif name == "tag":
            tag = value
        elif name == "readonly":
            read_only = True
        elif name == "allow-unsealed-memory":  # actorfs's own (memory-backend-file guests)
            unsealed = True
        elif name == "print-capabilities":
            return ["serve", "--print-capabilities"], notes
        elif name in IGNORED:
            ignore(name, shown)
        else:
            raise UsageError(f"unknown option {shown}")
    if src is None:
        raise UsageError("no shared directory: pass -o source=DIR or --shared-dir DIR")
    if (socket is None) == (fd is None):
        raise UsageError("pass one of --fd=N (a listening socket) or --socket-path=PATH")
    out = ["serve", "--once", "--log-level", level]
    if fd is not None:
        out += ["--fd", fd]
    else:
        assert socket is not None  # just checked: exactly one of --fd, --socket-path
        out += ["--socket", socket]
    if cache is not None:
        out += ["--cache", cache]
    if read_only:
        out.append("--read-only")
    if unsealed:
        out.append("--allow-unsealed-memory")
    if tag is not None:
        notes.append(f"--tag={tag}: the tag is the VMM's (vhost-user-fs-pci tag=)")
    out.append(src)
    return out, notes


def _version() -> int:
    from importlib import metadata

    try:
        print(f"actorfs-virtiofsd {metadata.version('actorfs')}")
    except metadata.PackageNotFoundError:
        print("actorfs-virtiofsd (not installed)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from actorfs.runtime.cli import main as cli

    argv = sys.argv[1:] if argv is None else argv
    try:
        serve_argv, notes = translate(argv)
    except UsageError as exc:
        print(f"actorfs-virtiofsd: error: {exc}", file=sys.stderr, flush=True)
        return 2
    level = "info"
    if "--log-level" in serve_argv:
        level = serve_argv[serve_argv.index("--log-level") + 1]
    cli.setup_logging(False, level)
    log.info("started as: actorfs-virtiofsd %s", " ".join(argv))
    for line in notes:
        log.info("%s", line)
    return cli.main(serve_argv)


if __name__ == "__main__":
    sys.exit(main())
