"""The parameters every peer of a run shares (`ProtocolConfig`) and the protocol's named limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from btard.protocol.errors import LocalProtocolError
from btard.protocol.messages import Limits

# A JOIN names the step its sender believes the run is at; older than this many steps, it is a replay.
JOIN_WINDOW = 8
# The phase timeout of step t+1 is max(the configured T, TIMEOUT_FACTOR × the median of the members' slowest
# phase in step t, as reported in their MPRNG commits), and at most TIMEOUT_GROWTH × the current one.
TIMEOUT_FACTOR = 4.0
TIMEOUT_GROWTH = 2.0


@dataclass(frozen=True)
class ProtocolConfig:
    """Parameters every peer of a run must share (they define what an honest peer does)."""

    run_id: bytes
    dim: int
    tau: float | str = "adaptive"
    lam: float = 1.0  # λ ≤ 1 keeps the adaptive τ's bias bounded whatever the attack size (aggregation docs)
    eps_rel: float = 1e-4
    max_iter: int = 1000
    num_projections: int = 4
    plausibility: float = 8.0
    validators: int = 1
    validation_rtol: float = 1e-4
    validation_mode: str = "tolerance"  # or "exact": compare hashes (homogeneous, bit-exact swarms)
    phase_timeout: float = 2.0  # T: the floor of the per-step timeout derived from measured phase times
    limits: Limits = field(default_factory=Limits)
    # Joining: at most this many new peers admitted per step (0 closes the run), each observing its first
    # step as a member, then contributing on probation (validated, not aggregated) for `probation_steps` steps.
    max_joins_per_step: int = 2
    probation_steps: int = 2
    # The number of Byzantine members the agreement tolerates (rounds R = f + 1 per barrier phase); None: an
    # honest majority, ⌊(n − 1)/2⌋. Agreement is proven only while at most this many members are Byzantine.
    max_faulty: int | None = None

    def __post_init__(self) -> None:
        if len(self.run_id) != 16:
            raise LocalProtocolError("run_id must be 16 bytes")
        if self.validation_mode not in ("tolerance", "exact"):
            raise LocalProtocolError("validation_mode is 'tolerance' or 'exact'")
        if self.max_joins_per_step < 0 or self.probation_steps < 0:
            raise LocalProtocolError("max_joins_per_step and probation_steps must be ≥ 0")
        if self.max_faulty is not None and self.max_faulty < 0:
            raise LocalProtocolError("max_faulty must be ≥ 0")
