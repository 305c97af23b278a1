"""The FUSE wire layer: the sans-IO protocol (every struct layout once), the
dispatcher that decodes a request, calls the op layer and encodes the reply,
kernel notifications and per-op stats. Transport-independent.
"""
