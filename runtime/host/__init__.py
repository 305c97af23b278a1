"""Host-side helpers below the actors: syscalls the os module lacks
(renameat2, fallocate modes, ...), fd ownership (OwnedFd), inotify, the shared-memory view, fd limits and the backing-filesystem
probe. Imports only core.
"""
