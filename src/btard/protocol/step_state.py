"""`StepState`: everything a peer keeps for one step only. `BtardPeer.begin_step` makes a fresh one, so nothing
of a step can leak into the next (the previous step's messages that a slower peer may still pull are kept
apart, in `BtardPeer._prev`)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from btard.protocol.agreement import PhaseAgreement
from btard.protocol.messages import Kind, Signed


@dataclass
class StepState:
    # What was received and agreed.
    slots: dict[tuple, Signed] = field(default_factory=dict)  # (kind, sender, index) -> first/agreed version
    versions: dict[tuple, list[Signed]] = field(default_factory=dict)  # slot -> versions received (bounded)
    accusations: dict[bytes, Signed] = field(default_factory=dict)
    # Public items (JOIN, LEAVE, public re-send requests and the parts re-sent): agreed in the ACCUSE phase.
    public: dict[bytes, Signed] = field(default_factory=dict)
    equivocated: dict[tuple, tuple[Signed, Signed]] = field(
        default_factory=dict
    )  # agreed slots, two versions
    agreed_all: set[bytes] = field(default_factory=set)  # the agreed items of the phases closed so far
    own: dict[Kind, dict[object, Signed]] = field(default_factory=dict)  # what this peer signed
    accused_slots: set[tuple] = field(default_factory=set)
    accusations_from: dict[bytes, int] = field(default_factory=lambda: defaultdict(int))
    # The running phase and its agreement.
    t0: float = 0.0
    expect: set[tuple] = field(default_factory=set)
    missing: set[tuple] = field(default_factory=set)  # the slots of `expect` not filled yet
    ag: PhaseAgreement | None = None
    timed_out: set[bytes] = field(default_factory=set)  # members that missed a round deadline in this step
    round_versions: dict[tuple, int] = field(default_factory=dict)  # (sender, phase, round) -> count
    early_rounds: list[Signed] = field(default_factory=list)  # round messages of phases not begun yet
    pulled: set[tuple[bytes, bytes]] = field(default_factory=set)  # (item digest, holder) asked
    want_since: dict[bytes, float] = field(default_factory=dict)  # item digest -> first wanted
    pull_due: dict[bytes, float] = field(default_factory=dict)  # item digest -> next pull due
    repulled: set[bytes] = field(default_factory=set)
    live_cache: tuple[bytes, ...] | None = None
    # This peer's own work in the step.
    gradient: torch.Tensor | None = None
    params_hash: bytes = b""
    committed: tuple[bytes, ...] = ()
    aggregators: dict[int, bytes] = field(default_factory=dict)
    agg_cache: dict[int, torch.Tensor | None] = field(default_factory=dict)
    scatter_deadlines: list[float] = field(default_factory=list)
    my_parts_done: set[int] = field(default_factory=set)
    secret: bytes = b""
    clip_iters: int = 0
    clipped: int = 0
    r: bytes = b""
    bounds: list[tuple[int, int]] = field(default_factory=list)
    order: list[bytes] = field(default_factory=list)
