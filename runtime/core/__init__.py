"""The bottom layer: the actor base, the supervisor, the blocking pool, eager
starts, and the shared vocabulary every layer uses (FsError and the errno map,
the Attr/Entry value types). Imports nothing else from actorfs.
"""
