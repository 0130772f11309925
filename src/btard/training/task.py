"""`Task`: everything peers must agree on to train one model together.

A task bundles a seeded model factory, data with public-seed sampling, the loss, the per-peer batch size, the
optimizer with its LR schedule, and pinned numerics. Parameters and gradients travel as flat vectors in the
model's `ParamLayout` order. All methods are pure functions of their arguments and the task (the task's only
mutable state is its lazily loaded data cache), so any peer can recompute any other peer's gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from btard.training.data import DataSource
from btard.training.flat import ParamLayout, flat_params
from btard.training.numerics import Numerics, NumericsState, apply_numerics
from btard.training.optim import FlatOptimizer, OptimizerConfig, make_optimizer
from btard.training.seeds import batch_seed, generator_from_seed

__all__ = ["GradientMethod", "LossFn", "Task", "TaskSpec", "cross_entropy_loss", "flip_labels"]

LossFn = Callable[[Tensor, Tensor], Tensor]
GradientMethod = Literal["auto", "vmap", "loop"]


def cross_entropy_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over all target positions; logits (..., C), targets (...) of class ids."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def flip_labels(targets: Tensor, num_classes: int) -> Tensor:
    """The label-flip attack's targets: y → C − 1 − y."""
    return (num_classes - 1) - targets


@dataclass(frozen=True)
class TaskSpec:
    """The settings of a task that are not code.

    name: the task's registry name (for logs and checkpoints).
    batch_size: examples per peer per step.
    optimizer: update rule and LR schedule applied identically by every peer.
    model_seed: seed of the initial parameters (every peer builds the same x^0).
    numerics: pinned dtype/determinism/device.
    eval_batch_size: examples per forward pass in `Task.evaluate`.
    bn_calibration_examples: training examples (in order, no augmentation) whose batch statistics replace the
        batch-norm running statistics before evaluation; running statistics are never part of the shared
        state.
    vmap: vectorize per-peer gradients with ``torch.func.vmap``; None = whenever the model has no batch-norm.
    """

    name: str
    batch_size: int
    optimizer: OptimizerConfig
    model_seed: int = 0
    numerics: Numerics = field(default_factory=Numerics)
    eval_batch_size: int = 500
    bn_calibration_examples: int = 2048
    vmap: bool | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.bn_calibration_examples < 1:
            raise ValueError("batch sizes and bn_calibration_examples must be >= 1")


class Task:
    """A trainable task with flat-vector gradient and evaluation functions. Typical use::

    task = get_task("digits")
    x, opt = task.initial_params(), task.make_optimizer()
    seed = batch_seed(r_prev, step, peer_id)
    g = task.compute_gradient(x, seed)  # what that peer must compute; anyone can recompute it
    x = opt.step(x, g_hat, step)  # with the aggregate g_hat, identically on every peer
    """

    def __init__(
        self,
        spec: TaskSpec,
        model_factory: Callable[[], nn.Module],
        data: DataSource,
        loss_fn: LossFn = cross_entropy_loss,
    ) -> None:
        self.spec = spec
        self.data = data
        self.loss_fn = loss_fn
        self._model_factory = model_factory
        self._template = self.build_model()
        self._template.train()
        self.layout = ParamLayout.of(self._template)
        self._initial = flat_params(self._template)
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in self._template.modules()):
            # dropout would draw from the process-wide RNG, so nobody could recompute the gradient
            raise ValueError(
                "models with active dropout are not supported: all randomness must come from the seed"
            )
        self.has_batchnorm = any(isinstance(m, _BatchNorm) for m in self._template.modules())
        if spec.vmap and self.has_batchnorm:
            raise ValueError("vmap=True is not supported for batch-norm models (statistics couple examples)")
        self.uses_vmap = (not self.has_batchnorm) if spec.vmap is None else spec.vmap

    # ----------------------------------------------------------------------------------------- description
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        """d, the number of parameters."""
        return self.layout.dim

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def numerics(self) -> Numerics:
        return self.spec.numerics

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.numerics.device)

    @property
    def data_source(self) -> str:
        """Which data the task trains on (real files and their location, or a generated stand-in)."""
        return self.data.description

    @property
    def num_classes(self) -> int | None:
        """C for classification tasks (label flips allowed), None otherwise."""
        return self.data.num_classes

    def __repr__(self) -> str:
        return f"Task({self.name!r}, d={self.dim}, batch_size={self.batch_size}, data={self.data_source!r})"

    # ----------------------------------------------------------------------------------------- numerics
    def apply_numerics(self) -> NumericsState:
        """Apply this task's pinned numerics process-wide; returns the previous settings (see `numerics`)."""
        return apply_numerics(self.spec.numerics)

    # ----------------------------------------------------------------------------------------- parameters
    def build_model(self, seed: int | None = None) -> nn.Module:
        """A fresh model initialized from ``seed`` (default: the spec's model_seed), on the task's
        device/dtype.

        The global torch RNG is forked around construction, so this neither depends on nor disturbs it.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.model_seed if seed is None else seed)
            model = self._model_factory()
        return model.to(device=self.device, dtype=self.spec.numerics.dtype)

    def initial_params(self) -> Tensor:
        """x^0: the flat initial parameters every peer starts from (a new tensor)."""
        return self._initial.clone()

    def model_with_params(self, params: Tensor) -> nn.Module:
        """A standalone copy of the model holding ``params`` (for inference or export)."""
        flat = self._check_params(params)
        model = copy.deepcopy(self._template)
        with torch.no_grad():
            for p, v in zip(model.parameters(), self.layout.unflatten(flat).values()):
                p.copy_(v)
        return model

    def make_optimizer(self) -> FlatOptimizer:
        """A fresh optimizer (empty state) with the task's update rule and LR schedule."""
        return make_optimizer(self.spec.optimizer)

    def _check_params(self, params: Tensor) -> Tensor:
        if params.dim() != 1 or params.numel() != self.dim:
            raise ValueError(
                f"expected flat parameters of {self.dim} elements, got shape {tuple(params.shape)}"
            )
        if params.dtype != self.spec.numerics.dtype:
            raise ValueError(f"parameters must be {self.spec.numerics.dtype}, got {params.dtype}")
        return params.detach().to(self.device)

    # ----------------------------------------------------------------------------------------- batches
    @staticmethod
    def batch_seed(r_prev: bytes, step: int, peer_id: bytes) -> bytes:
        """ξ = BLAKE3("batch" | r_prev | step | peer_id); see `btard.training.seeds.batch_seed`."""
        return batch_seed(r_prev, step, peer_id)

    def sample_batch(self, seed: bytes) -> tuple[Tensor, Tensor]:
        """The (inputs, targets) minibatch of ``seed``: indices and augmentation drawn only from the seed."""
        return self.data.sample(generator_from_seed(seed), self.spec.batch_size)

    def _prepared_batch(self, seed: bytes, label_flip: bool) -> tuple[Tensor, Tensor]:
        x, y = self.sample_batch(seed)
        if label_flip:
            if self.num_classes is None:
                raise ValueError(
                    f"task {self.name!r} is not a classification task: label flips are undefined"
                )
            y = flip_labels(y, self.num_classes)
        if x.is_floating_point():
            x = x.to(self.spec.numerics.dtype)
        return x.to(self.device), y.to(self.device)

    # ----------------------------------------------------------------------------------------- gradients
    def compute_gradient(self, params: Tensor, seed: bytes, *, label_flip: bool = False) -> Tensor:
        """∇f(params; ξ=seed): the flat gradient the peer with this seed must compute (the reference path).

        Deterministic: the same (params, seed) gives bit-identical results in one process under the same
        numerics. ``label_flip`` computes it on labels y → C − 1 − y (classification tasks only).
        """
        flat = self._check_params(params)
        x, y = self._prepared_batch(seed, label_flip)
        # one leaf per parameter (views of ``flat``, no copy): differentiating w.r.t. views of one flat leaf
        # would make every parameter's backward write a d-sized zero tensor (seconds for ResNet-18)
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.layout.unflatten(flat).items()}
        buffers = {name: b.clone() for name, b in self._template.named_buffers()}  # BN updates stay private
        out = functional_call(self._template, (leaves, buffers), (x,))
        grads = torch.autograd.grad(self.loss_fn(out, y), list(leaves.values()), materialize_grads=True)
        return self.layout.flatten(dict(zip(leaves, grads)))

    def compute_gradients(
        self,
        params: Tensor,
        seeds: Sequence[bytes],
        *,
        label_flip: bool | Sequence[bool] = False,
        method: GradientMethod = "auto",
        chunk_size: int | None = None,
    ) -> Tensor:
        """Many peers' gradients at the same ``params``: row i is peer ``seeds[i]``'s gradient, shape (P, d).

        ``method="loop"`` calls `compute_gradient` per seed (bit-identical to it). ``"vmap"`` computes all
        rows in one vectorized pass (``torch.func.vmap`` over the peer dimension); it is numerically equal to
        the loop (relative error ≲1e-6 in float32), not bit-identical, because batched kernels sum in a
        different order. ``"auto"`` uses vmap when the task allows it (no batch-norm). ``chunk_size`` bounds
        the peers per vectorized pass (memory). ``label_flip`` may be given per seed.
        """
        flips = [label_flip] * len(seeds) if isinstance(label_flip, bool) else list(label_flip)
        if len(flips) != len(seeds):
            raise ValueError("label_flip must be a bool or one bool per seed")
        if method not in ("auto", "vmap", "loop"):
            raise ValueError(f"unknown method {method!r}")
        if method == "vmap" and self.has_batchnorm:
            raise ValueError("vmap is not supported for batch-norm models")
        if not seeds:
            return torch.empty(0, self.dim, dtype=self.spec.numerics.dtype, device=self.device)
        if method == "loop" or (method == "auto" and not self.uses_vmap):
            return torch.stack([self.compute_gradient(params, s, label_flip=f) for s, f in zip(seeds, flips)])
        flat = self._check_params(params)
        batches = [self._prepared_batch(s, f) for s, f in zip(seeds, flips)]
        xs = torch.stack([x for x, _ in batches])
        ys = torch.stack([y for _, y in batches])
        buffers = dict(self._template.named_buffers())

        def peer_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return self.loss_fn(functional_call(self._template, (p, buffers), (x,)), y)

        grads = vmap(grad(peer_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(
            self.layout.unflatten(flat), xs, ys
        )
        return self.layout.flatten(grads, batch_dims=1)

    # ----------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, params: Tensor, max_examples: int | None = None) -> dict[str, float]:
        """Test-set metrics of ``params``: {"loss", "accuracy", "examples"}.

        loss is the mean loss per target position, accuracy the fraction of argmax predictions equal to the
        target (per token for language models), over the first ``max_examples`` test examples (all if None).
        Batch-norm statistics are first recomputed from `TaskSpec.bn_calibration_examples` training examples,
        so the result depends only on ``params``.
        """
        model = self.model_with_params(params)
        if self.has_batchnorm:
            self._calibrate_batchnorm(model)
        model.eval()
        loss_sum, correct, positions, examples = 0.0, 0, 0, 0
        for x, y in self.data.test_batches(self.spec.eval_batch_size, max_examples):
            x = x.to(self.spec.numerics.dtype) if x.is_floating_point() else x
            x, y = x.to(self.device), y.to(self.device)
            out = model(x)
            loss_sum += float(self.loss_fn(out, y)) * y.numel()
            if out.shape[:-1] == y.shape:
                correct += int((out.argmax(dim=-1) == y).sum())
            positions += y.numel()
            examples += x.shape[0]
        if positions == 0:
            raise ValueError("no test examples to evaluate")
        return {"loss": loss_sum / positions, "accuracy": correct / positions, "examples": float(examples)}

    def _calibrate_batchnorm(self, model: nn.Module) -> None:
        bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        for x, _ in self.data.train_batches(self.spec.eval_batch_size, self.spec.bn_calibration_examples):
            x = x.to(self.spec.numerics.dtype) if x.is_floating_point() else x
            model(x.to(self.device))
