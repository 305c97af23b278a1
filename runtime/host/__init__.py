"""Host-side helpers below the actors: raw syscalls (openat2, file handles,
xattrs), inotify, the shared-memory view, fd limits and the backing-filesystem
probe. Imports only core.
"""
