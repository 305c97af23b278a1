"""The /dev/fuse transport: mounting (mount(2) or fusermount3), the transport
loop that reads requests and writes replies, and MountedServer/mount(), the
embedding API for a kernel mount.
"""
