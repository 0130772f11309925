"""btard.protocol."""
