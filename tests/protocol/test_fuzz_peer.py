"""Whatever a member sends (validly signed, any field values, at any point of a step), an honest peer never
crashes, no honest peer is banned, and the honest peers still agree."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btard.protocol.messages import encode

from .conftest import make_swarm
from .test_messages import RUN, messages


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(messages(), min_size=1, max_size=8), st.integers(1, 30))
def test_arbitrary_signed_messages_from_a_member_never_crash_a_peer(msgs, when):
    swarm = make_swarm(4, seed=1, validators=1)
    liar = swarm.harness.peers[swarm.ids[3]]
    swarm.honest.remove(liar.id)
    crafted = []
    for i, m in enumerate(msgs):  # re-sign each message as the liar, for this run, at step 0 or 1
        fields = {k: getattr(m, k) for k in m.__dataclass_fields__ if k != "kind"}
        fields.update(run_id=RUN, sender=liar.id, step=i % 2)
        crafted.append(encode(type(m)(**fields), liar.identity).raw)
    state = {"sends": 0, "injected": False}
    others = tuple(p for p in swarm.ids if p != liar.id)

    def on_send(src, ev):
        if src == liar.id:
            state["sends"] += 1
            if state["sends"] == when:  # the liar's when-th message of the run: inject right after it
                state["injected"] = True
                for raw in crafted:
                    swarm.harness.network.send(liar.id, others, raw, swarm.harness.now)

    swarm.harness.on_send = on_send
    for _ in range(2):
        res = swarm.step()
        honest = [res[p] for p in swarm.honest]
        assert all(torch.equal(r.aggregate, honest[0].aggregate) for r in honest)
        assert all(r.verdicts == honest[0].verdicts for r in honest)
        assert not {v.banned for v in honest[0].verdicts} & set(swarm.honest)
    assert state["injected"]


def test_pulls_and_digests_naming_unknown_kinds_or_parts_are_rejected_not_fatal():
    from btard.protocol.messages import Digest, Pull

    swarm = make_swarm(4, seed=2, validators=0)
    liar = swarm.harness.peers[swarm.ids[3]]
    swarm.honest.remove(liar.id)
    weird = [
        Pull(RUN, 0, liar.id, 200, liar.id, 0, False),
        Pull(RUN, 0, liar.id, 2, liar.id, 999, True),
        Pull(RUN, 0, liar.id, 8, b"\x00" * 32, 0, True),
        Digest(RUN, 0, liar.id, 201, 2, ((3, liar.id, 0, b"h" * 32),)),
        Digest(RUN, 0, liar.id, 3, 2, ((3, liar.id, 999, b"h" * 32),)),
        Digest(RUN, 0, liar.id, 3, 99, ((201, liar.id, 0, b"h" * 32),), (b"s" * 32,)),
        Digest(RUN, 0, liar.id, 7, 1, ((8, liar.id, 0, b"h" * 32),), (b"s" * 32,)),
    ]
    raws = [encode(m, liar.identity).raw for m in weird]
    others = tuple(p for p in swarm.ids if p != liar.id)
    for raw in raws:
        swarm.harness.network.send(liar.id, others, raw, 0.0)
    res = swarm.step()
    honest = [res[p] for p in swarm.honest]
    assert all(torch.equal(r.aggregate, honest[0].aggregate) for r in honest)
    assert not honest[0].verdicts
