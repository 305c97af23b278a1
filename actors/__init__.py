"""actorfs actors: single-owner state, one module each."""
