"""actorfs runtime: what moves requests between a client and the actors."""
