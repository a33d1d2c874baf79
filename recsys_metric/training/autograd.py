"""The step of any loss and tower through autograd (:class:`AutogradStep`) and the summed triplet
objective it and the tests share (:func:`triplet_objective`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from recsys_metric.config import TrainConfig
from recsys_metric.model.distances import Distance, EuclideanDistance
from recsys_metric.model.losses import (
    bpr_loss,
    contrastive_loss,
    item_centric_loss,
    sampled_softmax_loss,
    triplet_margin_loss,
)
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.data import TrainData
from recsys_metric.training.optim import SparseRowOptimizer


def dense_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    lr = config.first_lr()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=config.weight_decay)


def triplet_objective(
    u: Tensor,
    p: Tensor,
    n: Tensor,
    valid: Tensor | None,
    distance: Distance,
    config: TrainConfig,
    n_items: int,
) -> Tensor:
    """The summed triplet objective of a batch from its embeddings, through autograd: the triplet
    hinge (:func:`~recsys_metric.model.losses.triplet_margin_loss`) plus ``item_centric_weight``
    times the item-centric hinge (:func:`~recsys_metric.model.losses.item_centric_loss`).

    Args:
        u: ``[B, D]`` queries; p: ``[B, D]`` positives; n: ``[B, k, D]`` negatives.
        valid: bool ``[B, k]`` or None; invalid slots never violate.
        distance: the loss's distance (squared euclidean for a euclidean model, as CML).
        config: margin, weighting and ``item_centric_weight``.
        n_items: catalog size (WARP's rank estimate).
    """
    masked = float("-inf") if distance.is_inverted else float("inf")
    pos_v = distance.rowwise(u, p)
    neg_v = distance.rowwise(u.unsqueeze(1), n)
    if valid is not None:
        neg_v = neg_v.masked_fill(~valid, masked)
    loss = triplet_margin_loss(
        pos_v,
        neg_v,
        margin=config.margin,
        weighting=config.negative_weighting,
        is_inverted=distance.is_inverted,
        n_items=n_items,
        reduction="sum",
    )
    item_weight = config.item_centric_weight_for("temporal")  # a float unless fit did not resolve it
    if item_weight:
        item_v = distance.rowwise(p.unsqueeze(1), n)
        if valid is not None:
            item_v = item_v.masked_fill(~valid, masked)
        loss = loss + item_weight * item_centric_loss(
            pos_v,
            item_v,
            neg_v,
            margin=config.margin,
            weighting=config.negative_weighting,
            is_inverted=distance.is_inverted,
            reduction="sum",
        )
    return loss


class AutogradStep:
    """One optimisation step of any loss and tower through autograd."""

    def __init__(self, model: TwoTowerModel, config: TrainConfig, data: TrainData, device: torch.device):
        self.model = model
        self.config = config
        self.n_items = data.n_items
        self.tables = model.sparse_tables()
        self.rows = SparseRowOptimizer({k: w.data for k, w in self.tables.items()}, config.optimizer)
        sparse_ids = {id(w) for w in self.tables.values()}
        dense = [p for p in model.parameters() if id(p) not in sparse_ids]
        self.dense = dense_optimizer(dense, config) if dense else None
        self.distance = model.distance
        self.loss_distance = (
            EuclideanDistance(squared=True) if model.distance.name == "euclidean" else model.distance
        )
        self.log_q: Tensor | None = None
        if config.loss == "softmax":
            counts = np.bincount(data.item_num, minlength=data.n_items).astype(np.float64)
            q = np.maximum(counts, 1.0) / counts.sum()
            self.log_q = torch.from_numpy(np.log(q).astype(np.float32)).to(device)

    def _loss(self, users: Tensor, pos: Tensor, negs: Tensor | None, valid: Tensor | None) -> Tensor:
        cfg = self.config
        model = self.model
        batch = users.shape[0]
        u = model.query_embeddings(users)
        if negs is None:
            assert self.log_q is not None
            p = model.item_embeddings(pos)
            loss = sampled_softmax_loss(
                u,
                p,
                self.distance,
                temperature=cfg.softmax_temperature,
                log_q=self.log_q[pos],
                pos_item_nums=pos,
            )
            return loss * batch
        k = negs.shape[1]
        items = model.item_embeddings(torch.cat([pos, negs.reshape(-1)]))
        p, n = items[:batch], items[batch:].reshape(batch, k, -1)
        dist = self.loss_distance
        if cfg.loss == "triplet":
            return triplet_objective(u, p, n, valid, dist, cfg, self.n_items)
        pos_v = dist.rowwise(u, p)
        neg_v = dist.rowwise(u.unsqueeze(1), n)
        if valid is not None:
            neg_v = neg_v.masked_fill(~valid, float("-inf") if dist.is_inverted else float("inf"))
        if cfg.loss == "contrastive":
            return contrastive_loss(pos_v, neg_v, margin=cfg.margin, is_inverted=dist.is_inverted) * batch
        sign = 1.0 if dist.is_inverted else -1.0
        return bpr_loss(sign * pos_v, sign * neg_v) * batch

    def __call__(
        self, users: Tensor, pos: Tensor, negs: Tensor | None, valid: Tensor | None, lr: float
    ) -> Tensor:
        loss = self.backward(users, pos, negs, valid)
        self.apply(lr, users.shape[0])
        return loss

    def backward(self, users: Tensor, pos: Tensor, negs: Tensor | None, valid: Tensor | None) -> Tensor:
        """The batch's summed loss (detached); its gradients are left in ``.grad`` (sparse and
        uncoalesced for the id tables: one row per lookup)."""
        with torch.enable_grad():
            loss = self._loss(users, pos, negs, valid)
            loss.backward()
        return loss.detach()

    def apply(self, lr: float, batch: int) -> None:
        """Update every parameter from the gradients in ``.grad`` (of ``batch`` examples) and clear them."""
        cfg = self.config
        for name, weight in self.tables.items():
            grad = weight.grad
            if grad is None:
                continue
            # The id tables are sparse embeddings: one gradient row per lookup, uncoalesced.
            rows, values = grad._indices()[0], grad._values()
            if cfg.weight_decay:
                values = values + cfg.weight_decay * weight.data[rows]
            self.rows.step(name, rows, values, lr)
            self.distance.project(weight.data, rows)
            weight.grad = None
        if self.dense is not None:
            for group in self.dense.param_groups:
                group["lr"] = lr
            if cfg.optimizer == "sgd":
                for group in self.dense.param_groups:
                    for param in group["params"]:
                        if param.grad is not None:
                            param.grad.div_(batch)
            self.dense.step()
            self.dense.zero_grad(set_to_none=True)

    def end_epoch(self, model: TwoTowerModel) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows.state_dict(),
            "dense": self.dense.state_dict() if self.dense is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        if self.dense is not None and state.get("dense") is not None:
            self.dense.load_state_dict(state["dense"])
