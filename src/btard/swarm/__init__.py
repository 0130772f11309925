"""btard.swarm."""
