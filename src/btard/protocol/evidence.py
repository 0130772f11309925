"""Proofs: pure functions that decide what a signed accusation proves, from the step it is about.

Every function here is a pure function of its arguments (signed messages, a `StepView` of the step the evidence
is about, the run's configuration), so every honest peer, and `btard audit` offline, reaches the same result on
the same agreed items. Nothing here reads a clock, a socket or a peer's private state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from btard.crypto import bytes_digest, digest
from btard.protocol import checks
from btard.protocol.config import ProtocolConfig
from btard.protocol.errors import MalformedMessage
from btard.protocol.messages import Accuse, GradPart, Kind, Limits, Message, Proj, Reason, Signed, decode
from btard.protocol.state import CONTENT_KINDS

# Accusations by a part's aggregator that remove a sender from the part's required inputs (its signed part for
# that step is bad: not the committed one, non-finite, mis-shaped, or one of two versions).
PART_REASONS = (Reason.COMMIT_MISMATCH, Reason.NONFINITE, Reason.BAD_SHAPE, Reason.EQUIVOCATION)
# Accusations whose evidence, when proven, makes a part's published aggregate void.
VOID_REASONS = (Reason.EQUIVOCATION, Reason.BAD_SHAPE, Reason.NONFINITE)


@dataclass(frozen=True)
class StepView:
    """One step as evidence about it is checked: its parts, commits, aggregated parts and projection vectors."""

    step: int
    bounds: list[tuple[int, int]]
    commits: Mapping[bytes, Signed]
    agg_part: Callable[[int], torch.Tensor | None]
    z: Callable[[int], torch.Tensor]


@functools.lru_cache(maxsize=4096)
def mprng_digest(run_id: bytes, step: int, sender: bytes, secret: bytes) -> bytes:
    """The MPRNG commitment H(t, sender, secret)."""
    return digest("mprng", run_id, step, sender, secret)


def shape_problem(m: Message, nparts: int, num_projections: int) -> str | None:
    """What makes a commit or report unfit for a step with `nparts` parts (None: it fits). Parts are checked
    against their commits by their aggregator."""
    if m.kind == Kind.GRAD_COMMIT and len(m.part_hashes) != nparts:
        return f"{len(m.part_hashes)} part hashes for {nparts} parts"
    if m.kind == Kind.PROJ:
        if m.norms.shape[0] != nparts:
            return f"{m.norms.shape[0]} rows for {nparts} parts"
        if m.num_projections != num_projections:
            return f"{m.num_projections} projections per part, expected {num_projections}"
    return None


def about_grad_part(a: Accuse, limits: Limits) -> bool:
    """Whether the accusation's last evidence item is a gradient part (not a malformed commit or report)."""
    try:
        return bool(a.evidence) and decode(a.evidence[-1], limits).msg.kind == Kind.GRAD_PART
    except MalformedMessage:
        return False


def proj_entry_ok(
    cfg: ProtocolConfig, proj: Proj, j: int, part: GradPart, agg: torch.Tensor, z: torch.Tensor, nparts: int
) -> bool:
    """Whether `proj`'s row j matches (‖part − agg‖, ⟨z, part − agg⟩) recomputed from the signed part."""
    if proj.norms.shape[0] != nparts or proj.num_projections != cfg.num_projections:
        return False
    return checks.projection_report_matches(
        (float(proj.norms[j]), proj.projections[j]), checks.project(part.tensor(), agg, z)
    )


def proves(cfg: ProtocolConfig, a: Accuse, ev: list[Signed], v: StepView) -> bool:
    """Whether the decoded evidence `ev` proves accusation `a` about the step `v` (not VALIDATION: that needs
    the model, see `decision.Resolver`)."""
    if any(e.msg.step != v.step for e in ev):
        return False
    r, nparts, run = a.reason, len(v.bounds), cfg.run_id

    def part_len(j: int) -> int:
        return v.bounds[j][1] - v.bounds[j][0]

    if r == Reason.EQUIVOCATION and len(ev) == 2:
        m1, m2 = ev[0].msg, ev[1].msg
        if m1.kind == m2.kind and m1.slot() == m2.slot() and m1.kind in CONTENT_KINDS:
            return ev[0].msg_digest != ev[1].msg_digest
        if {m1.kind, m2.kind} == {Kind.AGG_COMMIT, Kind.AGG_PART} and m1.part == m2.part:
            c, p = (m1, m2) if m1.kind == Kind.AGG_COMMIT else (m2, m1)
            return bytes_digest("agg-part", run, v.step, p.sender, p.part, p.data) != c.agg_hash
        return False
    if r == Reason.COMMIT_MISMATCH and len(ev) == 2:
        c, p = ev[0].msg, ev[1].msg
        if c.kind != Kind.GRAD_COMMIT or p.kind != Kind.GRAD_PART or p.part != a.part:
            return False
        if len(c.part_hashes) != nparts:
            return True
        if not 0 <= p.part < nparts:
            return False
        return bytes_digest("grad-part", run, v.step, p.sender, p.part, p.data) != c.part_hashes[p.part]
    if r == Reason.BAD_SHAPE and len(ev) == 1 and ev[0].msg.kind in (Kind.GRAD_COMMIT, Kind.PROJ):
        return shape_problem(ev[0].msg, nparts, cfg.num_projections) is not None
    if r in (Reason.NONFINITE, Reason.BAD_SHAPE) and len(ev) == 1:
        p = ev[0].msg
        if p.kind not in (Kind.GRAD_PART, Kind.AGG_PART) or not 0 <= p.part < nparts:
            return False
        if r == Reason.BAD_SHAPE:
            return len(p.data) // 4 != part_len(p.part)
        return not np.isfinite(np.frombuffer(p.data, dtype="<f4")).all()
    if r == Reason.MPRNG_MISMATCH and len(ev) == 2:
        c, rv = ev[0].msg, ev[1].msg
        if c.kind != Kind.MPRNG_COMMIT or rv.kind != Kind.MPRNG_REVEAL:
            return False
        return mprng_digest(run, v.step, a.accused, rv.secret) != c.commitment
    if r == Reason.WRONG_PROJECTION and len(ev) == 2:
        p, pr = ev[0].msg, ev[1].msg
        if p.kind != Kind.GRAD_PART or pr.kind != Kind.PROJ or p.part != a.part:
            return False
        if not 0 <= p.part < nparts or len(p.data) // 4 != part_len(p.part):
            return False
        commit = v.commits.get(a.accused)
        if commit is None or commit.msg.part_hashes[p.part : p.part + 1] != (
            bytes_digest("grad-part", run, v.step, p.sender, p.part, p.data),
        ):
            return False  # the part must be the committed one
        agg = v.agg_part(p.part)
        if agg is None:
            return False
        return not proj_entry_ok(cfg, pr, p.part, p, agg, v.z(p.part), nparts)
    return False


def decoded_evidence(a: Accuse, cfg: ProtocolConfig) -> list[Signed] | None:
    """The accusation's evidence, decoded and verified, if all of it is signed by the accused in this run."""
    try:
        ev = [decode(raw, cfg.limits) for raw in a.evidence]
    except MalformedMessage:
        return None
    if any(e.msg.sender != a.accused or e.msg.run_id != cfg.run_id for e in ev):
        return None
    return ev


def resolve(
    cfg: ProtocolConfig,
    s: Signed,
    step: int,
    views: Callable[[int], StepView | None],
    validation: Callable[[Accuse, list[Signed]], bool | None],
) -> bytes | None:
    """Who accusation `s` (agreed in step `step`) bans: the accused if its evidence proves it, otherwise the
    accuser; None when it proves nothing either way (a self-accusation, or about a step that can no longer be
    checked: an accusation carried too long is dropped, never held against its honest maker).

    `views(t)` gives the view of step t (None if gone); `validation(a, ev)` decides a validator's accusation
    (True: proven, False: not, None: cannot be decided here)."""
    a: Accuse = s.msg
    if a.sender == a.accused:
        return None
    if a.reason == Reason.VALIDATION:
        if a.about_step != step - 1:
            return None
    elif a.about_step not in (step, step - 1) or views(a.about_step) is None:
        return None
    ev = decoded_evidence(a, cfg)
    if ev is None:
        return a.sender
    if a.reason == Reason.VALIDATION:
        proven = validation(a, ev)
        if proven is None:
            return None
    else:
        proven = proves(cfg, a, ev, views(a.about_step))
    return a.accused if proven else a.sender
