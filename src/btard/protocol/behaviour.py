"""`Behaviour`: the hooks through which a peer decides what to send. Honest by default; protocol attacks
(`btard.attacks.protocol`) subclass it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from btard.protocol.messages import Message, Reason, Signed
from btard.protocol.state import Phase

if TYPE_CHECKING:
    from btard.protocol.peer import BtardPeer


class Behaviour:
    """Honest behaviour. Protocol attacks subclass it and override hooks (see btard.attacks.protocol).

    Each hook receives the peer and returns what an honest peer would send; an attack returns something else.
    """

    def gradient(self, peer: BtardPeer, g: torch.Tensor) -> torch.Tensor:
        return g

    def commit_hashes(self, peer: BtardPeer, hashes: list[bytes]) -> list[bytes]:
        return hashes

    def grad_part(self, peer: BtardPeer, j: int, dest: bytes, part: torch.Tensor) -> torch.Tensor | None:
        return part

    def aggregate(self, peer: BtardPeer, j: int, dest: bytes, agg: torch.Tensor) -> torch.Tensor:
        return agg

    def agg_commit_value(self, peer: BtardPeer, j: int, agg: torch.Tensor) -> torch.Tensor:
        return agg

    def projections(
        self, peer: BtardPeer, norms: np.ndarray, projs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return norms, projs

    def mprng_reveal(self, peer: BtardPeer, secret: bytes) -> bytes | None:
        return secret

    def extra_messages(
        self, peer: BtardPeer, phase: Phase
    ) -> list[tuple[Message | bytes, tuple[bytes, ...]]]:
        """Additional messages to send when entering `phase` (signed by the peer unless given as bytes)."""
        return []

    def answers_pulls(self, peer: BtardPeer) -> bool:
        return True

    def should_accuse(self, peer: BtardPeer, accused: bytes, reason: Reason) -> bool:
        """Whether to publish an accusation the honest protocol calls for (colluders cover each other)."""
        return True

    def accept(self, peer: BtardPeer, s: Signed) -> bool:
        """Whether to process an incoming valid message (an attack may pretend it never arrived)."""
        return True
