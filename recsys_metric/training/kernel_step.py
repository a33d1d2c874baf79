"""The fused step's objective trained by :mod:`recsys_metric.triplet_kernel`'s compiled per-triplet
loop on CPU (:class:`NumbaTripletStep`), and when a run uses it (:func:`use_numba`); the same loop
for models with item features (:class:`NumbaFeatureStep`, :func:`use_feature_kernel`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from recsys_metric import triplet_kernel
from recsys_metric.config import TrainConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import ConfigError
from recsys_metric.model.feature_step import FeatureTripletStep
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.fused import FusedTripletStep


class NumbaTripletStep(FusedTripletStep):
    """The fused step's objective trained by :mod:`recsys_metric.triplet_kernel`'s compiled
    per-triplet loop (CPU only): the rows are updated after every triplet instead of once per
    batch. Same tables, options and optimiser state as :class:`FusedTripletStep` (checkpoints
    move between the two); :meth:`gradients` is inherited (tensor, eager).
    """

    def __init__(
        self, model: TwoTowerModel, config: TrainConfig, n_items: int, seen: InteractionMatrix | None = None
    ):
        super().__init__(model, config, n_items, compiled=False)
        self.threads = max(1, config.threads)
        self._kernel_options = {k: v for k, v in self.options.items() if k != "aliased"}
        self.k = config.negatives_for(n_items)
        self.seen = None if seen is None else kernel_csr(seen)

    @property
    def draws_negatives(self) -> bool:
        """True when the kernel draws the negatives itself (uniform sampling, given ``seen``)."""
        return self.seen is not None

    def __call__(
        self,
        users: Tensor,
        pos: Tensor,
        negs: Tensor | None,
        valid: Tensor | None,
        lr: float,
        *,
        hist: Tensor | None = None,
        seed: int = 0,
    ) -> Tensor:
        """One batch; with ``negs`` None the kernel draws ``k`` negatives per pair for the users
        ``hist`` (whose ``seen`` rows they avoid) from the random stream ``seed``."""
        sample = None
        if negs is None:
            if self.seen is None or hist is None:
                raise ValueError("negs None needs the step built with seen, and hist")
            sample = (hist.numpy(), *self.seen, self.k, seed)
        item_acc = self.rows.accumulator("item")
        # Item-item mode: one table, so one accumulator on both sides.
        user_acc = item_acc if self.aliased else self.rows.accumulator("user")
        loss = triplet_kernel.triplet_step(
            self.users.numpy(),
            self.items.numpy(),
            None if user_acc is None else user_acc.numpy(),
            None if item_acc is None else item_acc.numpy(),
            users.numpy(),
            pos.numpy(),
            None if negs is None else negs.numpy(),
            None if valid is None else valid.numpy(),
            lr,
            threads=self.threads,
            sample=sample,
            **self._kernel_options,
        )
        return torch.tensor(loss, dtype=torch.float64)


def kernel_csr(seen: InteractionMatrix) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, indices)`` of ``seen`` as :func:`triplet_kernel.draw_negatives` takes them
    (int64, int32), converted once per fit rather than on every chunk."""
    return (
        np.ascontiguousarray(seen.indptr, dtype=np.int64),
        np.ascontiguousarray(seen.indices, dtype=np.int32),
    )


def use_numba(config: TrainConfig, fused: bool, device: torch.device, distributed: bool) -> bool:
    """Whether the fused step runs as :class:`NumbaTripletStep` (see ``TrainConfig.kernel``).

    Raises:
        ConfigError: ``kernel: numba`` where it cannot run.
    """
    if config.kernel == "torch":
        return False
    reasons = []
    if not fused:
        reasons.append("the run does not take the fused path (triplet loss on free embeddings)")
    if config.optimizer == "adam":
        reasons.append("train.optimizer adam has no per-triplet update (use adagrad or sgd)")
    if device.type != "cpu":
        reasons.append(f"it runs on CPU only, not {device}")
    if distributed:
        reasons.append("torchrun ranks exchange batch gradients (the tensor step)")
    if not triplet_kernel.available():
        reasons.append("numba is not installed (pip install numba)")
    if reasons and config.kernel == "numba":
        raise ConfigError("train.kernel numba: " + "; ".join(reasons) + "; or set train.kernel: auto")
    return not reasons


class NumbaFeatureStep(FeatureTripletStep):
    """:class:`~recsys_metric.model.feature_step.FeatureTripletStep`'s objective, tables and
    optimiser state (checkpoints move between the two) trained by
    :func:`recsys_metric.triplet_kernel.feature_triplet_step` (CPU, one thread).

    What differs from the tensor step is when an update lands: user and id rows after every
    triplet (as :class:`NumbaTripletStep`), the feature rows (categorical codes, tags, the numeric
    map) once per batch from the per-item gradient sums, as the tensor step updates them. With one
    triplet per batch the two steps are the same computation (the tests hold them to it).

    Why: the tensor step spends most of an epoch in per-batch tensor passes and Python (about 12x
    the ids-only kernel's epoch on citeulike-a with tags); here each batch's distinct items get
    their feature part once, in compiled loops, and the triplets run on ``D``-float rows in cache.
    """

    kernel_name = "features-numba"

    def __init__(self, model: TwoTowerModel, config: TrainConfig, n_items: int, *, seed: int | None = None):
        super().__init__(model, config, n_items, seed=seed)
        features = self.features
        # One CSR per feature table: item -> (row, scale); scale 1 for a categorical code (code 0,
        # missing, has no entry) and 1 / n_tags for each of an item's tags (the tower's mean).
        self._parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]] = []
        for j in range(features.categorical.shape[1]):
            codes = features.categorical[:, j].numpy()
            known = codes > 0
            indptr = np.zeros(codes.shape[0] + 1, dtype=np.int64)
            np.cumsum(known, out=indptr[1:])
            rows = np.ascontiguousarray(codes[known], dtype=np.int64)
            name = f"cat_{j}"
            self._parts.append(
                (name, indptr, rows, np.ones(rows.shape[0], dtype=np.float32), self._slot(name))
            )
        for j, (indptr_t, indices_t) in enumerate(
            zip(features.tag_indptr, features.tag_indices, strict=True)
        ):
            indptr = np.ascontiguousarray(indptr_t.numpy(), dtype=np.int64)
            lengths = np.diff(indptr)
            scale = np.repeat(1.0 / np.maximum(lengths, 1), lengths).astype(np.float32)
            name = f"tag_{j}"
            rows = np.ascontiguousarray(indices_t.numpy(), dtype=np.int64)
            self._parts.append((name, indptr, rows, scale, self._slot(name)))
        self._numeric = features.numeric.numpy() if self.numeric is not None else None
        self._item_slot = np.full(self.tables["item"].shape[0], -1, dtype=np.int64)

    def _slot(self, name: str) -> tuple[np.ndarray, ...]:
        return triplet_kernel.feature_scratch(self.tables[name].numpy())

    def __call__(self, users: Tensor, pos: Tensor, negs: Tensor, valid: Tensor | None, lr: float) -> Tensor:
        # One draw per batch from the step's generator (saved in checkpoints) seeds the kernel's
        # id-dropout stream.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        parts = [
            (self.tables[name].numpy(), self._acc(name), indptr, rows, scale, slot)
            for name, indptr, rows, scale, slot in self._parts
        ]
        extra = None
        linear = self.encoder.numeric_linear
        if self._numeric is not None and linear is not None:
            weight_t = linear.weight.data.numpy().T
            numeric = self._numeric
            extra = lambda uniq: numeric[uniq] @ weight_t  # noqa: E731
        loss, uniq, grads = triplet_kernel.feature_triplet_step(
            self.tables["user"].numpy(),
            self.tables["item"].numpy(),
            self._acc("user"),
            self._acc("item"),
            parts,
            users.numpy(),
            pos.numpy(),
            negs.numpy(),
            None if valid is None else valid.numpy(),
            lr,
            id_dropout=self.id_dropout,
            seed=seed,
            item_slot=self._item_slot,
            extra_features=extra,
            **{k: v for k, v in self.options.items() if k not in ("aliased", "project")},
            project=self.project,
        )
        if self.numeric is not None and linear is not None:
            assert self._numeric is not None
            grad = torch.from_numpy(grads.T @ self._numeric[uniq])
            if self.config.optimizer == "sgd":
                grad = grad / max(int(users.shape[0]), 1)
            linear.weight.grad = grad
            for group in self.numeric.param_groups:
                group["lr"] = lr
            self.numeric.step()
            linear.weight.grad = None
        return torch.tensor(loss, dtype=torch.float64)

    def _acc(self, name: str) -> np.ndarray | None:
        acc = self.rows.accumulator(name)
        return None if acc is None else acc.numpy()


def use_feature_kernel(config: TrainConfig, device: torch.device) -> bool:
    """Whether a model the feature step trains runs as :class:`NumbaFeatureStep`: ``train.kernel``
    auto or numba, on CPU, with numba installed (else :class:`FeatureTripletStep`, the tensor step).
    """
    return config.kernel != "torch" and device.type == "cpu" and triplet_kernel.available()


def feature_step_for(
    model: TwoTowerModel, config: TrainConfig, n_items: int, device: torch.device
) -> FeatureTripletStep:
    """The step for a model with item features: :class:`NumbaFeatureStep` where
    :func:`use_feature_kernel` allows, else :class:`FeatureTripletStep`."""
    if use_feature_kernel(config, device):
        return NumbaFeatureStep(model, config, n_items)
    return FeatureTripletStep(model, config, n_items)
