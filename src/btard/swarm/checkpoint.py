"""Checkpoints of a swarm peer: x^t, the optimizer state and the protocol state at the start of step t.

Layout of one checkpoint (a directory ``step_<t>``)::

    params.npy          x^t, float32, shape (d,)
    opt-<key>.npy       one file per optimizer state tensor
    state.json          step, r^{t-1}, members and validators of step t, run id and settings, digests

Arrays are written with ``np.save(allow_pickle=False)`` and read with ``allow_pickle=False``: a checkpoint
from elsewhere can never run code. Honest peers of one run write identical checkpoints (same `digest`),
whoever wrote them, because nothing peer-specific is stored. Writes go to a temporary directory that is renamed
into place, so a crash never leaves a half-written checkpoint under its final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from btard.crypto import digest, params_digest

FORMAT = "btard-swarm-checkpoint/1"
_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")
_DIR = re.compile(r"step_(\d{8,})")


@dataclass(frozen=True)
class Checkpoint:
    """Everything a peer needs to continue a run at step ``step``."""

    step: int
    params: torch.Tensor
    optimizer: dict[str, torch.Tensor]
    r_prev: bytes
    members: tuple[bytes, ...]
    validators: dict[bytes, bytes]
    run_id: bytes
    run_name: str
    task: str
    phase_timeout: float
    num_validators: int

    @property
    def params_hash(self) -> bytes:
        return params_digest(self.params)

    def state(self) -> dict:
        return {
            "format": FORMAT,
            "step": self.step,
            "r_prev": self.r_prev.hex(),
            "members": [m.hex() for m in self.members],
            "validators": {v.hex(): t.hex() for v, t in sorted(self.validators.items())},
            "run_id": self.run_id.hex(),
            "run_name": self.run_name,
            "task": self.task,
            "phase_timeout": self.phase_timeout,
            "num_validators": self.num_validators,
            "params_hash": self.params_hash.hex(),
        }

    def digest(self) -> str:
        """One hex digest over the whole checkpoint (state, parameters, optimizer state)."""
        parts: list[bytes | str | int] = [json.dumps(self.state(), sort_keys=True)]
        for key in sorted(self.optimizer):
            parts += [key, self.optimizer[key].detach().contiguous().numpy().tobytes()]
        return digest("checkpoint", *parts).hex()


def save_checkpoint(ckpt: Checkpoint, root: str | Path) -> Path:
    """Write ``ckpt`` under ``root/step_<t>`` and return that directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{ckpt.step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.save(tmp / "params.npy", ckpt.params.detach().numpy(), allow_pickle=False)
    for key, t in ckpt.optimizer.items():
        if not _KEY.fullmatch(key):
            raise ValueError(f"optimizer state key {key!r} is not a plain identifier")
        np.save(tmp / f"opt-{key}.npy", t.detach().numpy(), allow_pickle=False)
    state = {**ckpt.state(), "digest": ckpt.digest()}
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else its newest ``step_*`` checkpoint (searching ``path`` and
    ``path/checkpoints``); FileNotFoundError if there is none."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if root.is_dir():
            steps = sorted(
                d for d in root.iterdir() if _DIR.fullmatch(d.name) and (d / "state.json").is_file()
            )
            if steps:
                return steps[-1]
    raise FileNotFoundError(f"no checkpoint in {path}")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (see `latest_checkpoint` for ``path``) and check its digest."""
    d = latest_checkpoint(path)
    state = json.loads((d / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{d}: not a {FORMAT} checkpoint")
    params = torch.from_numpy(np.load(d / "params.npy", allow_pickle=False))
    if params.dim() != 1 or params.dtype != torch.float32:
        raise ValueError(f"{d}: params.npy must be a flat float32 array")
    optimizer = {}
    for f in sorted(d.glob("opt-*.npy")):
        key = f.name[4:-4]
        if not _KEY.fullmatch(key):
            raise ValueError(f"{d}: bad optimizer file name {f.name}")
        optimizer[key] = torch.from_numpy(np.load(f, allow_pickle=False))
    ckpt = Checkpoint(
        step=int(state["step"]),
        params=params,
        optimizer=optimizer,
        r_prev=bytes.fromhex(state["r_prev"]),
        members=tuple(bytes.fromhex(m) for m in state["members"]),
        validators={bytes.fromhex(v): bytes.fromhex(t) for v, t in state["validators"].items()},
        run_id=bytes.fromhex(state["run_id"]),
        run_name=str(state["run_name"]),
        task=str(state["task"]),
        phase_timeout=float(state["phase_timeout"]),
        num_validators=int(state["num_validators"]),
    )
    if ckpt.digest() != state.get("digest"):
        raise ValueError(f"{d}: contents do not match the recorded digest (corrupted or edited)")
    return ckpt
