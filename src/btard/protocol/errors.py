"""Error types that say whose fault it is (after h11's Local/RemoteProtocolError)."""

from __future__ import annotations


class LocalProtocolError(RuntimeError):
    """We misused the API (a bug in the caller), never the peer's fault."""


class RemoteProtocolError(ValueError):
    """A peer sent something that violates the protocol. `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class MalformedMessage(RemoteProtocolError):
    """Bytes that do not decode to a valid, correctly signed message. Not attributable: no ban."""
