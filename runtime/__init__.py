"""actorfs runtime (actorfs.runtime): what moves requests between a client and
the actors, in layers (bottom to top): core, host, [actorfs.actors], dax, ops,
fuse, then the two transports devfuse and vhost, then cli. See actorfs/__init__.py.
"""
