"""The fused step's objective trained by :mod:`recsys_metric.triplet_kernel`'s compiled per-triplet
loop on CPU (:class:`NumbaTripletStep`), and when a run uses it (:func:`use_numba`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from recsys_metric import triplet_kernel
from recsys_metric.config import TrainConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import ConfigError
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
