"""The DAX window above the actors: the channel that maps files into the shared
window, the guest-side receiver, and the SETUPMAPPING/REMOVEMAPPING ops.
"""
