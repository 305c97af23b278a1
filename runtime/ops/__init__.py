"""The op layer: one function per FUSE operation on a Filesystem (the inode,
handle, watcher and DAX actors plus their configuration), with credentials,
directory streams and symlink following. Knows nothing of the wire format.
"""
