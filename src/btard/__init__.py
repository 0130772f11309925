"""btard: Byzantine-tolerant all-reduce for collaborative training (BTARD-SGD)."""

__version__ = "0.1.0"
