"""The command line at the top: `actorfs` (mount, serve, stats), the
virtiofsd-compatible `actorfs-virtiofsd`, mount(8) helper translation,
the stats socket, the stats view and sd_notify.
"""
