"""btard.sim."""
