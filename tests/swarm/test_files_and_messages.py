"""The swarm's own formats, without a network: signed genesis messages and checkpoints."""

from __future__ import annotations

import json
import time

import msgpack
import numpy as np
import pytest
import torch

from btard.crypto import Identity
from btard.protocol.peer import GENESIS
from btard.swarm.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from btard.swarm.control import (
    CONTROL_MAGIC,
    PING,
    ControlError,
    Genesis,
    Hello,
    decode_control,
    encode_genesis,
    encode_hello,
)


def _ids(n: int) -> list[Identity]:
    return [Identity.from_seed(bytes([i]) * 32) for i in range(n)]


def _genesis(coordinator: Identity, ids: list[bytes], **kw) -> Genesis:
    fields = dict(
        coordinator=coordinator.peer_id,
        run_name="run-1",
        run_id=b"r" * 16,
        task='["digits",{}]',
        dim=4810,
        step=0,
        r_prev=GENESIS,
        params_hash=b"h" * 32,
        members=tuple(sorted(ids)),
        validators=(),
        phase_timeout=1.5,
        num_validators=1,
        start_at=time.time(),
    )
    fields.update(kw)
    return Genesis(**fields)


def test_genesis_roundtrip_and_protocol_config():
    ids = _ids(3)
    members = [i.peer_id for i in ids]
    g = _genesis(ids[0], members, validators=((members[1], members[2]),))
    back = decode_control(encode_genesis(g, ids[0]))
    assert back == g
    cfg = back.protocol_config()
    assert (cfg.run_id, cfg.dim, cfg.phase_timeout, cfg.validators) == (b"r" * 16, 4810, 1.5, 1)
    assert decode_control(encode_hello("run-1", members[1])) == Hello("run-1", members[1])
    assert decode_control(PING) is None


def test_forged_or_malformed_control_messages_are_rejected():
    ids = _ids(3)
    members = [i.peer_id for i in ids]
    raw = encode_genesis(_genesis(ids[0], members), ids[0])
    with pytest.raises(ValueError):  # only the coordinator can sign its genesis
        encode_genesis(_genesis(ids[0], members), ids[1])
    body, sig = msgpack.unpackb(raw[5:])
    tampered = body.replace(b"run-1", b"run-2")
    bad = [
        CONTROL_MAGIC + bytes([2]) + msgpack.packb([tampered, sig]),  # edited after signing
        CONTROL_MAGIC + bytes([2]) + msgpack.packb([body, bytes(64)]),  # wrong signature
        CONTROL_MAGIC + bytes([2]) + b"\xc1garbage",
        CONTROL_MAGIC + bytes([9]) + msgpack.packb([]),  # unknown kind
        CONTROL_MAGIC + bytes([1]) + msgpack.packb(["run", b"short"]),
        CONTROL_MAGIC + bytes([1]) + msgpack.packb([msgpack.ExtType(1, b"x"), bytes(32)]),
        CONTROL_MAGIC + bytes([2]) + bytes(10**6),  # oversized
        b"BTRD" + raw[4:],  # not a control message
    ]
    for payload in bad:
        with pytest.raises(ControlError):
            decode_control(payload)
    for kw in ({"phase_timeout": 0.0}, {"phase_timeout": 1e9}, {"members": (members[0], members[0])}):
        with pytest.raises(ControlError):
            decode_control(encode_genesis(_genesis(ids[0], members, **kw), ids[0]))
    outsider = Identity.from_seed(b"x" * 32).peer_id
    with pytest.raises(ControlError, match="validators must be members"):
        decode_control(
            encode_genesis(_genesis(ids[0], members, validators=((outsider, members[0]),)), ids[0])
        )


def _checkpoint(step: int = 7) -> Checkpoint:
    g = torch.Generator().manual_seed(step)
    members = tuple(sorted(i.peer_id for i in _ids(3)))
    return Checkpoint(
        step=step,
        params=torch.randn(100, generator=g),
        optimizer={"momentum_buffer": torch.randn(100, generator=g)},
        r_prev=b"r" * 32,
        members=members,
        validators={members[0]: members[1]},
        run_id=b"i" * 16,
        run_name="run-1",
        task='["digits",{}]',
        phase_timeout=2.0,
        num_validators=1,
    )


def test_checkpoint_roundtrip_is_exact(tmp_path):
    ckpt = _checkpoint()
    path = save_checkpoint(ckpt, tmp_path / "checkpoints")
    assert path.name == "step_00000007" and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    save_checkpoint(_checkpoint(3), tmp_path / "checkpoints")
    assert latest_checkpoint(tmp_path) == path  # the newest by step, found under <dir>/checkpoints
    back = load_checkpoint(tmp_path)
    assert back.digest() == ckpt.digest() and back.params_hash == ckpt.params_hash
    assert torch.equal(back.params, ckpt.params)
    assert torch.equal(back.optimizer["momentum_buffer"], ckpt.optimizer["momentum_buffer"])
    assert (back.members, back.validators, back.r_prev, back.step) == (
        ckpt.members,
        ckpt.validators,
        ckpt.r_prev,
        ckpt.step,
    )
    # Whoever writes the same state writes the same checkpoint.
    assert json.loads((path / "state.json").read_text())["digest"] == _checkpoint().digest()


def test_edited_or_pickled_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(_checkpoint(), tmp_path)
    params = np.load(path / "params.npy")
    params[0] += 1.0
    np.save(path / "params.npy", params)
    with pytest.raises(ValueError, match="digest"):
        load_checkpoint(path)
    # An object array needs pickle to load: refused before anything runs.
    np.save(path / "params.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing-here")


def test_adam_state_travels_in_a_state_message_and_hashes_the_same():
    import torch

    from btard.crypto import training_state_digest
    from btard.swarm.peer import _wire_optimizer
    from btard.training.optim import AdamConfig, make_optimizer

    opt = make_optimizer(AdamConfig(1e-3))
    p, g = torch.randn(10), torch.randn(10)
    for t in range(3):
        p = opt.step(p, g, t)
    wire = _wire_optimizer(sorted(opt.state_dict().items()))
    loaded = {k: torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(s) for k, s, raw in wire}
    again = make_optimizer(AdamConfig(1e-3))
    again.load_state_dict(loaded)
    assert int(again.state_dict()["step"]) == 3
    assert training_state_digest(p, again.state_dict()) == training_state_digest(p, opt.state_dict())


def test_ban_explanations_are_looked_up_by_code():
    from btard.protocol.events import BanReason
    from btard.swarm.launcher import EXPLANATIONS, explain

    assert set(EXPLANATIONS) == set(BanReason)  # every reason a verdict can carry is explained
    assert "validator" in explain({"code": "validation", "reason": "anything"})
    assert explain({"reason": "no code: an older metrics line"}) == ""
