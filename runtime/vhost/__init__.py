"""The virtio-fs transport: the vhost-user protocol, virtqueues over guest
memory, the vhost-user-fs server (serve_vhost_user) and virtiofsd's
conventions (capabilities, the description file).
"""
