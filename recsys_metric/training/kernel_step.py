"""The fused step's objective trained by :mod:`recsys_metric.triplet_kernel`'s compiled per-triplet
loop on CPU (:class:`NumbaTripletStep`), and when a run uses it (:func:`use_numba`); the same loop
for models with item features (:class:`NumbaFeatureStep`, :func:`use_feature_kernel`).
"""

from __future__ import annotations

import math
from typing import Any

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
            indptr, indices, seen_filter = self.seen
            sample = (hist.numpy(), indptr, indices, self.k, seed)
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
            seen=None if sample is None else seen_filter,
            **self._kernel_options,
        )
        return torch.tensor(loss, dtype=torch.float64)


def kernel_csr(seen: InteractionMatrix) -> tuple[np.ndarray, np.ndarray, triplet_kernel.SeenFilter]:
    """``(indptr, indices, filter)`` of ``seen`` as :func:`triplet_kernel.draw_negatives` takes
    them (int64, int32, :func:`triplet_kernel.seen_filter`), built once per fit rather than on
    every chunk."""
    indptr = np.ascontiguousarray(seen.indptr, dtype=np.int64)
    indices = np.ascontiguousarray(seen.indices, dtype=np.int32)
    return indptr, indices, triplet_kernel.seen_filter(indptr, indices)


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


FEATURE_WINDOW_FACTOR = 2
"""``window_pairs`` auto: enough pairs that the window's triplets read about this many times the
rows that building the catalog's feature vectors reads (``nnz`` feature entries)."""


class NumbaFeatureStep(FeatureTripletStep):
    """:class:`~recsys_metric.model.feature_step.FeatureTripletStep`'s objective, tables and
    optimiser state (checkpoints move between the two) trained in compiled loops
    (:func:`recsys_metric.triplet_kernel.feature_triplets`; CPU, one thread).

    User and id rows are updated after every triplet (as :class:`NumbaTripletStep`). The feature
    part ``F`` of an item's vector (categorical codes, the mean of its tags, the numeric map) is
    built once per *window* and frozen within it; the window's gradients of ``F`` are summed per
    item and applied to the feature rows when it closes, as the tensor step applies a batch's.

    Windows: with ``window_pairs`` None (auto), when a window's triplets touch about the whole
    catalog (``window_pairs * (k + 1) >= n_items``), ``F`` is built for every item at once and a
    window spans ``FEATURE_WINDOW_FACTOR * nnz / (k + 1)`` pairs rounded up to whole batches
    (citeulike-a with tags: 4 batches of 4096), so that building ``F`` (a random row read per
    feature entry: on citeulike-a with tags as long as a batch's triplets) stays a fraction of the
    work; otherwise (large catalogs) each call is a window over the batch's distinct items. An
    integer ``window_pairs`` forces catalog-wide windows of that many pairs; 0 forces per-call
    windows. The id-dropout draw is per item and window. A window is closed at the end of every
    epoch and before :meth:`state_dict`, so that validation and checkpoints see every update. With
    one triplet per call and per-call windows the step is the tensor step's computation (the tests
    hold it to that).

    Why: the tensor step spends an epoch in per-batch tensor passes and Python (12x the ids-only
    kernel's epoch on citeulike-a with tags); here the triplets run on ``D``-float rows in cache
    with the ids-only kernel's code.
    """

    kernel_name = "features-numba"

    def __init__(
        self,
        model: TwoTowerModel,
        config: TrainConfig,
        n_items: int,
        *,
        seed: int | None = None,
        window_pairs: int | None = None,
    ):
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
                (name, indptr, rows, np.ones(rows.shape[0], dtype=np.float32), self._scratch(name))
            )
        for j, (indptr_t, indices_t) in enumerate(
            zip(features.tag_indptr, features.tag_indices, strict=True)
        ):
            indptr = np.ascontiguousarray(indptr_t.numpy(), dtype=np.int64)
            lengths = np.diff(indptr)
            scale = np.repeat(1.0 / np.maximum(lengths, 1), lengths).astype(np.float32)
            name = f"tag_{j}"
            rows = np.ascontiguousarray(indices_t.numpy(), dtype=np.int64)
            self._parts.append((name, indptr, rows, scale, self._scratch(name)))
        self._numeric = features.numeric.numpy() if self.numeric is not None else None
        n_rows = self.tables["item"].shape[0]
        self._item_slot = np.full(n_rows, -1, dtype=np.int64)
        k = config.negatives_for(n_items)
        if window_pairs is None:
            nnz = sum(int(part[2].shape[0]) for part in self._parts) + n_rows * (self._numeric is not None)
            batches = max(1, math.ceil(FEATURE_WINDOW_FACTOR * nnz / ((k + 1) * config.batch_size)))
            window_pairs = batches * config.batch_size
            if window_pairs * (k + 1) < n_rows:
                window_pairs = 0
        self.window_pairs = int(window_pairs)
        self._window: dict[str, Any] | None = None

    def _scratch(self, name: str) -> tuple[np.ndarray, ...]:
        return triplet_kernel.feature_scratch(self.tables[name].numpy())

    def _part_arrays(self) -> list[tuple]:
        return [
            (self.tables[name].numpy(), self._acc(name), indptr, rows, scale, scratch)
            for name, indptr, rows, scale, scratch in self._parts
        ]

    def _extra(self):
        linear = self.encoder.numeric_linear
        if self._numeric is None or linear is None:
            return None
        weight_t = linear.weight.data.numpy().T
        numeric = self._numeric
        return lambda uniq: numeric[uniq] @ weight_t

    def _open(self, uniq: np.ndarray, keep: np.ndarray) -> dict[str, Any]:
        feats, vectors = triplet_kernel.feature_vectors(
            self.tables["item"].numpy(), self._part_arrays(), uniq, keep, self._extra()
        )
        return {
            "uniq": uniq,
            "keep": keep,
            "feats": feats,
            "vectors": vectors,
            "grads": np.zeros_like(feats),
            "touched": np.zeros(uniq.shape[0], dtype=np.bool_),
            "pairs": 0,
            "lr": 0.0,
        }

    def _close(self, window: dict[str, Any]) -> None:
        """Apply a window's summed feature gradients (at the rate of its last call)."""
        uniq, grads, lr = window["uniq"], window["grads"], window["lr"]
        triplet_kernel.feature_flush(self._part_arrays(), grads, window["touched"], uniq, lr)
        linear = self.encoder.numeric_linear
        if self.numeric is not None and linear is not None:
            assert self._numeric is not None
            grad = torch.from_numpy(grads.T @ self._numeric[uniq])
            if self.config.optimizer == "sgd":
                grad = grad / max(int(window["pairs"]), 1)
            linear.weight.grad = grad
            for group in self.numeric.param_groups:
                group["lr"] = lr
            self.numeric.step()
            linear.weight.grad = None

    def flush(self) -> None:
        """Close the open window, if any (its feature updates land now)."""
        if self._window is not None:
            window, self._window = self._window, None
            self._close(window)

    def __call__(self, users: Tensor, pos: Tensor, negs: Tensor, valid: Tensor | None, lr: float) -> Tensor:
        # One draw per call from the step's generator (saved in checkpoints) seeds the kernel's
        # id-dropout stream.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        pos_np, negs_np = pos.numpy(), negs.numpy()
        valid_np = None if valid is None else valid.numpy()
        if self.window_pairs > 0:
            if self._window is None:
                n_rows = self.tables["item"].shape[0]
                keep = np.ones(n_rows, dtype=np.float32)
                if self.id_dropout > 0.0:
                    keep[np.random.default_rng(seed).random(n_rows) < self.id_dropout] = 0.0
                self._window = self._open(np.arange(n_rows, dtype=np.int64), keep)
            window, lpos, lnegs = self._window, pos_np, negs_np
        else:
            uniq, lpos, lnegs, keep = triplet_kernel.feature_locals(
                pos_np, negs_np, valid_np, self._item_slot, self.id_dropout, seed
            )
            window = self._open(uniq, keep)
        loss = triplet_kernel.feature_triplets(
            self.tables["user"].numpy(),
            self.tables["item"].numpy(),
            self._acc("user"),
            self._acc("item"),
            window["uniq"],
            window["keep"],
            window["feats"],
            window["vectors"],
            window["grads"],
            window["touched"],
            users.numpy(),
            lpos,
            lnegs,
            valid_np,
            lr,
            **{k: v for k, v in self.options.items() if k not in ("aliased", "project")},
            project=self.project,
        )
        window["pairs"] += int(users.shape[0])
        window["lr"] = lr
        if self.window_pairs <= 0:
            self._close(window)
        elif window["pairs"] >= self.window_pairs:
            self.flush()
        return torch.tensor(loss, dtype=torch.float64)

    def end_epoch(self, model: TwoTowerModel) -> None:
        self.flush()
        super().end_epoch(model)

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return super().state_dict()

    def _acc(self, name: str) -> np.ndarray | None:
        acc = self.rows.accumulator(name)
        return None if acc is None else acc.numpy()


def use_feature_kernel(config: TrainConfig, device: torch.device) -> bool:
    """Whether a model the feature step trains runs as :class:`NumbaFeatureStep`: under
    ``train.kernel: numba``, and under ``auto`` on CPU with numba installed; ``torch`` (and
    ``auto`` elsewhere) keeps :class:`FeatureTripletStep`, the tensor step. On ml-latest-small
    with genres the two reach the same warm quality (.362 / .328 against .362 / .332) and the
    compiled step fits in 12-16 s against 54 s (``docs/cold-start.md``); it was opt-in while
    early stopping cut its runs short on a noisy plateau
    (:func:`~recsys_metric.training.early_stopping.trend_epoch`).

    Raises:
        ConfigError: ``kernel: numba`` off the CPU or without numba.
    """
    if config.kernel == "torch":
        return False
    if config.kernel == "auto":
        return device.type == "cpu" and triplet_kernel.available()
    reasons = []
    if device.type != "cpu":
        reasons.append(f"it runs on CPU only, not {device}")
    if not triplet_kernel.available():
        reasons.append("numba is not installed (pip install numba)")
    if reasons:
        raise ConfigError("train.kernel numba: " + "; ".join(reasons) + "; or set train.kernel: auto")
    return True


def feature_step_for(
    model: TwoTowerModel, config: TrainConfig, n_items: int, device: torch.device
) -> FeatureTripletStep:
    """The step for a model with item features: :class:`NumbaFeatureStep` where
    :func:`use_feature_kernel` allows, else :class:`FeatureTripletStep`."""
    if use_feature_kernel(config, device):
        return NumbaFeatureStep(model, config, n_items)
    return FeatureTripletStep(model, config, n_items)
