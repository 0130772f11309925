"""The transport interface that the swarm peer talks to.

A transport moves opaque byte strings between peers named by their *protocol id* (a 32-byte Ed25519 public
key). It authenticates nothing about the payload: every protocol message is signed and verified one layer up.
What it does guarantee:

* ``send`` returns only after the receiver's transport has accepted the whole message (acknowledged), and
  raises :class:`PeerUnreachable` otherwise (lookup failure, connection failure, timeout, peer closed).
  Delivery is at-least-once: if a reused connection breaks between delivery and acknowledgement, the message
  is resent on a fresh one, so the receiver must tolerate duplicates (signed messages are idempotent anyway).
  Conversely a ``PeerUnreachable`` after a timeout does not prove that the message was not delivered.
* Sizes are bounded before anything is allocated: every message is length-prefixed and a receiver rejects a
  frame whose announced length exceeds its ``max_message_bytes`` after reading only the 9-byte header.
* Incoming messages are pulled with ``await transport.recv()`` (a bounded queue: a slow consumer slows the
  senders down instead of growing memory without limit).

All methods are coroutines bound to the event loop that created the transport; call them from that loop only.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

PROTOCOL_ID_BYTES = 32  # an Ed25519 public key

# Frame layout (both directions are in network byte order):
#   message frame  = KIND_MESSAGE (1 byte) | payload length (8 bytes, big-endian) | payload
#   acknowledgement = one status byte, sent by the receiver once the frame is queued or rejected.
FRAME_HEADER_BYTES = 9
KIND_MESSAGE = 0x01
STATUS_OK = 0x00
STATUS_TOO_LARGE = 0x01
STATUS_BAD_FRAME = 0x02
STATUS_CLOSING = 0x03


class TransportError(Exception):
    """Base class of every error the transport raises."""


class TransportClosed(TransportError):
    """The local transport is closed (or closing); nothing more can be sent or received."""


class PeerUnreachable(TransportError):
    """The destination could not be found, connected to, or did not acknowledge in time."""

    def __init__(self, dest: bytes, reason: str):
        super().__init__(f"peer {dest.hex()[:16]}… unreachable: {reason}")
        self.dest = dest
        self.reason = reason


class MessageTooLarge(TransportError, ValueError):
    """A local payload exceeds this transport's ``max_message_bytes`` (our own mistake, nothing was sent)."""


class MessageRejected(TransportError):
    """The receiver refused the message (too large for its limit, malformed frame, or it is shutting down)."""

    def __init__(self, dest: bytes, status: int):
        names = {STATUS_TOO_LARGE: "too large", STATUS_BAD_FRAME: "bad frame", STATUS_CLOSING: "closing"}
        super().__init__(f"peer {dest.hex()[:16]}… rejected the message: {names.get(status, status)}")
        self.dest = dest
        self.status = status


class Incoming(NamedTuple):
    """One received message. ``sender`` is transport-level (for libp2p: the authenticated libp2p peer id
    bytes of the connection it came on); it is *not* a protocol identity, which only signatures establish."""

    sender: bytes
    payload: bytes


@dataclass(frozen=True)
class LocalAddress:
    """How other peers reach this one: protocol id, transport peer id and listen addresses."""

    protocol_id: bytes
    transport_id: bytes
    maddrs: tuple[str, ...]


def check_protocol_id(protocol_id: bytes) -> bytes:
    """Return ``protocol_id`` if it is 32 bytes, raise ``ValueError`` otherwise."""
    if not isinstance(protocol_id, bytes | bytearray) or len(protocol_id) != PROTOCOL_ID_BYTES:
        raise ValueError(
            f"a protocol id is a {PROTOCOL_ID_BYTES}-byte Ed25519 public key, got {protocol_id!r}"
        )
    return bytes(protocol_id)


class Transport(abc.ABC):
    """Abstract asyncio transport between protocol ids. See the module docstring for the guarantees."""

    max_message_bytes: int

    @property
    @abc.abstractmethod
    def local_address(self) -> LocalAddress:
        """This peer's address as others should use it."""

    @abc.abstractmethod
    async def send(self, dest: bytes, payload: bytes) -> None:
        """Deliver ``payload`` to ``dest`` (a protocol id); return once the receiver acknowledged it.

        Sending to our own protocol id puts the message straight into our own receive queue.
        Raises :class:`MessageTooLarge` (local limit), :class:`MessageRejected` (receiver refused) or
        :class:`PeerUnreachable` (everything else that went wrong on the way)."""

    async def broadcast(self, dests: Iterable[bytes], payload: bytes) -> dict[bytes, TransportError]:
        """Send ``payload`` to every destination concurrently; return the failures by destination.

        Never raises for a single peer's failure: an empty dict means everyone acknowledged."""
        targets = list(dict.fromkeys(dests))
        results = await asyncio.gather(*(self.send(d, payload) for d in targets), return_exceptions=True)
        failures: dict[bytes, TransportError] = {}
        for dest, result in zip(targets, results):
            if isinstance(result, TransportError):
                failures[dest] = result
            elif isinstance(result, BaseException):
                raise result  # a bug or a cancellation, not a network failure: do not hide it
        return failures

    @abc.abstractmethod
    async def recv(self) -> Incoming:
        """Wait for the next incoming message; raise :class:`TransportClosed` once the transport is closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop accepting and sending messages and release every resource (idempotent)."""

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
