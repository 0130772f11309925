"""btard.transport: moving signed protocol messages between peers named by their Ed25519 public keys.

- :mod:`btard.transport.base`: the :class:`Transport` interface, errors, framing constants.
- :mod:`btard.transport.records`: signed records binding a protocol id to a transport address.
- :mod:`btard.transport.p2p`: :class:`P2PTransport` over hivemind's libp2p daemon, with DHT discovery.

``P2PTransport`` and ``P2PConfig`` are imported lazily: hivemind (and with it torch) loads only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from btard.transport.base import (
    Incoming,
    LocalAddress,
    MessageRejected,
    MessageTooLarge,
    PeerUnreachable,
    Transport,
    TransportClosed,
    TransportError,
)
from btard.transport.records import PeerRecord, RecordError, Signer

if TYPE_CHECKING:
    from btard.transport.p2p import P2PConfig, P2PTransport

__all__ = [
    "Incoming",
    "LocalAddress",
    "MessageRejected",
    "MessageTooLarge",
    "P2PConfig",
    "P2PTransport",
    "PeerRecord",
    "PeerUnreachable",
    "RecordError",
    "Signer",
    "Transport",
    "TransportClosed",
    "TransportError",
]


def __getattr__(name: str) -> Any:
    if name in ("P2PConfig", "P2PTransport"):
        from btard.transport import p2p

        return getattr(p2p, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
