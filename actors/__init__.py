"""actorfs actors (actorfs.actors): single-owner state, one module each.

They sit above actorfs.runtime.core (the actor base) and actorfs.runtime.host,
and below the op layer; they never import the op layer or a transport.
"""
